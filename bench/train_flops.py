"""Achieved FLOP/s of a training step, as a fraction of this CPU's measured matmul peak.

The physical limit here is the CPU: the peak is measured in the same run as the median FLOP/s of a
large fp32 `torch.matmul` (n x n by n x n, 2n^3 FLOPs) with the same torch threads. The training
step is the worker's: forward of [chosen; rejected] through a tiny Llama made large enough that
its matmuls dominate, and the weighted DPO loss (both the training step's, `wpo_ray.step.pair_loss`), backward, AdamW step. Its FLOPs are counted as
6 x (non-embedding parameters) x tokens, plus attention (12 x layers x hidden x seq^2 per
sequence, forward + backward), on every computed position (padding included: it is computed);
the useful share (non-pad tokens) is printed too.

    .venv/bin/python bench/train_flops.py [--hidden 1024 --layers 4 --batch 16 --reps 8 --n 2048]

Prints the peak, the step's achieved FLOP/s and the ratio achieved / peak.
"""

from __future__ import annotations

import argparse
import time

from _common import build_model, header, median, reference_batches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16, help="pairs per step")
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--n", type=int, default=2048, help="matmul size for the peak")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()

    import torch

    from wpo_ray.step import pair_loss
    from wpo_ray.config import LossConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    header("training-step FLOP/s vs matmul peak (fp32, CPU)", vars(args))

    # The peak: the best this CPU does on the operation that dominates training.
    a, b = torch.randn(args.n, args.n), torch.randn(args.n, args.n)
    torch.matmul(a, b)
    peaks = []
    for _ in range(5):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        peaks.append(2 * args.n**3 / (time.perf_counter() - t0))
    peak = median(peaks)
    del a, b

    model, tok = build_model(args.hidden, args.layers, seed=0)
    model.train()
    emb = sum(p.numel() for n, p in model.named_parameters() if "embed" in n or "lm_head" in n)
    dense = sum(p.numel() for p in model.parameters()) - emb
    batches = reference_batches(model, tok, 4, args.batch)
    cfg = LossConfig(base="dpo", beta=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step(i: int) -> float:
        b = batches[i % len(batches)]
        coll, rc, rr, w = b["coll"], b["rc"], b["rr"], b["w"]
        t0 = time.perf_counter()
        pair_loss(model, coll, cfg, w, rc, rr).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    step(0)  # warm-up (allocations, AdamW state)
    times = [step(i) for i in range(args.reps)]
    seqs, seq_len = batches[0]["coll"]["input_ids"].shape
    computed = seqs * seq_len
    useful = int(batches[0]["coll"]["attention_mask"].sum())
    flops = 6 * dense * computed + 12 * args.layers * args.hidden * seq_len**2 * seqs
    achieved = flops / median(times)
    print(f"model: hidden={args.hidden} layers={args.layers} non-embedding params={dense / 1e6:.1f}M "
          f"(embeddings {emb / 1e6:.2f}M)")
    print(f"step: {seqs} sequences x {seq_len} positions = {computed} computed tokens ({useful} not padding), "
          f"{flops / 1e9:.1f} GFLOP, median {median(times):.3f}s over {args.reps}")
    print(f"matmul peak ({args.n}x{args.n} fp32, {torch.get_num_threads()} threads): {peak / 1e9:.1f} GFLOP/s")
    print(f"training step achieved: {achieved / 1e9:.1f} GFLOP/s (useful tokens only: "
          f"{achieved * useful / computed / 1e9:.1f})")
    print(f"ratio achieved / peak: {achieved / peak:.2f}")


if __name__ == "__main__":
    main()
