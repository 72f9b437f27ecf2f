"""Driver peak RSS of the sampling stage: does the driver hold the round's data? (it must not)

Runs `pipeline.sampling.run_sampling` (prompts -> samples -> graded -> pairs, Ray Data over actor pools)
on 1k and on 10k arithmetic prompts (`data.arithmetic.n_train`), `sampling.n=4`, each in a fresh
subprocess with its own embedded Ray and a run directory in a temp dir, because ru_maxrss is a
high-water mark of the whole process. The policy is a random tiny Llama saved to a temp dir
(`model.path=<dir>`; random weights are fine for memory, and answers are mostly wrong so nearly
every prompt yields a pair), or with `--policy bootstrap` the project's SFT-bootstrapped policy.

    .venv/bin/python bench/driver_memory.py [--backend vllm|transformers] [--sizes 1000,10000]

Prints each run's driver peak RSS (ru_maxrss, MiB) and, because that high-water mark can be set
by an import spike before the stage starts, also the current RSS sampled every 50 ms during the
stage; the wall time of the stage (and of each sub-stage from the run manifest); and the ratio
largest/smallest of both (target <= 1.2 for 10k/1k). The baseline of the ratio is the 1k run of the
same invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, header, peak_rss_mib, vm_hwm_mib


def child(args) -> int:
    """One sampling stage in this (fresh) process; prints one JSON line with the figures."""
    import threading

    import psutil

    from pipeline.sampling import run_sampling
    from wpo_ray.cluster import init_ray
    from wpo_ray.config import load_config
    from wpo_ray.rundir import RunDir

    # One round of all n prompts (the default config spreads its train split over 5 rounds).
    overrides = [f"model.path={args.model}", f"data.arithmetic.n_train={args.n}", f"data.prompts_per_round={args.n}",
                 "run.rounds=1", f"sampling.n={args.samples}",
                 f"sampling.backend={args.backend}", f"run.dir={args.run_dir}", f"run.seed={args.seed}",
                 "ray.address=local"]  # always an embedded Ray of our own, never a cluster of another job
    if args.model == "builtin:tiny":
        overrides.append(f"bootstrap.cache_dir={args.cache_dir}")
    cfg = load_config(ROOT / "configs" / "tiny-cpu.yaml", overrides)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    policy = args.model
    if args.model == "builtin:tiny":
        from wpo_ray.bootstrap import resolve_policy

        policy = resolve_policy(cfg)
    init_ray(cfg.ray)
    import ray

    proc = psutil.Process()
    before_peak, before_hwm, before_rss = peak_rss_mib(), vm_hwm_mib(), proc.memory_info().rss / 2**20
    sampled = [before_rss]
    stop = threading.Event()

    def sample_rss():  # current RSS every 50 ms: what the stage itself holds, below the import spike
        while not stop.wait(0.05):
            sampled.append(proc.memory_info().rss / 2**20)

    th = threading.Thread(target=sample_rss, daemon=True)
    th.start()
    t0 = time.perf_counter()
    run = RunDir(cfg)
    info = run_sampling(cfg, run, 1, policy)
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    peak, hwm = peak_rss_mib(), vm_hwm_mib()
    stages = {k.split("/")[-1]: v.get("seconds") for k, v in run.manifest["stages"].items()}
    ray.shutdown()
    print("BENCH_RESULT " + json.dumps({
        "n": args.n, "peak_mib": peak, "before_peak_mib": before_peak, "hwm_mib": hwm, "before_hwm_mib": before_hwm, "before_rss_mib": before_rss,
        "stage_max_rss_mib": max(sampled), "end_rss_mib": sampled[-1], "wall_s": wall, "stages_s": stages,
        "pairs": info["pairs"], "skips": info["skips"]}), flush=True)
    return 0


def make_model(args) -> int:
    """Build and save the random policy in a child, so the parent never imports torch: Linux carries
    ru_maxrss across fork+exec, and a parent holding torch would lend its ~450 MiB to every child."""
    import torch

    from _common import save_model

    save_model(args.model, args.hidden, args.layers, seed=args.seed)
    print("BENCH_RESULT " + json.dumps({"torch_threads": torch.get_num_threads()}), flush=True)
    return 0


def run_child(cmd: list[str], timeout: float, verbose: bool) -> tuple[dict | None, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    total = time.perf_counter() - t0
    if verbose or proc.returncode:
        sys.stdout.write(proc.stdout[-20000:])
        sys.stderr.write(proc.stderr[-20000:])
    if proc.returncode:
        print(f"child {cmd[2:]} failed with exit code {proc.returncode}")
        return None, total
    line = [x for x in proc.stdout.splitlines() if x.startswith("BENCH_RESULT ")][-1]
    return json.loads(line.split(" ", 1)[1]), total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["vllm", "transformers"], default="vllm")
    ap.add_argument("--sizes", default="1000,10000", help="comma-separated prompt counts (first is the baseline)")
    ap.add_argument("--samples", type=int, default=4, help="sampling.n")
    ap.add_argument("--policy", choices=["random", "bootstrap"], default="random")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per child run")
    ap.add_argument("--verbose", action="store_true", help="show the children's logs")
    # internal: one child run
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--make-model", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.make_model:
        return make_model(args)

    sizes = [int(x) for x in args.sizes.split(",")]
    me = [sys.executable, str(Path(__file__).resolve())]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-drivermem-") as tmp:
        tmp = Path(tmp)
        model = str(tmp / "policy") if args.policy == "random" else "builtin:tiny"
        info, _ = run_child(me + ["--make-model", "--model", str(tmp / "policy"), "--hidden", str(args.hidden),
                                  "--layers", str(args.layers), "--seed", str(args.seed)], args.timeout, args.verbose)
        if info is None:
            return 1
        header("driver peak RSS of the sampling stage (run_sampling)",
               {k: v for k, v in vars(args).items() if k not in ("child", "make_model", "n", "model", "run_dir",
                                                                  "cache_dir")},
               torch_threads=info["torch_threads"])
        print(f"parent (launcher, no torch imported) RSS high-water mark: {peak_rss_mib():.1f} MiB: every child "
              "starts from it, since Linux keeps ru_maxrss across fork+exec; VmHWM (per address space) does not")
        if args.policy == "random":
            print(f"policy: random tiny Llama hidden={args.hidden} layers={args.layers} -> {model}")
        else:
            print("policy: the SFT-bootstrapped tiny policy (cached under a temp dir: trained once here)")
        for n in sizes:
            cmd = me + ["--child", "--n", str(n), "--model", model,
                        "--run-dir", str(tmp / f"run-{n}"), "--cache-dir", str(tmp / "bootstrap-cache"),
                        "--backend", args.backend, "--samples", str(args.samples), "--seed", str(args.seed)]
            r, total = run_child(cmd, args.timeout, args.verbose)
            if r is None:
                return 1
            r["process_s"] = total
            results.append(r)
            print(f"n={n:6d} prompts x {args.samples}: driver peak RSS (ru_maxrss) {r['peak_mib']:7.1f} MiB "
                  f"[{r['before_peak_mib']:.1f} before the stage], VmHWM {r['hwm_mib']:.1f} MiB "
                  f"[{r['before_hwm_mib']:.1f} before]; current RSS {r['before_rss_mib']:.1f} MiB before, "
                  f"max {r['stage_max_rss_mib']:.1f} MiB during the stage (sampled every 50 ms)\n"
                  f"          stage wall {r['wall_s']:.1f}s {r['stages_s']} (process incl. imports and Ray "
                  f"start-up {total:.1f}s) -> {r['pairs']} pairs + {r['skips']} skips", flush=True)
    base, last = results[0], results[-1]
    ratio = last["peak_mib"] / base["peak_mib"]
    ratio_stage = last["stage_max_rss_mib"] / base["stage_max_rss_mib"]
    verdict = "MET" if ratio <= 1.2 else "MISSED"
    print(f"\nRATIO driver peak RSS (ru_maxrss) {last['n']}/{base['n']} prompts = {ratio:.3f} (target <= 1.2: {verdict})")
    print(f"      max sampled RSS during the stage {last['n']}/{base['n']} = {ratio_stage:.3f} "
          f"({last['stage_max_rss_mib'] - base['stage_max_rss_mib']:+.1f} MiB)")
    print(f"      stage wall {last['wall_s'] / base['wall_s']:.2f}x for {last['n'] / base['n']:.0f}x the prompts")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
