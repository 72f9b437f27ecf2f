"""A whole multi-round run: one trainer group for every round (`run.trainers=persistent`) vs a
group started and stopped in each round (`run.trainers=per_round`, what the job did before).

The tiny default (`configs/tiny-cpu.yaml`) at 3 rounds of 512 prompts (it runs 5 by default) on an embedded Ray with the
bootstrapped tiny policy, run by `pipeline.round.run_rounds` exactly as `wpo-ray run` runs it, in
a fresh run directory per variant. One sampler engine serves both variants (started before
either is timed), so the comparison is the trainers' alone. The trainers restart their optimizer
and schedule every round in both, so both should record the same pairs in every round (printed).

    .venv/bin/python bench/rounds.py [key=value ...]

Prints each variant's wall time, the ratio persistent / per_round, and per round the seconds
outside sampling and optimizer steps (start-up, reference log-probs, grading, pairing,
checkpoints, evaluation not overlapped) as a share of the round's wall time, and the stages that
ran inside the round's span (the previous round's evaluation runs there: eval.overlap).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _common import ROOT, header


def round_breakdown(run_dir: Path, r: int, rounds: int) -> dict:
    """Round r's seconds from the manifest and the step metrics: the round's wall time (from its
    first stage's start to the next round's, or to its own last stage's end for the last round),
    sampling, optimizer steps. Round r - 1's evaluation runs inside round r's span (eval.overlap),
    so the spans add up to the run and no evaluation is counted twice."""
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]

    def of(k: int) -> dict:
        return {key.split("/")[1]: v for key, v in stages.items() if key.startswith(f"round-{k:03d}/")}

    mine = of(r)
    start = min(v["started_unix"] for k, v in mine.items() if k != "eval")
    end = (min(v["started_unix"] for k, v in of(r + 1).items() if k != "eval") if r < rounds
           else max(v["ended_unix"] for v in mine.values()))
    metrics = run_dir / f"round-{r:03d}" / "train" / "metrics.jsonl"
    steps = sum(json.loads(x)["step_seconds"] for x in metrics.read_text().splitlines() if x.strip())
    wall = end - start
    inside = {f"{k} (round {r})": v.get("seconds", 0.0) for k, v in mine.items() if k not in ("train", "samples", "eval")}
    for k in (r - 1, r):  # whichever evaluation started inside the span
        e = of(k).get("eval")
        if e and start <= e["started_unix"] < end + 0.01:
            inside[f"eval (round {k})"] = e["seconds"]
    return {"round": wall, "train": mine["train"]["seconds"], "sampling": mine["samples"]["seconds"],
            "steps": steps, "other_share": (wall - mine["samples"]["seconds"] - steps) / wall, "stages": inside}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default="per_round,persistent",
                    help="which to run (one alone prints no ratio): per_round,persistent")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = ap.parse_args()

    import pyarrow.parquet as pq

    from actors.sampler import SamplerPool
    from pipeline.round import run_rounds
    from wpo_ray.bootstrap import resolve_policy
    from wpo_ray.cluster import init_ray
    from wpo_ray.config import load_config
    from wpo_ray.contracts import PAIRS
    from wpo_ray.rundir import RunDir

    # 3 rounds, as the figures in docs/BENCHMARKS.md were measured (the default now runs 5).
    base = ["ray.address=local", "run.rounds=3", "data.arithmetic.n_train=1536", *args.overrides]
    header("multi-round run: persistent trainer group vs per-round trainers", {"overrides": " ".join(base)})
    cfg0 = load_config(ROOT / "configs" / "tiny-cpu.yaml", base)
    policy = resolve_policy(cfg0)
    init_ray(cfg0.ray)
    pool = SamplerPool(cfg0, policy)
    walls, rounds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        variants = args.variants.split(",")
        for mode in variants:
            d = Path(tmp) / mode
            cfg = load_config(ROOT / "configs" / "tiny-cpu.yaml", [*base, f"run.trainers={mode}", f"run.dir={d}"])
            t0 = time.perf_counter()
            run_rounds(cfg, RunDir(cfg), pool=pool)
            walls[mode] = time.perf_counter() - t0
            rounds[mode] = [round_breakdown(d, r, cfg.run.rounds) for r in range(1, cfg.run.rounds + 1)]
            pool.load_weights(policy)  # the next variant starts from the same engine state
        # (persistent pairs carry their reference log-probs: a running RefLogp pool scores them as they are paired)
        same = [pq.read_table(Path(tmp) / variants[0] / f"round-{r:03d}" / "pairs", columns=PAIRS.names).equals(
                pq.read_table(Path(tmp) / variants[-1] / f"round-{r:03d}" / "pairs", columns=PAIRS.names))
                for r in range(1, cfg0.run.rounds + 1)] if len(variants) > 1 else []
    pool.shutdown()

    print(f"\n{'round':>5} {'variant':>10} {'round s':>8} {'train s':>8} {'sampling s':>10} {'steps s':>8} "
          f"{'other share':>11}")
    for mode in variants:
        for r, x in enumerate(rounds[mode], 1):
            print(f"{r:>5} {mode:>10} {x['round']:>8.1f} {x['train']:>8.1f} {x['sampling']:>10.1f} {x['steps']:>8.1f} "
                  f"{x['other_share']:>11.2f}")
    print(f"\nthe other stages inside each round's span, in seconds ({variants[-1]}):")
    for r, x in enumerate(rounds[variants[-1]], 1):
        print(f"  round {r}: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(x["stages"].items())))
    if len(variants) < 2:
        print(f"\nwall: {variants[0]} {walls[variants[0]]:.1f}s")
        return
    print(f"\nwall: per_round {walls['per_round']:.1f}s, persistent {walls['persistent']:.1f}s, "
          f"persistent / per_round = {walls['persistent'] / walls['per_round']:.2f}x")
    print("same pairs in both variants, round by round:", same)
    train = {m: sum(x["train"] for x in rounds[m]) for m in rounds}
    print(f"training stages: per_round {train['per_round']:.1f}s, persistent {train['persistent']:.1f}s, "
          f"persistent / per_round = {train['persistent'] / train['per_round']:.2f}x")


if __name__ == "__main__":
    main()
