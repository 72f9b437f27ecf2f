"""The reference model: actors that add ref_chosen_logp / ref_rejected_logp to pairs.

Precomputing reference log-probs here keeps the trainer holding the policy only. The forward is
the training step's own (`wpo_ray.step`), so reference and policy log-probs are computed alike.

`ReferencePool` hosts `RefLogpActor`s for as long as its owner keeps it (the run's trainer group:
every round), so the reference model is loaded once, and again only when the round's reference
changes (`run.reference: previous`): then from the trainers' memory when the round hands the
weights over (the object ref the engines load), into the model already built, else from the
checkpoint. `actors/stages.py: ref_logp_batch` is its Ray Data stage.
"""

from __future__ import annotations

import logging

import pyarrow as pa
import torch

from wpo_ray.cluster import log_placement
from wpo_ray.failpoints import failpoint
from wpo_ray.generation import load_hf_policy
from wpo_ray.integrity import verify_policy_dir
from wpo_ray.logs import setup_worker_logging
from wpo_ray.step import encode_batch, model_device, reference_logps

log = logging.getLogger(__name__)


class RefLogpActor:
    def __init__(self, model_path: str, dtype: str = "float32", trust_remote_code: bool = False,
                 max_length: int = 512, micro_batch_size: int = 16, threads: int = 1, use_gpu: bool = False,
                 handover_timeout_s: float = 300.0):
        torch.set_num_threads(threads)  # the CPUs the actor reserved (train.reference.num_cpus_per_actor)
        setup_worker_logging()
        log_placement("ref-logp")
        # On a GPU actor Ray sets CUDA_VISIBLE_DEVICES to its GPU: that is cuda:0 here.
        self.dtype, self.trust_remote_code, self.device = dtype, trust_remote_code, "cuda" if use_gpu else "cpu"
        self.max_length, self.micro, self.handover_timeout_s = max_length, micro_batch_size, handover_timeout_s
        self._load(model_path)

    def _load(self, model_path: str, weights: list | None = None) -> None:
        """The reference at `model_path`: from `weights` ([object ref of the packed state dict,
        wpo_ray/weights.py], in a list so Ray hands the ref over unresolved) into the model held,
        when given; from the checkpoint when not, or when that fails (logged)."""
        self.loaded_from = None
        if weights is not None:
            try:
                self._load_state(model_path, weights[0])
                self.model_path, self.loaded_from = model_path, "memory"
                return
            except Exception as e:  # noqa: BLE001 - lost object, timeout, mismatch: the checkpoint has it
                log.warning("[ref-logp] in-memory hand-over of %s failed (%s: %s); loading the checkpoint",
                            model_path, type(e).__name__, e)
        verify_policy_dir(model_path)  # every file checked before it is read
        self.model, self.tokenizer = load_hf_policy(model_path, self.dtype, self.trust_remote_code, device=self.device)
        self.model_path, self.loaded_from = model_path, "checkpoint"

    def _load_state(self, model_path: str, ref) -> None:
        """Copy the handed-over tensors into the model held (same architecture: a round's policy
        is trained from the one before it), checked against the checkpoint at `model_path` first."""
        import ray

        from wpo_ray.weights import checkpoint_tensors, load_into, unpack_state

        load_into(self.model, checkpoint_tensors(unpack_state(ray.get(ref, timeout=self.handover_timeout_s)), model_path))

    def holding(self) -> tuple[str, str]:
        """(the reference held, where it came from: "memory" or "checkpoint")."""
        return self.model_path, self.loaded_from

    def logps(self, batch: pa.Table, model_path: str, weights: list | None = None) -> pa.Table:
        """The batch with reference log-probs under `model_path` (loaded first if it is not the
        model held: a new reference, from `weights` when the round handed them over, or an actor
        Ray restarted with the model it was created with)."""
        failpoint("ref_logp.logps")
        if model_path != self.model_path:
            self._load(model_path, weights)
        return self(batch)

    def __call__(self, batch: pa.Table) -> pa.Table:
        cols = batch.select(["prompt_id", "prompt", "chosen", "rejected"]).to_pydict()
        chosen, rejected = [], []
        device = model_device(self.model)
        for i in range(0, batch.num_rows, self.micro):
            part = {k: v[i : i + self.micro] for k, v in cols.items()}
            inputs = encode_batch(self.tokenizer, part["prompt"], part["chosen"], part["rejected"], self.max_length,
                                  part["prompt_id"], device=device)
            c, r = reference_logps(self.model, inputs)
            chosen += c.tolist()
            rejected += r.tolist()
        for name in ("ref_chosen_logp", "ref_rejected_logp"):
            if name in batch.column_names:
                batch = batch.drop_columns([name])
        batch = batch.append_column("ref_chosen_logp", pa.array(chosen, pa.float64()))
        return batch.append_column("ref_rejected_logp", pa.array(rejected, pa.float64()))


class ReferencePool:
    """`train.reference.num_actors` RefLogpActors, started on `model_path` and kept until `shutdown`.
    Ray restarts a dead actor as often as it dies (it holds nothing but the model, which it loads
    again) and retries the call it was in twice; the restarted actor reloads the reference each
    call names. A reference log-prob is a pure function of the model and the pair, so a retried
    batch gives what the first try would have."""

    def __init__(self, cfg, model_path: str):
        import ray

        from wpo_ray.train_plan import train_max_length

        ref = cfg.train.reference
        remote = ray.remote(num_cpus=ref.num_cpus_per_actor, num_gpus=ref.num_gpus_per_actor,
                            max_restarts=-1, max_task_retries=2)(RefLogpActor)
        self.actors = [remote.remote(model_path, cfg.model.dtype, cfg.model.trust_remote_code, train_max_length(cfg),
                                     ref.micro_batch_size, max(1, int(ref.num_cpus_per_actor)), ref.num_gpus_per_actor > 0,
                                     cfg.sampling.handover_timeout_s)
                       for _ in range(ref.num_actors)]
        self.batch_size = ref.batch_size

    def stage(self, ds, model_path: str, streamed: bool, weights: list | None = None):
        """`ds` with the reference log-probs under `model_path` added, as a lazy Ray Data stage
        (`weights`: [object ref of that model's weights] when the trainers handed them over)."""
        from actors.stages import proxy_tasks, ref_logp_batch

        return ds.map_batches(
            ref_logp_batch, fn_kwargs=dict(actors=self.actors, model_path=model_path, weights=weights),
            # Streamed: each upstream block (one sampling batch's pairs) as it comes. A fixed batch
            # size makes Ray Data hold pairs back until that many have arrived, and a round of few
            # pairs per sampling batch then reached the workers only when sampling had ended.
            # Staged: blocks too unless train.reference.batch_size says otherwise.
            batch_size=None if streamed else self.batch_size, batch_format="pyarrow", num_cpus=0,
            compute=proxy_tasks(len(self.actors)))

    def outcomes_stage(self, ds, model_path: str, weights: list | None = None):
        """Graded rows with their pairs and skips (GRADED_AND_OUTCOMES) → the same with the pairs'
        reference log-probs, as a lazy Ray Data stage: a staged round with a running pool scores its
        pairs in the execution that grades and pairs them, a block at a time."""
        from actors.stages import proxy_tasks, ref_logp_outcomes_batch

        return ds.map_batches(ref_logp_outcomes_batch,
                              fn_kwargs=dict(actors=self.actors, model_path=model_path, weights=weights),
                              batch_size=None, batch_format="pyarrow", num_cpus=0,
                              compute=proxy_tasks(len(self.actors)))

    def holding(self) -> list[tuple[str, str]]:
        """Each actor's (reference held, "memory" or "checkpoint")."""
        import ray

        return ray.get([a.holding.remote() for a in self.actors])

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
