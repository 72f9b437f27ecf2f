"""Weighted pairwise preference losses (docs/DESIGN.md).

One entry point, `preference_loss`, computes any base loss (dpo, cdpo, robust, hinge, ipo, dpop,
simpo; and sft, the supervised baseline: the chosen response's per-token NLL) with the three plug-ins of this project composed on top:

- a per-pair difficulty weight w (Ma et al.), placed on the reward margin (`f(w·Δ − m)`) or on the
  loss (`w · f(Δ − m)`);
- FocalPO's modulating factor p^γ_f with p = σ(z), z the logit inside the sigmoid;
- γ-PO per-pair target margins m_i, computed from detached reward gaps by `GammaPOMargins`;
- RPO's NLL term on the chosen response (`nll_weight`), for any preference base.

Everything here is pure torch and Ray-free. Inputs are [B] tensors of *summed* log-probs over the
response tokens, so one pair is one entry; nothing loops over pairs in Python.

Typical use in a training step:

    gaps = reward_gaps(cfg, pol_c, pol_r, ref_c, ref_r, len_c, len_r, w)   # only with γ-PO
    margins = gamma_po(gaps) if cfg.gamma_po.enabled else None
    out = preference_loss(cfg, pol_c, pol_r, ref_c, ref_r, len_c, len_r, w, margins)
    out.loss.backward()
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # only for annotations: the loss code imports with torch alone (bench/gpu_step.py)
    from wpo_ray.config import GammaPOConfig, LossConfig

Tensor = torch.Tensor

# A gather hook takes this rank's detached gaps [b] and returns (every rank's gaps concatenated in
# rank order, the index where this rank's gaps start in it).
GatherFn = Callable[[Tensor], "tuple[Tensor, int]"]


@dataclass
class LossOutput:
    loss: Tensor  # scalar, = losses.mean()
    losses: Tensor  # [B] per-pair losses, weight already applied per placement
    metrics: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------- validation


def _check_inputs(cfg: LossConfig, named: dict[str, Optional[Tensor]]) -> int:
    """Shapes, finiteness, and sign checks; returns the batch size B."""
    if cfg.needs_reference:
        missing = [n for n in ("ref_chosen_logps", "ref_rejected_logps") if named[n] is None]
        if missing:
            raise ValueError(
                f"base {cfg.base!r} needs reference log-probs; got None for {', '.join(missing)}"
            )
    present = {n: t for n, t in named.items() if t is not None}
    for name, t in present.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    shapes = {n: tuple(t.shape) for n, t in present.items()}
    first = shapes["policy_chosen_logps"]
    if len(first) != 1 or first[0] == 0:
        raise ValueError(f"policy_chosen_logps must be a non-empty [B] tensor, got shape {first}")
    bad = {n: s for n, s in shapes.items() if s != first}
    if bad:
        raise ValueError(
            f"every input must have shape {first} (policy_chosen_logps); mismatched: "
            + ", ".join(f"{n} {s}" for n, s in bad.items())
        )
    # One host sync for all counts: NaN/inf must never reach an optimizer step.
    device = present["policy_chosen_logps"].device
    names = list(present)
    counts = torch.stack(
        [(~torch.isfinite(present[n])).sum().to(device) for n in names]
        + [(present["weights"] < 0).sum().to(device)]
    ).tolist()
    nonfinite = [f"{n} ({c} non-finite)" for n, c in zip(names, counts[:-1]) if c]
    if nonfinite:
        raise ValueError("non-finite values (NaN/inf) in loss inputs: " + ", ".join(nonfinite))
    if counts[-1]:
        raise ValueError(f"weights must be >= 0; {counts[-1]} negative entries")
    if cfg.base in ("ipo", "simpo", "sft") or cfg.nll_weight > 0:  # these divide by the response length
        for n in ("chosen_lengths", "rejected_lengths"):
            k = int((present[n] <= 0).sum())
            if k:
                raise ValueError(f"{n} must be > 0 for base {cfg.base!r}; {k} entries are <= 0")
    return first[0]


# ---------------------------------------------------------------------------- margins and losses


def _rewards(cfg: LossConfig, pc, pr, rc, rr, lc, lr) -> tuple[Tensor, Tensor, Tensor]:
    """Implicit rewards of chosen and rejected, and the reward margin Δ (before w and targets)."""
    b = cfg.beta
    if cfg.base == "sft":  # no reward: per-token log-probs, so Δ still says which is ranked first
        chosen, rejected = pc / lc, pr / lr
    elif cfg.base == "simpo":  # length-normalised, reference-free
        chosen, rejected = b * pc / lc, b * pr / lr
    elif cfg.base == "ipo":  # per-token log-ratios, no β (β sets IPO's target 1/(2β) instead)
        chosen, rejected = (pc - rc) / lc, (pr - rr) / lr
    else:
        chosen, rejected = b * (pc - rc), b * (pr - rr)
    delta = chosen - rejected
    if cfg.base == "dpop":  # DPO-Positive: penalise the chosen log-prob falling below the reference
        delta = delta - b * cfg.dpop_lambda * torch.relu(rc - pc)
    return chosen, rejected, delta


def _base_loss(cfg: LossConfig, z: Tensor) -> Tensor:
    """f(z) per pair; z is the final logit, weight and target margin already applied."""
    eps = cfg.label_smoothing
    if cfg.base in ("dpo", "dpop", "simpo"):
        return -F.logsigmoid(z)
    if cfg.base == "cdpo":  # conservative DPO: the label is flipped with probability ε
        return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    if cfg.base == "robust":  # unbiased under label noise ε (Chowdhury et al.)
        return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    if cfg.base == "hinge":
        return torch.relu(1 - z)
    if cfg.base == "ipo":
        return (z - 1 / (2 * cfg.beta)) ** 2
    raise ValueError(f"unknown loss base {cfg.base!r}")


def _target_margin(cfg: LossConfig, margins: Optional[Tensor]) -> Tensor | float:
    """What is subtracted from the (weighted) margin before f."""
    if cfg.base == "simpo":  # γ-PO's m_i replaces SimPO's fixed γ
        return cfg.simpo_gamma if margins is None else margins.detach()
    if margins is None:
        return 0.0
    if cfg.base == "ipo":  # an input error: the config refuses gamma_po for it (config.MARGIN_BASES)
        raise ValueError(f"γ-PO margins are undefined for base {cfg.base!r}: it regresses the margin to a "
                         "fixed value; γ-PO needs a base with a target margin")
    # DPO-style bases have no target margin of their own: use the zero-mean offset m_i − γ0.
    return margins.detach() - cfg.gamma_po.ratio * cfg.beta


def _as_float(t: Tensor, like: Tensor) -> Tensor:
    # At least float32: bf16 sums of log-probs and lengths > 256 lose too much precision.
    dtype = torch.promote_types(like.dtype, torch.float32)
    return t.to(dtype=dtype, device=like.device)


def _prepare(cfg: LossConfig, pc, pr, rc, rr, lc, lr, w, margins):
    """Validate the inputs (shapes, finiteness) and cast them to a common float dtype. Which
    base / plug-in combinations are defined is LossConfig's rule, checked when it is built."""
    _check_inputs(
        cfg,
        {
            "policy_chosen_logps": pc,
            "policy_rejected_logps": pr,
            "ref_chosen_logps": rc if cfg.needs_reference else None,
            "ref_rejected_logps": rr if cfg.needs_reference else None,
            "chosen_lengths": lc,
            "rejected_lengths": lr,
            "weights": w,
            "margins": margins,
        },
    )
    cast = lambda t: None if t is None else _as_float(t, pc)  # noqa: E731
    refs = (cast(rc), cast(rr)) if cfg.needs_reference else (None, None)
    return (cast(pc), cast(pr), *refs, cast(lc), cast(lr), cast(w), cast(margins))


def preference_loss(
    cfg: LossConfig,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Optional[Tensor],
    ref_rejected_logps: Optional[Tensor],
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    weights: Tensor,
    margins: Optional[Tensor] = None,
) -> LossOutput:
    """Weighted preference loss over B pairs; see the module docstring and docs/DESIGN.md."""
    pc, pr, rc, rr, lc, lr, w, margins = _prepare(
        cfg, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
        chosen_lengths, rejected_lengths, weights, margins,
    )
    chosen, rejected, delta = _rewards(cfg, pc, pr, rc, rr, lc, lr)
    on_margin = cfg.weight_placement == "margin" and cfg.base != "sft"
    if cfg.base == "sft":  # the chosen response's per-token NLL; the rejected one is not trained on
        z, losses = delta, -chosen
    else:
        z = (w * delta if on_margin else delta) - _target_margin(cfg, margins)
        losses = _base_loss(cfg, z)

    factor = None
    if cfg.focal.gamma > 0:
        # FocalPO: scale by p^γ, p = σ(z); exp(γ·logσ(z)) stays finite where σ(z) underflows.
        factor = torch.exp(cfg.focal.gamma * F.logsigmoid(z))
        if cfg.focal.detach:
            factor = factor.detach()
        losses = losses * factor
    if cfg.nll_weight > 0:  # RPO: keep the chosen response likely while the margin grows
        losses = losses + cfg.nll_weight * (-pc / lc)
    if not on_margin:
        losses = w * losses
    loss = losses.mean()

    with torch.no_grad():
        stats = {
            "loss": loss,
            "rewards/chosen": chosen.mean(),
            "rewards/rejected": rejected.mean(),
            "rewards/margin": delta.mean(),
            "rewards/accuracy": (delta > 0).to(delta.dtype).mean(),
            "weight/mean": w.mean(),
            "weight/max": w.max(),
            "weight/min": w.min(),
        }
        if margins is not None:
            stats["gamma_po/margin_mean"] = margins.mean()
            stats["gamma_po/margin_std"] = margins.std(unbiased=False)  # B = 1 gives 0, not NaN
        if factor is not None:
            stats["focal/factor_mean"] = factor.mean()
        values = torch.stack([v.detach().to(delta.dtype) for v in stats.values()]).tolist()
    return LossOutput(loss=loss, losses=losses, metrics=dict(zip(stats, values)))


def reward_gaps(cfg: LossConfig, pc: Tensor, pr: Tensor, rc: Optional[Tensor], rr: Optional[Tensor], lc: Tensor,
                lr: Tensor, w: Tensor) -> Tensor:
    """Detached gaps r_i that γ-PO sets margins from: the term the target margin is subtracted
    from, i.e. w·Δ under margin placement and Δ under loss placement. Shape [B]. The arguments
    are preference_loss's, in its order (policy / reference chosen and rejected, lengths, weights)."""
    with torch.no_grad():
        pc, pr, rc, rr, lc, lr, w, _ = _prepare(cfg, pc, pr, rc, rr, lc, lr, w, None)
        _, _, delta = _rewards(cfg, pc, pr, rc, rr, lc, lr)
        if cfg.weight_placement == "margin":
            delta = w * delta
        return delta.detach()


# ------------------------------------------------------------------------------------------ γ-PO


@torch.no_grad()
def gamma_po_margins(gaps: Tensor, gamma0: float, tau: float, steps: int = 20) -> Tensor:
    """γ-PO target margins for a pool of reward gaps r [B] (Sun et al., arXiv 2506.03690).

    Exponentiated gradient on the simplex, from uniform p: m = γ0·B·p,
    g = τ(1 + log(B·p)) + γ0·σ(m − r), p ← p·exp(−η g)/Σ, η = min(0.5/τ, 1). Larger gaps end with
    larger p, hence larger margins; τ is the KL pull to uniform (τ → ∞ gives m_i = γ0). The mean
    margin is γ0 exactly, because Σ p = 1.
    """
    if gaps.dim() != 1 or gaps.numel() == 0:
        raise ValueError(f"gaps must be a non-empty [B] tensor, got shape {tuple(gaps.shape)}")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    n_bad = int((~torch.isfinite(gaps)).sum())
    if n_bad:
        raise ValueError(f"gaps has {n_bad} non-finite entries (NaN/inf)")
    r = gaps.detach().to(torch.float64)  # tiny vector: float64 costs nothing and avoids drift
    B = r.numel()
    log_b = math.log(B)
    eta = min(0.5 / tau, 1.0)
    log_p = torch.full_like(r, -log_b)
    for _ in range(steps):  # over EG steps, not over pairs
        m = gamma0 * B * log_p.exp()
        g = tau * (1 + log_b + log_p) + gamma0 * torch.sigmoid(m - r)
        log_p = log_p - eta * g
        log_p = log_p - torch.logsumexp(log_p, 0)  # renormalise in log space
    return (gamma0 * B * log_p.exp()).to(gaps.dtype)


def _identity_gather(gaps: Tensor) -> tuple[Tensor, int]:
    return gaps, 0


class GammaPOMargins:
    """Stateful γ-PO: pools this step's gaps (from every data-parallel rank, via `gather_fn`) with
    the most recent gaps of a FIFO queue, and returns this rank's margins.

    `gather_fn(gaps) -> (all_gaps, start)`: every rank's detached gaps concatenated in rank order,
    and where this rank's slice starts. Default: single process, `(gaps, 0)`. With a gather across
    ranks every rank sees the same pool and so the same margins; `dist_gather_fn()` builds one.
    """

    def __init__(self, cfg: GammaPOConfig, beta: float, gather_fn: Optional[GatherFn] = None):
        self.cfg = cfg
        self.gamma0 = cfg.ratio * beta
        self.gather_fn = gather_fn or _identity_gather
        self.queue = torch.empty(0)  # oldest first

    def __call__(self, gaps: Tensor) -> Tensor:
        gaps = gaps.detach()
        if gaps.dim() != 1 or gaps.numel() == 0:
            raise ValueError(f"gaps must be a non-empty [b] tensor, got shape {tuple(gaps.shape)}")
        gathered = self.gather_fn(gaps)
        if not (isinstance(gathered, tuple) and len(gathered) == 2):
            raise ValueError("gather_fn must return (all_gaps, start_index)")
        all_gaps, start = gathered
        all_gaps, b = all_gaps.detach(), gaps.numel()
        if not 0 <= start <= all_gaps.numel() - b or not torch.equal(
            all_gaps[start : start + b].to(gaps), gaps
        ):
            raise ValueError(
                f"gather_fn returned start={start} for {all_gaps.numel()} gathered gaps, "
                f"which is not where this rank's {b} gaps are"
            )
        queue = self.queue.to(device=all_gaps.device, dtype=all_gaps.dtype)
        k = max(0, min(self.cfg.pool_size - all_gaps.numel(), queue.numel()))
        pool = torch.cat([all_gaps, queue[queue.numel() - k :]])
        margins = gamma_po_margins(pool, self.gamma0, self.cfg.tau, self.cfg.steps)
        # FIFO: append the newest, keep the last queue_size.
        queue = torch.cat([queue, all_gaps])
        self.queue = queue[max(0, queue.numel() - self.cfg.queue_size) :]
        return margins[start : start + b].to(gaps)

    def state_dict(self) -> dict[str, Tensor]:
        return {"queue": self.queue.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        q = torch.as_tensor(state["queue"]).detach().flatten()
        self.queue = q[max(0, q.numel() - self.cfg.queue_size) :].clone()


def dist_gather_fn(group=None) -> GatherFn:
    """A gather hook over torch.distributed (any backend): all-gathers each rank's gaps, which
    may differ in length, and returns (concatenation in rank order, this rank's start index)."""
    import torch.distributed as dist

    def gather(gaps: Tensor) -> tuple[Tensor, int]:
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        n = torch.tensor([gaps.numel()], device=gaps.device)
        sizes = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(sizes, n, group=group)
        sizes = [int(s) for s in sizes]
        padded = torch.zeros(max(sizes), dtype=gaps.dtype, device=gaps.device)
        padded[: gaps.numel()] = gaps
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([p[:s] for p, s in zip(parts, sizes)]), sum(sizes[:rank])

    return gather
