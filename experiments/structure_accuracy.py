"""Greedy accuracy of a policy on the built-in task, per question structure (operation, operand
digits, negative result), beside the structure's difficulty score and bucket: which questions the
bootstrapped policy really finds hard, against what the buckets assume.

    .venv/bin/python experiments/structure_accuracy.py POLICY_DIR [--per 60] [--seed 123]

POLICY_DIR is a policy directory (e.g. the bootstrap cache entry `wpo-ray bootstrap` prints).
Single operations on 1-2 digit operands (the tiny default's task), `--per` random questions per
structure, greedy decoding with transformers (no Ray, no vLLM), graded on the final answer.
"""

from __future__ import annotations

import argparse
import random
from collections import defaultdict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("policy")
    ap.add_argument("--per", type=int, default=60, help="questions per structure")
    ap.add_argument("--seed", type=int, default=123)
    args = ap.parse_args()

    from wpo_ray.arithmetic import _operand, _render, bucket_of, difficulty_score, evaluate_parts
    from wpo_ray.generation import HFSampler
    from wpo_ray.graders import arithmetic_check

    rng = random.Random(args.seed)
    questions = [(op, d1, d2, _operand(rng, d1), _operand(rng, d2))
                 for op in "+-*" for d1 in (1, 2) for d2 in (1, 2) for _ in range(args.per)]
    prompts = [_render([a, b], [op]) for op, _, _, a, b in questions]
    sampler = HFSampler.from_path(args.policy)
    out = sampler.generate(prompts, list(range(len(prompts))), n=1, temperature=0.0, top_p=1.0, max_tokens=32)
    right: dict[tuple, list[bool]] = defaultdict(list)
    for (op, d1, d2, a, b), comps in zip(questions, out):
        score = difficulty_score([a, b], [op])
        key = (score, bucket_of(score), f"{d1}{op}{d2}" + (" (negative)" if op == "-" and a < b else ""))
        right[key].append(arithmetic_check(comps[0].text, str(evaluate_parts([a, b], [op]))).verdict == "correct")
    print(f"{'structure':<16} {'score':>5}  {'bucket':<7} {'n':>4}  greedy")
    for score, bucket, name in sorted(right):
        v = right[(score, bucket, name)]
        print(f"{name:<16} {score:>5g}  {bucket:<7} {len(v):>4}  {sum(v) / len(v):.2f}")


if __name__ == "__main__":
    main()
