"""Sampler actors: persistent engines (vLLM by default) and the Ray Data stage that feeds them.

`SamplerEngine` is a Ray actor that hosts one engine for the whole run, so that between rounds it
takes the new policy in place (vLLM `reload_weights`) instead of paying an engine start-up.
`SampleBatch` is the Ray Data `map_batches` callable: a thin proxy that sends each Arrow batch of
prompts to an engine and returns the batch in the `samples` contract.
"""

from __future__ import annotations

import random
import time

import pyarrow as pa

from wpo_ray import contracts
from wpo_ray.config import Config, EngineConfig, SamplingConfig
from wpo_ray.generation import Completion, make_sampler, prompt_seed


class SamplerEngine:
    def __init__(self, model_path: str, sampling: dict, seed: int, trust_remote_code: bool = False,
                 dtype: str = "float32", max_model_len: int | None = None):
        self.cfg = SamplingConfig.model_validate(sampling)
        self.sampler = make_sampler(self.cfg.backend, model_path, EngineConfig.model_validate(self.cfg.engine),
                                    seed=seed, trust_remote_code=trust_remote_code, dtype=dtype,
                                    max_model_len=max_model_len)

    def ready(self) -> bool:
        return True

    def generate(self, prompts, seeds, n, temperature, top_p, max_tokens) -> list[list[tuple]]:
        out = self.sampler.generate(prompts, seeds, n, temperature, top_p, max_tokens)
        return [[(c.text, c.logp, c.length) for c in comps] for comps in out]

    def sample(self, batch: pa.Table, round_idx: int, run_seed: int) -> pa.Table:
        rows = batch.to_pylist()
        # Empty prompts are not sampled; the pairing stage turns them into `empty_prompt` skips.
        live = [i for i, r in enumerate(rows) if (r["prompt"] or "").strip()]
        comps = self.sampler.generate(
            [rows[i]["prompt"] for i in live],
            [prompt_seed(run_seed, round_idx, rows[i]["prompt_id"]) for i in live],
            n=self.cfg.n, temperature=self.cfg.temperature, top_p=self.cfg.top_p, max_tokens=self.cfg.max_tokens,
        )
        by_row = dict(zip(live, comps))
        out = []
        for i, r in enumerate(rows):
            c = by_row.get(i, [])
            out.append({
                "prompt_id": r["prompt_id"], "round": round_idx, "prompt": r["prompt"] or "",
                "gold_answer": r.get("gold_answer"), "gold_solution": r.get("gold_solution"),
                "responses": [x.text for x in c], "response_logps": [x.logp for x in c],
                "response_lengths": [x.length for x in c],
            })
        return contracts.from_rows(out, "samples")

    def load_weights(self, path: str) -> tuple[str, float]:
        t0 = time.time()
        mode = self.sampler.load_weights(path)
        return mode, time.time() - t0


class SampleBatch:
    """Ray Data stage: forwards each batch to one of the engines (round robin from a random start)."""

    def __init__(self, engines: list, round_idx: int, run_seed: int):
        self.engines, self.round_idx, self.run_seed = engines, round_idx, run_seed
        self.next = random.randrange(len(engines))

    def __call__(self, batch: pa.Table) -> pa.Table:
        import ray

        engine = self.engines[self.next % len(self.engines)]
        self.next += 1
        return ray.get(engine.sample.remote(batch, self.round_idx, self.run_seed))


class SamplerPool:
    """The run's sampler engines, started once and reused by every round and by evaluation."""

    def __init__(self, cfg: Config, model_path: str, log=print):
        import ray

        s = cfg.sampling
        remote = ray.remote(num_cpus=s.num_cpus_per_actor, num_gpus=s.num_gpus_per_actor)(SamplerEngine)
        max_len = cfg.bootstrap.model.max_position_embeddings if cfg.model.path == "builtin:tiny" else None
        t0 = time.time()
        self.engines = [
            remote.remote(model_path, s.model_dump(), cfg.run.seed, cfg.model.trust_remote_code, cfg.model.dtype, max_len)
            for _ in range(s.num_actors)
        ]
        ray.get([e.ready.remote() for e in self.engines])
        self.model_path = model_path
        log(f"[samplers] {s.num_actors} {s.backend} engine(s) on {model_path} started in {time.time() - t0:.1f}s")

    def load_weights(self, path: str, log=print) -> list[str]:
        import ray

        if path == self.model_path:
            return []
        res = ray.get([e.load_weights.remote(path) for e in self.engines])
        self.model_path = path
        modes = [m for m, _ in res]
        how = "in place (no engine restart)" if set(modes) == {"in_place"} else "by reloading the engine"
        log(f"[samplers] new policy {path} loaded {how} in {max(t for _, t in res):.2f}s: {modes}")
        return modes

    # The Sampler protocol, so evaluation runs through the same engines.
    def generate(self, prompts, seeds, n, temperature, top_p, max_tokens) -> list[list[Completion]]:
        import ray

        k = len(self.engines)
        chunk = -(-len(prompts) // k)
        futures = [e.generate.remote(prompts[i * chunk : (i + 1) * chunk], seeds[i * chunk : (i + 1) * chunk],
                                     n, temperature, top_p, max_tokens) for i, e in enumerate(self.engines)]
        out: list[list[Completion]] = []
        for part in ray.get(futures):
            out.extend([[Completion(*c) for c in comps] for comps in part])
        return out

    def shutdown(self) -> None:
        import ray

        for e in self.engines:
            ray.kill(e)
        self.engines = []
