"""Evaluate a policy: greedy accuracy and maj@N on the test split (and the dev split with eval.dev),
through the pipeline's sampler."""

from __future__ import annotations

import json
import logging

from wpo_ray.config import Config
from wpo_ray.rundir import RunDir, RunLayout

log = logging.getLogger(__name__)


def eval_rows(cfg: Config, tokenizer=None, split: str = "test") -> list[dict]:
    """The questions evaluated: the test split, or the dev split that settings are chosen on."""
    from wpo_ray.prompts import chat_prompts, load_prompts

    if cfg.data.source == "arithmetic" and split == "dev":
        from wpo_ray.bootstrap import dev_rows

        rows = dev_rows(cfg)
        if cfg.data.chat_template:
            for r, p in zip(rows, chat_prompts([r["prompt"] for r in rows], tokenizer)):
                r["prompt"] = p
    else:
        if cfg.data.source != "arithmetic" and not getattr(cfg.data, f"{split}_path"):
            raise ValueError(f"data.{split}_path is required to evaluate a file-based dataset's {split} split"
                             + (" (eval.dev is true)" if split == "dev" else ""))
        table, _ = load_prompts(cfg.data, split, tokenizer=tokenizer)
        rows = table.to_pylist()
    return rows[: cfg.eval.max_prompts] if cfg.eval.max_prompts else rows


def run_eval(cfg: Config, policy_path: str, sampler=None) -> dict:
    """Evaluate in-process. `sampler` lets a caller reuse a running engine (e.g. the round's)."""
    from wpo_ray.evaluation import evaluate
    from wpo_ray.generation import make_sampler
    from wpo_ray.graders import get_grader
    from wpo_ray.train_plan import model_max_length

    if sampler is None:
        sampler = make_sampler(cfg.sampling.backend, policy_path, cfg.sampling.engine, seed=cfg.run.seed,
                               trust_remote_code=cfg.model.trust_remote_code, dtype=cfg.model.dtype,
                               max_model_len=model_max_length(cfg))
    tokenizer = None
    if cfg.data.chat_template:  # prompts are rendered with the policy's own chat template
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(policy_path, trust_remote_code=cfg.model.trust_remote_code)
    grader = get_grader(cfg.grading.grader, timeout_s=cfg.grading.timeout_s)
    try:
        def on(split: str) -> dict:
            return evaluate(sampler, eval_rows(cfg, tokenizer, split), grader, maj_n=cfg.eval.maj_n,
                            max_tokens=cfg.eval.max_tokens, seed=cfg.run.seed, temperature=cfg.sampling.temperature)

        result = on("test")
        if cfg.eval.dev:
            result["dev"] = on("dev")
    finally:
        grader.close()
    result["policy"] = policy_path
    return result


def eval_stage(cfg: Config, run: RunDir, r: int, policy: str, pool) -> dict:
    """Round r's evaluation of `policy` on the run's engines, recorded as `round-r/eval.json`."""

    def produce(out) -> dict:
        pool.load_weights(policy)
        result = run_eval(cfg, policy, sampler=pool)
        out("eval.json").write_text(json.dumps(result, indent=2))
        return {**{k: v for k, v in result.items() if k.endswith("accuracy")},
                "placement": {"samplers": pool.placement}}

    run.stage(r, "eval", produce, outputs=("eval.json",))
    result = json.loads(run.output(r, "eval.json").read_text())
    maj = f"maj@{cfg.eval.maj_n}_accuracy"
    log.info("[round %d] eval: greedy %.3f%s by bucket %s", r, result["greedy_accuracy"],
             f", {maj.removesuffix('_accuracy')} {result[maj]:.3f}" if maj in result else "",
             result["greedy_by_bucket"])
    if "dev" in result:
        log.info("[round %d] eval (dev split): greedy %.3f by bucket %s", r, result["dev"]["greedy_accuracy"],
                 result["dev"]["greedy_by_bucket"])
    return result


def accuracy_table(cfg: Config, run: RunLayout, manifest: dict) -> str:
    """The per-round table `wpo-ray run` ends with."""
    maj = f"maj@{cfg.eval.maj_n}_accuracy"
    lines = [f"{'round':>5}  {'greedy':>7}  {maj.removesuffix('_accuracy'):>7}  {'pairs':>5}  {'skips':>5}  "
             "by bucket (greedy)"]
    for r in range(0, cfg.run.rounds + 1):
        e = run.output(r, "eval.json")
        if not e.exists():
            continue
        ev = json.loads(e.read_text())
        p = manifest["stages"].get(run.key(r, "pairs")) or {}
        buckets = " ".join(f"{k}={v:.2f}" for k, v in ev["greedy_by_bucket"].items())
        lines.append(f"{r:>5}  {ev['greedy_accuracy']:>7.3f}  {ev.get(maj, float('nan')):>7.3f}  "
                     f"{p.get('pairs', '-'):>5}  {p.get('skips', '-'):>5}  {buckets}")
    return "\n".join(lines)
