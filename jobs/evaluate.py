"""Evaluate a policy: greedy accuracy and maj@N on the test split, through the pipeline's sampler.

    python -m jobs.evaluate --config configs/tiny-cpu.yaml [--model DIR]
"""

from __future__ import annotations

import sys

from wpo_ray.config import Config


def test_rows(cfg: Config, tokenizer=None) -> list[dict]:
    from wpo_ray.prompts import load_prompts

    if cfg.data.source != "arithmetic" and not cfg.data.test_path:
        raise ValueError("data.test_path is required to evaluate a file-based dataset")
    table, _ = load_prompts(cfg.data, "test", tokenizer=tokenizer)
    rows = table.to_pylist()
    return rows[: cfg.eval.max_prompts] if cfg.eval.max_prompts else rows


def run_eval(cfg: Config, policy_path: str, sampler=None) -> dict:
    """Evaluate in-process. `sampler` lets a caller reuse a running engine (e.g. the round's)."""
    from wpo_ray.evaluation import evaluate
    from wpo_ray.generation import make_sampler
    from wpo_ray.graders import get_grader

    if sampler is None:
        sampler = make_sampler(cfg.sampling.backend, policy_path, cfg.sampling.engine, seed=cfg.run.seed,
                               trust_remote_code=cfg.model.trust_remote_code, dtype=cfg.model.dtype)
    tokenizer = None
    if cfg.data.chat_template:  # prompts are rendered with the policy's own chat template
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(policy_path, trust_remote_code=cfg.model.trust_remote_code)
    rows = test_rows(cfg, tokenizer)
    result = evaluate(sampler, rows, get_grader(cfg.grading.grader, timeout_s=cfg.grading.timeout_s),
                      maj_n=cfg.eval.maj_n, max_tokens=cfg.eval.max_tokens, seed=cfg.run.seed,
                      temperature=cfg.sampling.temperature)
    result["policy"] = policy_path
    return result


def main(argv: list[str] | None = None) -> int:
    from wpo_ray.cli import main as cli_main

    return cli_main(["eval", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
