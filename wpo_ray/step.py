"""The training step, Ray-free: a batch of pairs -> policy log-probs -> the weighted preference loss.

Every caller that turns pairs into log-probs goes through here: the DeepSpeed training worker
(`actors/train_worker.py`), the RefLogp actor (`actors/ref_logp.py`), the in-process experiment
(`experiments/weighting.py`) and the benchmarks (`bench/`). So the encoding, the masking of prompt
tokens and the device placement are the same everywhere.

    batch = encode_batch(tokenizer, prompts, chosen, rejected, max_length, device=model_device(model))
    out = pair_loss(model, batch, loss_cfg, weights, ref_chosen, ref_rejected)
    out.loss.backward()

Device rule: every tensor handed to a model is built on (or moved to) that model's device here;
the loss inputs follow the policy log-probs' device. Callers never call `.to(device)` themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch

from .batching import collate, encode_pairs, sequence_logps, split_pair_logps
from .losses import LossOutput, preference_loss, reward_gaps

if TYPE_CHECKING:  # annotations only: the step imports with torch alone (bench/gpu_step.py)
    from .config import LossConfig

Tensor = torch.Tensor


def model_device(model) -> torch.device:
    """Where a model's inputs must be: a DeepSpeed engine's or HF model's `.device`, else the
    first parameter's device."""
    device = getattr(model, "device", None)
    if device is not None:
        return torch.device(device)
    return next(model.parameters()).device


def encode_batch(tokenizer, prompts: Sequence[str], chosen: Sequence[str], rejected: Sequence[str],
                 max_length: int, prompt_ids: Sequence[str] | None = None,
                 device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """Collated [2B, L] input_ids / attention_mask / response_mask (chosen rows, then rejected) on
    `device`; see `wpo_ray.batching` for the encoding rules."""
    enc = encode_pairs(tokenizer, prompts, chosen, rejected, max_length, prompt_ids)
    return {k: v.to(device) for k, v in collate(enc, tokenizer.pad_token_id).items()}


@dataclass
class PairLogps:
    """Summed response log-probs and response lengths of a batch of B pairs, each [B]."""

    chosen: Tensor
    rejected: Tensor
    chosen_lengths: Tensor
    rejected_lengths: Tensor


def pair_logps(model, batch: dict[str, Tensor]) -> PairLogps:
    """One forward pass over chosen and rejected together, on the model's device (a batch built
    for another model, e.g. the policy's for the reference, is moved; on the same device this
    costs nothing)."""
    device = model_device(model)
    return PairLogps(*split_pair_logps(*sequence_logps(model, {k: v.to(device) for k, v in batch.items()})))


@torch.no_grad()
def reference_logps(model, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(ref_chosen, ref_rejected) summed log-probs as float64, without a graph."""
    lp = pair_logps(model, batch)
    return lp.chosen.double(), lp.rejected.double()


def as_tensor(values, like: Tensor) -> Tensor:
    """Per-pair values (a list from Arrow, or a tensor) as float64 on `like`'s device."""
    return torch.as_tensor(values, dtype=torch.float64, device=like.device)


def pair_loss(model, batch: dict[str, Tensor], loss_cfg: LossConfig, weights,
              ref_chosen=None, ref_rejected=None, ref_model=None,
              margins_fn: Optional[Callable[[Tensor], Tensor]] = None) -> LossOutput:
    """The weighted preference loss of one micro-batch (with its graph, ready for backward).

    Reference log-probs come precomputed (`ref_chosen` / `ref_rejected`, lists or tensors) or
    from `ref_model`, whose forward runs without a graph; SimPO needs neither. `margins_fn` is a
    `GammaPOMargins` (γ-PO) or None.
    """
    lp = pair_logps(model, batch)
    rc = rr = None
    if loss_cfg.needs_reference:
        if ref_model is not None:
            ref_chosen, ref_rejected = reference_logps(ref_model, batch)
        if ref_chosen is None or ref_rejected is None:
            raise ValueError(f"loss {loss_cfg.base!r} needs reference log-probs: give ref_chosen/ref_rejected "
                             "or a reference model")
        rc, rr = as_tensor(ref_chosen, lp.chosen), as_tensor(ref_rejected, lp.chosen)
    w = as_tensor(weights, lp.chosen)
    args = (lp.chosen, lp.rejected, rc, rr, lp.chosen_lengths, lp.rejected_lengths, w)
    margins = margins_fn(reward_gaps(loss_cfg, *args)) if margins_fn is not None else None
    return preference_loss(loss_cfg, *args, margins)
