"""RefLogpActor: the reference model in a Ray Data actor pool; adds ref_chosen_logp / ref_rejected_logp.

Precomputing reference log-probs here keeps the trainer holding the policy only.
"""

from __future__ import annotations

import pyarrow as pa
import torch

from wpo_ray import contracts
from wpo_ray.batching import collate, encode_pairs, sequence_logps, split_pair_logps
from wpo_ray.generation import load_hf_policy


class RefLogpActor:
    def __init__(self, model_path: str, dtype: str = "float32", trust_remote_code: bool = False,
                 max_length: int = 512, micro_batch_size: int = 16):
        torch.set_num_threads(1)  # one core per actor: the pool, not the actor, scales out
        self.model, self.tokenizer = load_hf_policy(model_path, dtype, trust_remote_code)
        self.max_length, self.micro = max_length, micro_batch_size

    @torch.no_grad()
    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        chosen, rejected = [], []
        for i in range(0, len(rows), self.micro):
            part = rows[i : i + self.micro]
            enc = encode_pairs(self.tokenizer, [r["prompt"] for r in part], [r["chosen"] for r in part],
                               [r["rejected"] for r in part], self.max_length, [r["prompt_id"] for r in part])
            logps, lengths = sequence_logps(self.model, collate(enc, self.tokenizer.pad_token_id))
            c, r, _, _ = split_pair_logps(logps, lengths)
            chosen += c.double().tolist()
            rejected += r.double().tolist()
        for name in ("ref_chosen_logp", "ref_rejected_logp"):
            if name in batch.column_names:
                batch = batch.drop_columns([name])
        batch = batch.append_column("ref_chosen_logp", pa.array(chosen, pa.float64()))
        batch = batch.append_column("ref_rejected_logp", pa.array(rejected, pa.float64()))
        return batch
