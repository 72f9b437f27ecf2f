"""The main job: iterative weighted preference rounds, resumable, ending with a report (DESIGN §8).

For r = 1..R: sample from the current policy → grade → weigh & pair → reference log-probs → train
→ checkpoint → evaluate → the samplers take the new policy. Every finished stage is recorded in
the run's manifest; rerunning the same command resumes at the first unfinished one.

    python -m jobs.run --config configs/tiny-cpu.yaml [key=value ...] [--fresh]
    ray job submit --working-dir . -- python -m jobs.run --config configs/tiny-cpu.yaml
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from wpo_ray.config import Config
from wpo_ray.rundir import RunDir, atomic_write_text


def _evaluate_round(cfg: Config, run: RunDir, r: int, policy: str, pool, log) -> dict:
    if not run.done(r, "eval"):
        from jobs.evaluate import run_eval

        t0 = time.time()
        pool.load_weights(policy, log)
        result = run_eval(cfg, policy, sampler=pool)
        result["seconds"] = round(time.time() - t0, 1)
        atomic_write_text(run.round_dir(r) / "eval.json", json.dumps(result, indent=2))
        run.mark_done(r, "eval", **{k: v for k, v in result.items() if k.endswith("accuracy")})
    result = json.loads((run.round_dir(r) / "eval.json").read_text())
    maj = f"maj@{cfg.eval.maj_n}_accuracy"
    log(f"[round {r}] eval: greedy {result['greedy_accuracy']:.3f}"
        + (f", {maj.removesuffix('_accuracy')} {result[maj]:.3f}" if maj in result else "")
        + f" by bucket {result['greedy_by_bucket']}")
    return result


def accuracy_table(cfg: Config, run: RunDir) -> str:
    maj = f"maj@{cfg.eval.maj_n}_accuracy"
    lines = [f"{'round':>5}  {'greedy':>7}  {maj.removesuffix('_accuracy'):>7}  {'pairs':>5}  {'skips':>5}  by bucket (greedy)"]
    for r in range(0, cfg.run.rounds + 1):
        e = run.round_dir(r) / "eval.json"
        if not e.exists():
            continue
        ev = json.loads(e.read_text())
        p = run.done(r, "pairs") or {}
        buckets = " ".join(f"{k}={v:.2f}" for k, v in ev["greedy_by_bucket"].items())
        lines.append(f"{r:>5}  {ev['greedy_accuracy']:>7.3f}  {ev.get(maj, float('nan')):>7.3f}  "
                     f"{p.get('pairs', '-'):>5}  {p.get('skips', '-'):>5}  {buckets}")
    return "\n".join(lines)


def run_rounds(cfg: Config, fresh: bool = False, log=print) -> int:
    from actors.sampler import SamplerPool
    from jobs.sample import run_sampling
    from jobs.stream import run_round_streaming
    from jobs.train import run_training
    from wpo_ray.bootstrap import resolve_policy
    from wpo_ray.cluster import init_ray

    t_start = time.time()
    run = RunDir(cfg, fresh=fresh, log=log)
    log(f"[run] {run.path} ({cfg.run.rounds} round(s), loss {cfg.train.loss.base}, weighting "
        f"{cfg.weighting.scheme}, reference policy: {cfg.run.reference}, overlap: {cfg.run.overlap})")
    initial = resolve_policy(cfg, log=log)
    init_ray(cfg.ray, log=log)
    pool = None

    def samplers(policy: str):
        nonlocal pool
        if pool is None:
            pool = SamplerPool(cfg, policy, log)
        return pool

    policy = initial
    if not run.done(0, "eval"):
        _evaluate_round(cfg, run, 0, initial, samplers(initial), log)
    for r in range(1, cfg.run.rounds + 1):
        rd = run.round_dir(r)
        ckpt = rd / "checkpoint"
        if not run.done(r, "train"):
            reference = initial if cfg.run.reference == "initial" else policy
            if cfg.run.overlap == "streaming" and not run.done(r, "pairs"):
                info = run_round_streaming(cfg, run, r, policy, reference, samplers(policy), log=log)
            else:  # staged, or a streamed round whose pairs were recorded before training was
                if not run.done(r, "pairs"):
                    run_sampling(cfg, run, r, policy, pool=samplers(policy), log=log)
                info = run_training(cfg, rd / "pairs", ckpt, policy, reference, rd / "train", log=log)
            run.mark_done(r, "train", **info)
        else:
            log(f"[round {r}] training already done ({ckpt})")
        policy = str(ckpt / "policy")
        if not run.done(r, "eval"):
            _evaluate_round(cfg, run, r, policy, samplers(policy), log)
    if pool is not None:
        pool.shutdown()

    from wpo_ray.report import write_report

    report = write_report(run.path)
    log("\n" + accuracy_table(cfg, run))
    log(f"\n[run] done in {time.time() - t_start:.0f}s; report: {Path(report).absolute()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from wpo_ray.cli import main as cli_main

    return cli_main(["run", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
