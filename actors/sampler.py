"""Sampler actors: persistent engines (vLLM by default) and the Ray Data stage that feeds them.

`SamplerEngine` is a Ray actor that hosts one engine for the whole run, so that between rounds it
takes the new policy in place (vLLM `reload_weights`) instead of paying an engine start-up.
`actors/stages.py: sample_batch` is the Ray Data stage that feeds them.

Engine death (a preempted node, the OOM killer): Ray restarts the engine (`sampling.max_restarts`)
and the batch it was working on goes to another engine (`call_with_failover`). Every call names
the policy it expects, so a restarted engine, which comes back with the model it was created
with, reloads the current policy before it samples. Seeds are per prompt, so a re-routed batch
gets the same samples it would have got: no prompt is lost or sampled twice.
"""

from __future__ import annotations

import logging
import time

import pyarrow as pa

from actors.stages import call_with_failover
from wpo_ray import contracts
from wpo_ray.cluster import where_am_i
from wpo_ray.config import Config, EngineConfig, SamplingConfig
from wpo_ray.failpoints import failpoint
from wpo_ray.generation import Completion, make_sampler, prompt_seed
from wpo_ray.integrity import verify_policy_dir
from wpo_ray.logs import setup_worker_logging
from wpo_ray.train_plan import model_max_length

log = logging.getLogger(__name__)


class SamplerEngine:
    def __init__(self, model_path: str, sampling: dict, seed: int, trust_remote_code: bool = False,
                 dtype: str = "float32", max_model_len: int | None = None, sleep_mode: bool = False):
        setup_worker_logging()
        verify_policy_dir(model_path)
        self.cfg = SamplingConfig.model_validate(sampling)
        self.sampler = make_sampler(self.cfg.backend, model_path, EngineConfig.model_validate(self.cfg.engine),
                                    seed=seed, trust_remote_code=trust_remote_code, dtype=dtype,
                                    max_model_len=max_model_len, sleep_mode=sleep_mode)
        self.policy = model_path

    def ready(self) -> dict:
        """Up; where (the run records each stage's placement); and whether it can sleep."""
        return {**where_am_i(), "can_sleep": self.sampler.can_sleep, "why_not_sleep": self.sampler.why_not_sleep}

    def sleep(self, level: int) -> None:
        self.sampler.sleep(level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.sampler.wake_up(tags)

    def _ensure_policy(self, policy: str | None) -> None:
        if policy is not None and policy != self.policy:
            log.info("[sampler] engine has %s, loading %s (restarted?)", self.policy, policy)
            self.load_weights(policy)

    def generate(self, prompts, seeds, n, temperature, top_p, max_tokens, policy: str | None = None) -> list[list[tuple]]:
        self._ensure_policy(policy)
        failpoint("sampler.generate")
        out = self.sampler.generate(prompts, seeds, n, temperature, top_p, max_tokens)
        return [[(c.text, c.logp, c.length) for c in comps] for comps in out]

    def sample(self, batch: pa.Table, round_idx: int, run_seed: int, policy: str | None = None) -> pa.Table:
        self._ensure_policy(policy)
        failpoint("sampler.sample")
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

    def load_weights(self, path: str, weights: list | None = None) -> tuple[str, float]:
        """The policy at `path`, taken from `weights` when given, else read from the checkpoint.
        `weights` is [an object ref of the packed state dict (wpo_ray/weights.py)], wrapped in a
        list so that Ray does not resolve it before this call can time it out. A hand-over that
        fails, times out or does not match the checkpoint reads the checkpoint instead."""
        import ray

        t0 = time.time()
        mode = None
        if weights is not None:
            try:
                from wpo_ray.weights import checkpoint_tensors, unpack_state

                state = unpack_state(ray.get(weights[0], timeout=self.cfg.handover_timeout_s))
                mode = self.sampler.load_state(checkpoint_tensors(state, path))
            except Exception as e:  # noqa: BLE001 - lost object, timeout, engine refusal: the checkpoint has it
                log.warning("[sampler] in-memory hand-over of %s failed (%s: %s); loading the checkpoint", path,
                            type(e).__name__, e)
        if mode is None:
            verify_policy_dir(path)  # a round's checkpoint: every file checked before the engine reads it
            mode = self.sampler.load_weights(path)
        self.policy = path
        return mode, time.time() - t0


class SamplerPool:
    """The run's sampler engines, started once and reused by every round and by evaluation."""

    def __init__(self, cfg: Config, model_path: str):
        import ray

        from wpo_ray.colocation import engine_gpus

        s = cfg.sampling
        # max_task_retries=0: a call on a dead engine fails at once and call_with_failover
        # re-routes it, rather than waiting for this engine's restart (a vLLM start is minutes).
        remote = ray.remote(num_cpus=s.num_cpus_per_actor, num_gpus=engine_gpus(cfg),
                            resources=dict(s.resources_per_actor), max_restarts=s.max_restarts,
                            max_task_retries=0)(SamplerEngine)
        self.failover_timeout_s = s.failover_timeout_s
        max_len = model_max_length(cfg)
        sleep_mode = cfg.run.placement == "colocated"
        t0 = time.time()
        self.engines = [
            remote.remote(model_path, s.model_dump(), cfg.run.seed, cfg.model.trust_remote_code, cfg.model.dtype,
                          max_len, sleep_mode)
            for _ in range(s.num_actors)
        ]
        ready = ray.get([e.ready.remote() for e in self.engines])
        self.placement = [{"node_id": r["node_id"], "ip": r["ip"]} for r in ready]  # one per engine
        self.can_sleep = all(r["can_sleep"] for r in ready)
        self.why_not_sleep = next((r["why_not_sleep"] for r in ready if not r["can_sleep"]), "")
        self.model_path = model_path
        log.info("[samplers] %d %s engine(s) on %s started in %.1fs", s.num_actors, s.backend, model_path,
                 time.time() - t0)

    def sleep(self, level: int) -> None:
        """Every engine frees its GPU (colocated placement, before training)."""
        import ray

        t0 = time.time()
        ray.get([e.sleep.remote(level) for e in self.engines])
        log.info("[samplers] engines asleep (level %d) in %.2fs", level, time.time() - t0)

    def wake_up(self, tags: list[str]) -> None:
        import ray

        t0 = time.time()
        ray.get([e.wake_up.remote(tags) for e in self.engines])
        log.info("[samplers] engines woke %s in %.2fs", "+".join(tags), time.time() - t0)

    def load_weights(self, path: str, weights=None) -> list[str]:
        """Every engine takes the policy at `path`; `weights`: an object ref of the same weights in
        memory (a trainer group's hand-over), which the engines load instead of the files."""
        import ray

        if path == self.model_path:
            return []
        from ray.exceptions import RayActorError

        refs = [e.load_weights.remote(path, None if weights is None else [weights]) for e in self.engines]
        res = []
        for i, ref in enumerate(refs):
            try:
                res.append(ray.get(ref))
            except RayActorError as e:  # it loads the policy its next call names (_ensure_policy)
                log.warning("[samplers] engine %d is dead or restarting (%s); it loads %s on its next call", i,
                            type(e).__name__, path)
                res.append(("deferred", 0.0))
        self.model_path = path
        modes = [m for m, _ in res]
        missed = [i for i, m in enumerate(modes) if m not in ("in_memory", "deferred")]
        if weights is not None and missed:
            log.warning("[samplers] the in-memory hand-over failed on engine(s) %s (their log says why); they "
                        "loaded %s from the checkpoint instead", missed, path)
        how = {"in_memory": "from the trainers' memory", "in_place": "in place from the checkpoint"}.get(
            modes[0] if len(set(modes)) == 1 else "", "by reloading the engine")
        log.info("[samplers] new policy %s loaded %s in %.2fs: %s", path, how, max(t for _, t in res), modes)
        return modes

    # The Sampler protocol, so evaluation runs through the same engines.
    def generate(self, prompts, seeds, n, temperature, top_p, max_tokens) -> list[list[Completion]]:
        from concurrent.futures import ThreadPoolExecutor

        k = len(self.engines)
        chunk = -(-len(prompts) // k)

        def part(i: int):
            sl = slice(i * chunk, (i + 1) * chunk)
            return call_with_failover(
                self.engines, i, lambda e: e.generate.remote(prompts[sl], seeds[sl], n, temperature, top_p,
                                                             max_tokens, self.model_path),
                f"generating {len(prompts[sl])} prompts", self.failover_timeout_s)

        with ThreadPoolExecutor(k) as ex:  # one chunk per engine, in parallel
            parts = list(ex.map(part, range(k)))
        return [[Completion(*c) for c in comps] for p in parts for comps in p]

    def shutdown(self) -> None:
        import ray

        for e in self.engines:
            ray.kill(e)
        self.engines = []
