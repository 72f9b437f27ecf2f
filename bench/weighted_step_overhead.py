"""Overhead of the difficulty-weighted loss on a whole training step (pure torch, no Ray).

One training step = forward of [chosen; rejected] through a tiny Llama (`wpo_ray.batching`),
the loss, backward, AdamW step, zero_grad. Three variants, each with its own copy of the same
initial model and its own optimizer, on the same pre-collated batches:

  plain   unweighted DPO written inline: -F.logsigmoid(beta*((pc-rc)-(pr-rr))).mean()
  margin  wpo_ray.losses.preference_loss, dpo, weight_placement=margin  (f(w·Δ))
  loss    wpo_ray.losses.preference_loss, dpo, weight_placement=loss    (w·f(Δ))

Steps are interleaved (plain, margin, loss, then rotated) so machine drift hits all variants
alike; the figure is the median step time. Inputs are built as the training worker builds them
(reference log-probs and weights as float64 tensors). A second, loss-only micro-benchmark times
just loss + backward on [B] tensors to show where any difference comes from.

    .venv/bin/python bench/weighted_step_overhead.py [--hidden 128 --layers 2 --batch 8 --reps 300]

Target: weighted/plain <= 1.02 for both placements.
"""

from __future__ import annotations

import argparse
import copy
import time

from _common import build_model, header, median, n_params, reference_batches


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="pairs per step (train.micro_batch_size)")
    ap.add_argument("--reps", type=int, default=300, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=20, help="untimed steps per variant first")
    ap.add_argument("--loss-reps", type=int, default=2000, help="reps of the loss-only micro-benchmark")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    from wpo_ray.losses import preference_loss  # the loss-only micro-benchmark below the step
    from wpo_ray.step import pair_logps, pair_loss
    from wpo_ray.config import LossConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    header("weighted training step vs plain DPO step (pure torch)", vars(args))

    base, tok = build_model(args.hidden, args.layers, seed=args.seed)
    base.train()
    print(f"model: tiny Llama hidden={args.hidden} layers={args.layers} params={n_params(base)/1e6:.2f}M")

    # Pre-collated batches (tokenising is not part of what is compared) and fixed reference log-probs.
    n_batches = 16
    batches = reference_batches(base, tok, n_batches, args.batch, seed=args.seed)

    cfgs = {"margin": LossConfig(base="dpo", beta=args.beta, weight_placement="margin"),
            "loss": LossConfig(base="dpo", beta=args.beta, weight_placement="loss")}
    beta = args.beta

    def plain_loss(pc, pr, lc, lr, b):  # the baseline: a hand-written unweighted DPO loss
        return -F.logsigmoid(beta * ((pc - b["rc"]) - (pr - b["rr"]))).mean()

    def plain_step(model, b):  # the same forward as the training step, then the baseline loss
        lp = pair_logps(model, b["coll"])
        return plain_loss(lp.chosen, lp.rejected, lp.chosen_lengths, lp.rejected_lengths, b)

    def weighted(name):
        cfg = cfgs[name]

        def step_fn(model, b):  # the training step itself
            return pair_loss(model, b["coll"], cfg, b["w"], b["rc"], b["rr"]).loss

        def loss_fn(pc, pr, lc, lr, b):
            return preference_loss(cfg, pc, pr, b["rc"], b["rr"], lc, lr, b["w"]).loss
        return step_fn, loss_fn

    (margin_step, margin_loss), (loss_step, loss_loss) = weighted("margin"), weighted("loss")
    variants = {"plain": plain_step, "margin": margin_step, "loss": loss_step}
    losses = {"plain": plain_loss, "margin": margin_loss, "loss": loss_loss}
    models = {k: copy.deepcopy(base) for k in variants}
    opts = {k: torch.optim.AdamW(models[k].parameters(), lr=5e-4) for k in variants}
    counters = {k: 0 for k in variants}

    def step(name: str) -> float:
        model, opt, b = models[name], opts[name], batches[counters[name] % n_batches]
        counters[name] += 1
        t0 = time.perf_counter()
        loss = variants[name](model, b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    names = list(variants)
    for r in range(args.warmup):
        for k in names:
            step(k)
    times = {k: [] for k in names}
    t_all = time.perf_counter()
    for r in range(args.reps):
        order = names[r % 3 :] + names[: r % 3]  # rotate who goes first: no variant always follows another
        for k in order:
            times[k].append(step(k))
    wall = time.perf_counter() - t_all

    # Loss-only: loss + backward on [B] leaf tensors, same interleaving.
    g = torch.Generator().manual_seed(args.seed)
    B = args.batch
    pc0 = (-5 - torch.rand(B, generator=g)).requires_grad_()
    pr0 = (-5 - torch.rand(B, generator=g)).requires_grad_()
    lc0 = torch.full((B,), 3)
    b0 = batches[0]
    ltimes = {k: [] for k in names}
    for r in range(args.loss_reps + 50):
        order = names[r % 3 :] + names[: r % 3]
        for k in order:
            t0 = time.perf_counter()
            losses[k](pc0, pr0, lc0, lc0, b0).backward()
            dt = time.perf_counter() - t0
            pc0.grad = pr0.grad = None
            if r >= 50:
                ltimes[k].append(dt)

    med = {k: median(v) for k, v in times.items()}
    lmed = {k: median(v) for k, v in ltimes.items()}
    print(f"\ntimed {args.reps} steps per variant, interleaved, in {wall:.1f}s")
    print(f"{'variant':8s} {'median step ms':>15s} {'p10 ms':>8s} {'p90 ms':>8s} {'loss+bwd only us':>17s}")
    for k in names:
        s = sorted(times[k])
        print(f"{k:8s} {med[k]*1e3:15.3f} {s[len(s)//10]*1e3:8.3f} {s[len(s)*9//10]*1e3:8.3f} "
              f"{lmed[k]*1e6:17.1f}")
    print()
    for k in ("margin", "loss"):
        ratio = med[k] / med["plain"]
        extra = (lmed[k] - lmed["plain"]) * 1e6
        verdict = "MET" if ratio <= 1.02 else "MISSED"
        print(f"RATIO weighted({k})/plain step time = {ratio:.4f}  (target <= 1.02: {verdict}); "
              f"loss-only overhead {extra:+.1f} us/step = {extra/1e6/med['plain']*100:+.2f}% of a plain step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
