"""One round's wall time: streaming overlap (samplers and trainers at once) vs staged (samplers, then trainers).

As the main job runs its rounds: the sampler engines, the graders and one trainer group (with its
RefLogp pool) are started once and serve every round, so neither variant pays for a start-up. A
first staged round, untimed, warms them all. Then each variant runs `--repeats` times, alternating,
each in a fresh run directory, on the tiny default (`configs/tiny-cpu.yaml` with one epoch, as
streaming requires) and the bootstrapped tiny policy. The staged round is `run_sampling` then
`run_training` on the group; the streaming round is `pipeline.streaming.run_round_streaming` on
the same group. Round k of the group is round k of its run directory: the same prompts every
round (`data.reuse_prompts=true`), sampled from the initial policy with round k's seeds, so the
rounds' pair counts differ a little (printed); the group trains on from the weights it holds,
which changes no step's cost.

    .venv/bin/python bench/round_overlap.py [--repeats 2] [key=value ...]
    .venv/bin/python bench/round_overlap.py sampling.n=16      # sampling the larger half

Prints each variant's median seconds, the sampling half and training of the staged rounds, and
the ratio streaming / staged.
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

    from actors.grader import GraderPool
    from actors.sampler import SamplerPool
    from pipeline.sampling import run_sampling
    from pipeline.streaming import run_round_streaming
    from pipeline.training import TrainerGroup, run_training
    from wpo_ray.bootstrap import resolve_policy
    from wpo_ray.cluster import init_ray
    from wpo_ray.config import load_config
    from wpo_ray.rundir import RunDir

    # Streaming needs one epoch; the staged round gets the same.
    base = ["ray.address=local", "train.epochs=1", "data.reuse_prompts=true", *args.overrides]
    header("one round: streaming overlap vs staged, running engines, graders and trainers",
           {"repeats": args.repeats, "overrides": " ".join(base)})
    cfg0 = load_config(ROOT / "configs" / "tiny-cpu.yaml", base)
    policy = resolve_policy(cfg0)
    init_ray(cfg0.ray)
    times: dict[str, list[float]] = {"staged": [], "streaming": []}
    halves: list[tuple[float, float]] = []  # staged rounds: (sampling half, training)
    pairs: dict[str, list[int]] = {"staged": [], "streaming": []}
    with tempfile.TemporaryDirectory() as tmp:
        pool, graders = SamplerPool(cfg0, policy), GraderPool(cfg0)
        group = TrainerGroup(cfg0, Path(tmp) / "trainers")
        k = 0  # the group's round index: one more per round it trains
        try:
            for i in range(-1, args.repeats):  # -1: the warm-up
                for mode in ("staged", "streaming") if i >= 0 else ("staged",):
                    k += 1
                    d = Path(tmp) / f"{mode}-{i}"
                    cfg = load_config(ROOT / "configs" / "tiny-cpu.yaml",
                                      [*base, f"run.overlap={mode}", f"run.dir={d}"])
                    run = RunDir(cfg)
                    t0 = time.perf_counter()
                    if mode == "staged":
                        run_sampling(cfg, run, k, policy, pool=pool, graders=graders)
                        t1 = time.perf_counter()
                        run_training(cfg, run.output(k, "pairs"), run.output(k, "checkpoint"), policy, policy,
                                     run.train_dir(k), group=group, round_idx=k)
                        if i >= 0:
                            halves.append((t1 - t0, time.perf_counter() - t1))
                    else:
                        info = run_round_streaming(cfg, run, k, policy, policy, pool, run.output(k, "checkpoint"),
                                                   graders=graders, group=group)
                        print(f"[bench] streaming: training ran alongside sampling for {info['overlap_seconds']}s")
                    if i < 0:
                        print(f"[bench] warm-up round: {time.perf_counter() - t0:.1f}s", flush=True)
                        continue
                    times[mode].append(time.perf_counter() - t0)
                    print(f"[bench] {mode} round {i + 1}: {times[mode][-1]:.1f}s", flush=True)
                    pairs[mode].append(pq.read_table(run.output(k, "pairs")).num_rows)
        finally:
            group.close()
            graders.shutdown()
            pool.shutdown()
    staged, streaming = median(times["staged"]), median(times["streaming"])
    print(f"staged: median {staged:.1f}s ({', '.join(f'{x:.1f}' for x in times['staged'])}); sampling half "
          f"{', '.join(f'{a:.1f}' for a, _ in halves)}s, training {', '.join(f'{b:.1f}' for _, b in halves)}s")
    print(f"streaming: median {streaming:.1f}s ({', '.join(f'{x:.1f}' for x in times['streaming'])})")
    print(f"pairs per round: staged {pairs['staged']}, streaming {pairs['streaming']}")
    print(f"ratio streaming / staged: {streaming / staged:.2f}")


if __name__ == "__main__":
    main()
