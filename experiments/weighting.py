"""Uniform vs difficulty-weighted preference training at equal compute (Ma et al., arXiv 2412.20996).

What it measures: held-out greedy accuracy on the built-in arithmetic task (overall and per
difficulty bucket easy/medium/hard) after one round of preference training from the same
bootstrapped tiny policy, for each loss cell (DPO with the weight on the margin or on the loss,
IPO, SimPO, DPOP, DPO+FocalPO, DPO+γ-PO margins, DPO+FocalPO+γ-PO), each trained twice: with the
pairs' difficulty weights and with weight 1.0. Both variants of a cell see the same pairs, in the
same shuffled order, for the same number of optimizer steps of the same batch size, from the same
initial weights and torch seed: the weight is the only difference. The bootstrapped policy's own
accuracy is reported as the starting point.

How, per seed: sample sampling.n answers per train prompt from the initial policy (transformers
sampler, per-prompt seeds from the experiment seed), grade them, build pairs with
`wpo_ray.pairing.build_pairs` (config's `weighting`), compute reference log-probs once with the
initial policy, then train each cell in-process with plain torch AdamW and the training step the
DeepSpeed workers run (`wpo_ray.step`: encode_batch / pair_loss, γ-PO margins from
`GammaPOMargins`). One optimizer step takes num_workers x micro_batch_size x grad_accum pairs
and the run takes `optimizer_steps(n_pairs, cfg)` steps, i.e. what the DeepSpeed workers would do
(gradients averaged over ranks = mean over the global micro-batch; γ-PO pools every rank's gaps),
with the workers' LR schedule (`wpo_ray.train_plan.lr_scheduler`) and gradient clipping. The pairs are
reshuffled every epoch with a generator seeded by the experiment seed (the real workers read fixed
prompt-id-ordered shards), identically for every cell and variant. A uniform run whose loss cannot
depend on the weight placement (w = 1) is trained once and reported under both DPO cells.

Limits: a single in-process trainer, not the Ray/DeepSpeed pipeline (same loss code, not the same
engine); a tiny character-level model on a synthetic task; one round (no resampling from the
updated policy); every cell shares the config's β, lr and steps (not each method's tuned values);
a few seeds only, so read the spread before the means. The policy is bootstrapped once (config's
run.seed); the experiment seed varies the samples (hence the pairs), the order and the torch seed.
With the tiny config (β = 0.1, γ-PO τ = 10) the reward gaps stay small and the γ-PO margins barely
vary (the JSON's gamma_po_margin_std), so γ-PO cells train almost exactly like their base.

    .venv/bin/python experiments/weighting.py [--seeds 0,1,2] [--cells dpo,dpop] \\
        [--overrides train.lr=5e-5 data.arithmetic.n_train=128] [--out experiments/results/weighting.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from wpo_ray import contracts
from wpo_ray.arithmetic import BUCKETS, make_split
from wpo_ray.bootstrap import resolve_policy
from wpo_ray.config import load_config
from wpo_ray.evaluation import evaluate
from wpo_ray.generation import HFSampler, load_hf_policy, prompt_seed
from wpo_ray.graders import get_grader
from wpo_ray.losses import GammaPOMargins
from wpo_ray.pairing import build_pairs
from wpo_ray.rundir import atomic_write_text
from wpo_ray.step import encode_batch, pair_loss, reference_logps
from wpo_ray.train_plan import lr_scheduler, optimizer_steps, train_max_length

ROOT = Path(__file__).resolve().parents[1]

FOCAL_GAMMA = 0.05  # a small γ_f, the regime FocalPO runs in (override with --focal-gamma)
# cell -> (base, weight placement, FocalPO on, γ-PO on)
CELLS = {
    "dpo": ("dpo", "margin", False, False),
    "dpo-wloss": ("dpo", "loss", False, False),
    "ipo": ("ipo", "margin", False, False),
    "simpo": ("simpo", "margin", False, False),
    "dpop": ("dpop", "margin", False, False),
    "dpo+focal": ("dpo", "margin", True, False),
    "dpo+gammapo": ("dpo", "margin", False, True),
    "dpo+focal+gammapo": ("dpo", "margin", True, True),
}
VARIANTS = ("uniform", "weighted")


def cell_overrides(name: str, focal_gamma: float) -> list[str]:
    base, placement, focal, gpo = CELLS[name]
    return [f"train.loss.base={base}", f"train.loss.weight_placement={placement}",
            f"train.loss.focal.gamma={focal_gamma if focal else 0}", f"train.loss.gamma_po.enabled={str(gpo).lower()}"]


def make_pairs(cfg, sampler, grader, rows, seed):
    """Sample, grade and pair the train prompts; per-prompt seeds depend on the experiment seed."""
    s = cfg.sampling
    seeds = [prompt_seed(seed, 1, r["prompt_id"]) for r in rows]
    comps = sampler.generate([r["prompt"] for r in rows], seeds, s.n, s.temperature, s.top_p, s.max_tokens)
    flat = [c.text for cs in comps for c in cs]
    grades = grader.grade_many(flat, [r["gold_answer"] for r, cs in zip(rows, comps) for _ in cs])
    graded, k = [], 0
    for r, cs in zip(rows, comps):
        g = grades[k : k + len(cs)]
        k += len(cs)
        graded.append({**{c: r[c] for c in ("prompt_id", "prompt", "gold_answer", "gold_solution")}, "round": 1,
                       "responses": [c.text for c in cs], "response_logps": [c.logp for c in cs],
                       "response_lengths": [c.length for c in cs], "verdicts": [x.verdict for x in g],
                       "extracted": [x.extracted for x in g], "grade_notes": [x.note for x in g]})
    pairs, skips = build_pairs(contracts.from_rows(graded, "graded"), 1, cfg.weighting)
    return pairs.to_pylist(), skips.column("reason").to_pylist()


def encoded(tok, pairs: list[dict], idx: list[int], max_length: int) -> dict:
    """The training step's batch of the pairs at `idx`."""
    part = [pairs[i] for i in idx]
    return encode_batch(tok, [p["prompt"] for p in part], [p["chosen"] for p in part], [p["rejected"] for p in part],
                        max_length, [p["prompt_id"] for p in part])


def pairs_reference_logps(model, tok, pairs: list[dict], max_length: int, chunk: int = 64):
    ref = [reference_logps(model, encoded(tok, pairs, list(range(i, min(i + chunk, len(pairs)))), max_length))
           for i in range(0, len(pairs), chunk)]
    return torch.cat([c for c, _ in ref]), torch.cat([r for _, r in ref])


def train(cfg, loss_cfg, init_model, tok, pairs, max_length, ref, weights, seed):
    """One in-process run; returns (trained model, metrics). Order and init depend only on `seed`."""
    t = cfg.train
    torch.manual_seed(seed)
    model = copy.deepcopy(init_model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.deepspeed.weight_decay)
    total = optimizer_steps(len(weights), cfg)
    sched = lr_scheduler(cfg, total)(opt)  # the DeepSpeed workers' schedule
    margins_fn = GammaPOMargins(loss_cfg.gamma_po, loss_cfg.beta) if loss_cfg.gamma_po.enabled else None
    chunk = t.num_workers * t.micro_batch_size  # one micro-step of every rank together
    per_epoch = len(weights) // t.num_workers // t.micro_batch_size // t.grad_accum  # as optimizer_steps does
    gen = torch.Generator().manual_seed(seed)
    losses, accs, spread, step = [], [], [], 0
    while step < total:
        order = torch.randperm(len(weights), generator=gen).tolist()
        for s in range(per_epoch):
            if step >= total:
                break
            opt.zero_grad(set_to_none=True)
            for a in range(t.grad_accum):
                idx = order[(s * t.grad_accum + a) * chunk : (s * t.grad_accum + a + 1) * chunk]
                out = pair_loss(model, encoded(tok, pairs, idx, max_length), loss_cfg, weights[idx], ref[0][idx],
                                ref[1][idx], margins_fn=margins_fn)
                (out.loss / t.grad_accum).backward()
                losses.append(out.metrics["loss"])
                accs.append(out.metrics["rewards/accuracy"])
                spread.append(out.metrics.get("gamma_po/margin_std", 0.0))
            if t.deepspeed.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.deepspeed.grad_clip)
            opt.step()
            sched.step()
            step += 1
    model.eval()
    k = max(1, len(losses) // 10)  # first / last tenth of the micro-steps
    return model, {"steps": step, "loss_first": statistics.fmean(losses[:k]),
                   "loss_last": statistics.fmean(losses[-k:]), "reward_acc_last": statistics.fmean(accs[-k:]),
                   "gamma_po_margin_std": statistics.fmean(spread) if margins_fn is not None else None}


def mean_std(xs: list[float]) -> str:
    if not xs:
        return "-"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.fmean(xs):.3f} ± {sd:.3f}"


def summarize(runs: list[dict], cells: list[str], start: dict) -> str:
    acc = lambda c, v, b=None: [r["by_bucket"].get(b, float("nan")) if b else r["accuracy"]  # noqa: E731
                                for r in runs if r["cell"] == c and r["variant"] == v]
    n_seeds = len({r["seed"] for r in runs})
    sb = start["greedy_by_bucket"]
    lines = [f"Start (bootstrapped policy): greedy {start['greedy_accuracy']:.3f} "
             f"(easy {sb.get('easy', 0):.3f}, medium {sb.get('medium', 0):.3f}, hard {sb.get('hard', 0):.3f}); "
             f"{start['n_prompts']} test prompts; mean ± std (sample std) over {n_seeds} seed(s).", "",
             "| cell | uniform | weighted | Δ (w − u, paired) | hard: uniform | hard: weighted |",
             "|---|---|---|---|---|---|"]
    for c in cells:
        u, w = acc(c, "uniform"), acc(c, "weighted")
        d = [b - a for a, b in zip(u, w)]
        sign = "+" if d and statistics.fmean(d) >= 0 else ""
        lines.append(f"| {c} | {mean_std(u)} | {mean_std(w)} | {sign}{mean_std(d)} | "
                     f"{mean_std(acc(c, 'uniform', 'hard'))} | {mean_std(acc(c, 'weighted', 'hard'))} |")
    lines += ["", "| cell | variant | " + " | ".join(BUCKETS) + " |", "|---|---|" + "---|" * len(BUCKETS)]
    for c in cells:
        for v in VARIANTS:
            lines.append(f"| {c} | {v} | " + " | ".join(mean_std(acc(c, v, b)) for b in BUCKETS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny-cpu.yaml"))
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated experiment seeds")
    ap.add_argument("--cells", default=",".join(CELLS), help=f"comma-separated subset of {', '.join(CELLS)}")
    ap.add_argument("--overrides", nargs="*", default=[], help="dotted KEY=VALUE config overrides")
    ap.add_argument("--eval-prompts", type=int, default=None,
                    help="test prompts to evaluate (default: eval.max_prompts, else the whole test split)")
    ap.add_argument("--focal-gamma", type=float, default=FOCAL_GAMMA)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "weighting.json"))
    args = ap.parse_args(argv)
    t_start = time.time()
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    print(f"command: {command}", flush=True)
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    unknown = [c for c in cells if c not in CELLS]
    if unknown:
        ap.error(f"unknown cell(s) {unknown}; known: {', '.join(CELLS)}")

    cfg = load_config(args.config, args.overrides)
    if cfg.data.source != "arithmetic":
        ap.error("this experiment runs on the built-in arithmetic task (data.source=arithmetic)")
    if cfg.weighting.scheme != "difficulty":
        print("WARNING: weighting.scheme is not 'difficulty': the weighted variant equals the uniform one", flush=True)
    loss_cfgs = {c: load_config(args.config, [*args.overrides, *cell_overrides(c, args.focal_gamma)]).train.loss
                 for c in cells}
    policy = resolve_policy(cfg)
    init_model, tok = load_hf_policy(policy, cfg.model.dtype, cfg.model.trust_remote_code)
    sampler = HFSampler(init_model, tok)
    grader = get_grader(cfg.grading.grader, cfg.grading.timeout_s)
    max_length = train_max_length(cfg)
    train_rows = make_split(cfg.data.arithmetic, "train")[: cfg.data.max_prompts]
    n_eval = args.eval_prompts or cfg.eval.max_prompts or cfg.data.arithmetic.n_test
    test_rows = make_split(cfg.data.arithmetic, "test")[:n_eval]
    ev = lambda s: evaluate(s, test_rows, grader, maj_n=0, max_tokens=cfg.eval.max_tokens)  # noqa: E731

    t0 = time.time()
    start = ev(sampler)
    print(f"[start] policy {policy}: greedy {start['greedy_accuracy']:.3f} {start['greedy_by_bucket']} "
          f"({time.time() - t0:.1f}s)", flush=True)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    result = {"command": command, "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "config": args.config, "overrides": args.overrides, "focal_gamma": args.focal_gamma, "policy": policy,
              "torch_threads": args.threads, "eval_prompts": len(test_rows), "train_prompts": len(train_rows),
              "cells": {c: loss_cfgs[c].model_dump(mode="json") for c in cells},
              "start": start, "seeds": {}, "runs": []}

    for seed in seeds:
        t0 = time.time()
        pairs, skip_reasons = make_pairs(cfg, sampler, grader, train_rows, seed)
        if optimizer_steps(len(pairs), cfg) < 1:
            raise SystemExit(f"seed {seed}: {len(pairs)} pairs make no optimizer step; raise data.arithmetic.n_train")
        ref = pairs_reference_logps(init_model, tok, pairs, max_length)
        weights = {"weighted": torch.tensor([p["weight"] for p in pairs], dtype=torch.float64),
                   "uniform": torch.ones(len(pairs), dtype=torch.float64)}
        w = weights["weighted"]
        info = {"pairs": len(pairs), "skips": {r: skip_reasons.count(r) for r in sorted(set(skip_reasons))},
                "weight_mean": w.mean().item(), "weight_max": w.max().item(),
                "steps": optimizer_steps(len(pairs), cfg), "seconds": round(time.time() - t0, 1)}
        result["seeds"][str(seed)] = info
        print(f"[seed {seed}] {len(train_rows)} prompts -> {info['pairs']} pairs, skips {info['skips']}, weight mean "
              f"{info['weight_mean']:.2f} max {info['weight_max']:.2f}, {info['steps']} steps/run ({info['seconds']}s)",
              flush=True)
        done: dict[str, dict] = {}  # uniform runs whose loss does not depend on placement (w = 1) are shared
        for cell in cells:
            for variant in VARIANTS:
                lc = loss_cfgs[cell]
                key = json.dumps(lc.model_copy(update={"weight_placement": "margin"}).model_dump(mode="json")
                                 if variant == "uniform" else None, sort_keys=True)
                t0 = time.time()
                if variant == "uniform" and key in done:
                    run = {**done[key], "cell": cell, "reused_from": done[key]["cell"], "seconds": 0.0}
                else:
                    model, metrics = train(cfg, lc, init_model, tok, pairs, max_length, ref, weights[variant], seed)
                    t_train = time.time() - t0
                    e = ev(HFSampler(model, tok))
                    run = {"seed": seed, "cell": cell, "variant": variant, "placement": lc.weight_placement,
                           "accuracy": e["greedy_accuracy"], "by_bucket": e["greedy_by_bucket"], **metrics,
                           "train_seconds": round(t_train, 1), "seconds": round(time.time() - t0, 1)}
                    if variant == "uniform":
                        done[key] = run
                result["runs"].append(run)
                bb = run["by_bucket"]
                print(f"[seed {seed}] {cell:<18} {variant:<8} acc {run['accuracy']:.3f} (easy {bb.get('easy', 0):.2f} "
                      f"medium {bb.get('medium', 0):.2f} hard {bb.get('hard', 0):.2f}) loss {run['loss_first']:.3f}"
                      f"->{run['loss_last']:.3f} {run['seconds']:.1f}s"
                      + (f" (same run as {run['reused_from']})" if "reused_from" in run else ""), flush=True)
                result["wall_seconds"] = round(time.time() - t_start, 1)
                atomic_write_text(out_path, json.dumps(result, indent=1))  # after every run: partial results survive

    grader.close()
    table = summarize(result["runs"], cells, start)
    result["table_markdown"] = table
    result["wall_seconds"] = round(time.time() - t_start, 1)
    atomic_write_text(out_path, json.dumps(result, indent=1))
    print("\n" + table + "\n")
    print(f"command: {command}\nresults: {out_path}\ntotal wall time: {result['wall_seconds']:.1f}s", flush=True)
    return 0


if __name__ == "__main__":  # the grader's worker process is spawned: keep the guard
    sys.exit(main())
