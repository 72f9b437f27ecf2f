"""RefLogpActor: the reference model in a Ray Data actor pool; adds ref_chosen_logp / ref_rejected_logp.

Precomputing reference log-probs here keeps the trainer holding the policy only. The forward is
the training step's own (`wpo_ray.step`), so reference and policy log-probs are computed alike.
"""

from __future__ import annotations

import pyarrow as pa
import torch

from wpo_ray.cluster import log_placement
from wpo_ray.generation import load_hf_policy
from wpo_ray.integrity import verify_policy_dir
from wpo_ray.logs import setup_worker_logging
from wpo_ray.step import encode_batch, model_device, reference_logps


class RefLogpActor:
    def __init__(self, model_path: str, dtype: str = "float32", trust_remote_code: bool = False,
                 max_length: int = 512, micro_batch_size: int = 16, threads: int = 1, use_gpu: bool = False):
        torch.set_num_threads(threads)  # the CPUs the actor reserved (train.reference.num_cpus_per_actor)
        setup_worker_logging()
        log_placement("ref-logp")
        verify_policy_dir(model_path)
        # On a GPU actor Ray sets CUDA_VISIBLE_DEVICES to its GPU: that is cuda:0 here.
        device = "cuda" if use_gpu else "cpu"
        self.model, self.tokenizer = load_hf_policy(model_path, dtype, trust_remote_code, device=device)
        self.max_length, self.micro = max_length, micro_batch_size

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
