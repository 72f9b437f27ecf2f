"""One round's wall time: streaming overlap (samplers and trainers at once) vs staged (samplers, then trainers).

Same config, policy, seed and sampler engines for both: the tiny default (`configs/tiny-cpu.yaml`
with one epoch, as streaming requires; reference log-probs from the RefLogp stage, or on the workers
with `train.reference_logps=worker`) on an embedded Ray,
with the bootstrapped tiny policy. The staged round is `run_sampling` then `run_training`; the streaming round is
`pipeline.streaming.run_round_streaming`. The engines are started once, before either is timed, and each
variant runs `--repeats` times, alternating, each in a fresh run directory. Both write the same
pairs (checked).

    .venv/bin/python bench/round_overlap.py [--repeats 2] [key=value ...]

Prints each variant's median seconds and the ratio streaming / staged.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import ROOT, header, median


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = ap.parse_args()

    import pyarrow.parquet as pq

    from actors.sampler import SamplerPool
    from pipeline.sampling import run_sampling
    from pipeline.streaming import run_round_streaming
    from pipeline.training import run_training
    from wpo_ray.bootstrap import resolve_policy
    from wpo_ray.cluster import init_ray
    from wpo_ray.config import load_config
    from wpo_ray.rundir import RunDir

    # Streaming needs one epoch; the staged round gets the same.
    base = ["ray.address=local", "train.epochs=1", *args.overrides]
    header("one round: streaming overlap vs staged", {"repeats": args.repeats, "overrides": " ".join(base)})
    cfg0 = load_config(ROOT / "configs" / "tiny-cpu.yaml", base)
    policy = resolve_policy(cfg0)
    init_ray(cfg0.ray)
    pool = SamplerPool(cfg0, policy)
    times: dict[str, list[float]] = {"staged": [], "streaming": []}
    pairs: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for mode in ("staged", "streaming"):
                d = Path(tmp) / f"{mode}-{i}"
                cfg = load_config(ROOT / "configs" / "tiny-cpu.yaml", [*base, f"run.overlap={mode}", f"run.dir={d}"])
                run = RunDir(cfg)
                t0 = time.perf_counter()
                if mode == "staged":
                    run_sampling(cfg, run, 1, policy, pool=pool)
                    run_training(cfg, run.output(1, "pairs"), run.output(1, "checkpoint"), policy, policy,
                                 run.train_dir(1))
                else:
                    info = run_round_streaming(cfg, run, 1, policy, policy, pool, run.output(1, "checkpoint"))
                    print(f"[bench] streaming: training ran alongside sampling for {info['overlap_seconds']}s")
                times[mode].append(time.perf_counter() - t0)
                print(f"[bench] {mode} round {i + 1}: {times[mode][-1]:.1f}s", flush=True)
                pairs[mode] = pq.read_table(run.output(1, "pairs"))
    pool.shutdown()
    same = pairs["staged"].equals(pairs["streaming"])
    staged, streaming = median(times["staged"]), median(times["streaming"])
    print(f"staged: median {staged:.1f}s ({', '.join(f'{x:.1f}' for x in times['staged'])})")
    print(f"streaming: median {streaming:.1f}s ({', '.join(f'{x:.1f}' for x in times['streaming'])})")
    print(f"same pairs: {same}")
    print(f"ratio streaming / staged: {streaming / staged:.2f}")


if __name__ == "__main__":
    main()
