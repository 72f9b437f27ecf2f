"""Training throughput: our Ray Train + DeepSpeed trainer vs TRL's DPOTrainer, same model, same pairs.

Same tiny Llama (built in code, fixed seed, saved to a temp dir), same pairs (arithmetic train
split: chosen = gold answer, rejected = gold + 1, a weight in [1, 2]), same beta, lr (1 warm-up
step, then linear decay), gradient
clipping 1.0, AdamW without weight decay, per-device batch size, fp32 on CPU, one epoch:

  ours  pipeline.training.run_training: Ray Data -> RefLogp actor stage (reference log-probs, computed and
        materialised before the workers start) -> Ray Train TorchTrainer, `--workers` DeepSpeed
        workers (ZeRO `--zero-stage`, default 2 as in configs/tiny-cpu.yaml; a single worker runs
        ZeRO-0 without the gradient all-reduce, as the trainer does for one worker), weighted DPO
        (weight_placement margin). Torch threads: `--threads` split over the workers.
  trl   trl.DPOTrainer (sigmoid loss = unweighted DPO), reference model in the trainer: its
        reference log-probs are computed inside every step. No eval, report_to none, no
        checkpoints, no gradient checkpointing. `--threads` torch threads.

Tokens are counted the same way for both: prompt + response tokens of chosen and rejected,
padding excluded (for ours from our tokenisation, cross-checked against metrics.jsonl; for TRL
from its tokenized dataset). Each run is a fresh subprocess; they run one after another.

Throughputs printed (tokens / seconds):
  trl   train()      wall of trainer.train(), set-up (tokenising, model loading) excluded
  trl   whole        model loading + DPOTrainer set-up (tokenising) + train()
  trl   steady       median step time (callback timestamps), first step excluded
  ours  total        wall of run_training: Ray Train start-up, worker set-up, the RefLogp stage,
                     every step, checkpoint (what a user waits for)
  ours  steps        sum of metrics.jsonl step_seconds: the steps only (the reference log-probs
                     were computed before them)
  ours  steady       median step_seconds, first step excluded
and the ratios ours/TRL (steps vs train(), steady vs steady, total vs whole).

    .venv/bin/python bench/trainer_vs_trl.py [--pairs 256 --batch 8 --workers 1 --repeats 1]
    .venv/bin/python bench/trainer_vs_trl.py --hidden 512 --layers 4 --workers 1,2
    .venv/bin/python bench/trainer_vs_trl.py --rounds 3    # iterative: ours one trainer group, TRL per round

With --rounds R both sides train R rounds on the same pairs, round r from round r-1's policy
against the initial reference: ours through one trainer group (the main job's default), TRL as a
user would script it (load the last policy and the reference, set up DPOTrainer, train(), save).
"whole" then sums TRL's load + set-up + train() + save over the rounds, and "total" is ours from
the group's start to the last round's checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, arithmetic_pairs, header, median, n_params, save_model


# ------------------------------------------------------------------------------------------ data


def write_pairs(pairs: list[dict], out_dir: Path) -> Path:
    import pyarrow.parquet as pq

    from wpo_ray import contracts

    rows = [dict(p, round=1, n_samples=4, n_correct=1, n_wrong=3, chosen_source="gold",
                 rejected_answer=p["rejected"], rejected_count=3) for p in pairs]
    out_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(contracts.from_rows(rows, "pairs"), out_dir / "pairs.parquet")
    return out_dir


def our_token_count(policy: str, pairs: list[dict]) -> int:
    """prompt + response tokens of chosen and rejected, non-pad, as our worker tokenises them."""
    from wpo_ray.generation import load_hf_policy
    from wpo_ray.step import encode_batch
    from wpo_ray.train_plan import DEFAULT_MAX_LENGTH

    _, tok = load_hf_policy(policy)
    batch = encode_batch(tok, [p["prompt"] for p in pairs], [p["chosen"] for p in pairs],
                         [p["rejected"] for p in pairs], DEFAULT_MAX_LENGTH)
    return int(batch["attention_mask"].sum())


# ---------------------------------------------------------------------------------------- children


def child_ours(a) -> dict:
    from pipeline.training import run_training
    from wpo_ray.cluster import init_ray
    from wpo_ray.config import load_config
    from wpo_ray.rundir import METRICS_FILE
    from wpo_ray.train_plan import zero_stage

    threads = max(1, a.threads // a.workers_n)
    cfg = load_config(ROOT / "configs" / "tiny-cpu.yaml", [
        f"model.path={a.policy}", f"run.dir={a.work}/run", f"run.seed={a.seed}", "ray.address=local",
        f"train.num_workers={a.workers_n}", f"train.cpus_per_worker={threads}",
        f"train.micro_batch_size={a.batch}", "train.grad_accum=1", "train.epochs=1", f"train.max_steps={a.steps}",
        f"train.lr={a.lr}", "train.warmup_steps=1", "train.loss.base=dpo", f"train.loss.beta={a.beta}",
        "train.loss.weight_placement=margin", "train.reference_logps=precomputed", f"train.deepspeed.zero_stage={a.zero_stage}",
        "train.checkpoint_every=0",
    ])
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    init_ray(cfg.ray)
    t0 = time.perf_counter()
    group, policy, metrics, round_s = None, a.policy, [], []
    if a.rounds > 1:  # as the main job trains its rounds: one group for all of them (run.trainers: persistent)
        from pipeline.training import TrainerGroup

        group = TrainerGroup(cfg, Path(a.work) / "trainers")
    try:
        for r in range(1, a.rounds + 1):  # round r trains round r-1's policy against the initial reference
            work, out = Path(a.work) / f"work-{r}", Path(a.work) / f"out-{r}"
            info = run_training(cfg, a.pairs_dir, out, policy, a.policy, work, group=group, round_idx=r)
            policy = str(out / "policy")
            metrics += [json.loads(x) for x in (work / METRICS_FILE).read_text().splitlines() if x.strip()]
            round_s.append(time.perf_counter() - t0 - sum(round_s))
    finally:
        if group is not None:
            group.close()
    total = time.perf_counter() - t0
    import ray

    ray.shutdown()
    return {"total_s": total, "round_s": round_s, "steps": info["steps"], "step_seconds": [m["step_seconds"] for m in metrics],
            "metric_tokens": sum(m["tokens_per_s"] * m["step_seconds"] for m in metrics),
            "first_loss": metrics[0]["loss"], "last_loss": metrics[-1]["loss"], "threads_per_worker": threads,
            "zero_stage": zero_stage(cfg)}


def child_trl(a) -> dict:
    import torch
    from datasets import Dataset

    torch.set_num_threads(a.threads)
    pairs = json.loads(Path(a.pairs_json).read_text())
    ds = Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])
    if a.rounds > 1:  # iterative DPO with TRL: each round loads the last one's policy and saves its own
        rounds, policy = [], a.policy
        for r in range(1, a.rounds + 1):
            t0 = time.perf_counter()
            one = trl_round(a, ds, policy, Path(a.work) / f"round-{r}")
            rounds.append(dict(one, round_s=time.perf_counter() - t0))
            policy = str(Path(a.work) / f"round-{r}" / "policy")
        keep = ("tokens", "exact_epoch", "train_loss", "threads")
        return {**{k: rounds[-1][k] for k in keep}, "train_s": sum(x["train_s"] for x in rounds),
                "setup_s": sum(x["setup_s"] for x in rounds), "load_s": sum(x["load_s"] for x in rounds),
                "save_s": sum(x["save_s"] for x in rounds), "round_s": [x["round_s"] for x in rounds],
                "step_seconds": [s for x in rounds for s in x["step_seconds"]]}
    return trl_round(a, ds, a.policy, Path(a.work) / "trl")


def trl_round(a, ds, policy: str, out: Path) -> dict:
    """Load `policy` (and, after round 1, the initial reference), set up DPOTrainer, train(); and,
    when rounds follow, save the policy for the next one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    t_load = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(policy)
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    # The reference is the initial policy in every round, as in ours (run.reference: initial).
    ref = None if policy == a.policy else AutoModelForCausalLM.from_pretrained(a.policy, dtype=torch.float32)
    load_s = time.perf_counter() - t_load
    args = DPOConfig(
        output_dir=str(out), per_device_train_batch_size=a.batch, gradient_accumulation_steps=1,
        max_steps=a.steps, num_train_epochs=1, learning_rate=a.lr, lr_scheduler_type="linear", warmup_steps=1,
        weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", beta=a.beta, loss_type=["sigmoid"],
        bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False, max_length=None,
        eval_strategy="no", save_strategy="no", report_to="none", logging_steps=10**6, disable_tqdm=True,
        dataloader_num_workers=0, seed=a.seed, data_seed=a.seed, precompute_ref_log_probs=False,
    )

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.stamps = []

        def on_step_begin(self, args, state, control, **kw):
            if not self.stamps:
                self.stamps.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            self.stamps.append(time.perf_counter())

    cb = StepTimes()
    t0 = time.perf_counter()
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=ds, processing_class=tok, callbacks=[cb])
    setup = time.perf_counter() - t0
    td = trainer.train_dataset
    per_row = [2 * len(p) + len(c) + len(r) for p, c, r in zip(td["prompt_ids"], td["chosen_ids"], td["rejected_ids"])]
    consumed = a.steps * a.batch
    tokens = sum(per_row) if consumed == len(per_row) else sum(per_row) / len(per_row) * consumed
    t0 = time.perf_counter()
    result = trainer.train()
    train_s = time.perf_counter() - t0
    steps = [b - a_ for a_, b in zip(cb.stamps, cb.stamps[1:])]
    t0 = time.perf_counter()
    if a.rounds > 1:
        trainer.save_model(str(out / "policy"))
    save_s = time.perf_counter() - t0
    return {"train_s": train_s, "setup_s": setup, "load_s": load_s, "save_s": save_s, "tokens": tokens,
            "step_seconds": steps, "exact_epoch": consumed == len(per_row), "train_loss": result.training_loss,
            "threads": a.threads}


# -------------------------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8, help="per-device micro-batch size (pairs)")
    ap.add_argument("--workers", default="1", help="our worker counts to run, comma-separated (e.g. 1,2)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads in total per run")
    ap.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2, 3],
                    help="our DeepSpeed ZeRO stage (the project's default is 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1, help="paired TRL/ours runs, alternating; ratios are their median")
    ap.add_argument("--rounds", type=int, default=1,
                    help="iterative rounds on the same pairs: ours one trainer group for all of them (the main "
                         "job's run.trainers=persistent); TRL load + set-up + train() + save per round")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--verbose", action="store_true", help="show the children's logs")
    ap.add_argument("--child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--policy", help=argparse.SUPPRESS)
    ap.add_argument("--pairs-dir", help=argparse.SUPPRESS)
    ap.add_argument("--pairs-json", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--workers-n", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        res = child_ours(a) if a.child == "ours" else child_trl(a)
        print("BENCH_RESULT " + json.dumps(res), flush=True)
        return 0

    workers = [int(x) for x in a.workers.split(",")]
    for w in workers:
        if a.pairs % (w * a.batch):
            ap.error(f"--pairs {a.pairs} must be a multiple of workers x batch = {w * a.batch} (one exact epoch)")
    header("trainer throughput: ours (Ray Train + DeepSpeed) vs TRL DPOTrainer",
           {k: v for k, v in vars(a).items() if k not in ("child", "policy", "pairs_dir", "pairs_json", "work",
                                                          "steps", "workers_n")})
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        tmp = Path(tmp)
        policy = save_model(tmp / "policy", a.hidden, a.layers, seed=a.seed)
        from wpo_ray.generation import load_hf_policy

        print(f"model: tiny Llama hidden={a.hidden} layers={a.layers} "
              f"params={n_params(load_hf_policy(policy)[0]) / 1e6:.2f}M")
        pairs = arithmetic_pairs(a.pairs, seed=a.seed)
        pairs_dir = write_pairs(pairs, tmp / "pairs")
        (tmp / "pairs.json").write_text(json.dumps(pairs))
        tokens = our_token_count(policy, pairs)
        print(f"pairs: {len(pairs)} (one epoch), {tokens} tokens (prompt+response, chosen+rejected, non-pad), "
              f"{tokens / len(pairs):.1f} per pair")

        runs = ([] if a.skip_trl else [("trl", 1)]) + [("ours", w) for w in workers]
        for rep in range(a.repeats):  # alternating, so drifts in the machine's load hit both sides
            for kind, w in runs:
                steps = a.pairs // (a.batch * w)
                cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--policy", policy,
                       "--pairs-dir", str(pairs_dir), "--pairs-json", str(tmp / "pairs.json"),
                       "--work", str(tmp / f"{kind}-{w}-{rep}"), "--steps", str(steps), "--workers-n", str(w),
                       "--batch", str(a.batch), "--zero-stage", str(a.zero_stage), "--beta", str(a.beta),
                       "--lr", str(a.lr), "--threads", str(a.threads), "--seed", str(a.seed), "--rounds", str(a.rounds)]
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
                proc_s = time.perf_counter() - t0
                if a.verbose or proc.returncode:
                    sys.stdout.write(proc.stdout[-20000:])
                    sys.stderr.write(proc.stderr[-20000:])
                if proc.returncode:
                    print(f"{kind} (workers={w}) failed with exit code {proc.returncode}")
                    return 1
                r = json.loads([x for x in proc.stdout.splitlines() if x.startswith("BENCH_RESULT ")][-1].split(" ", 1)[1])
                r.update(steps_n=steps, process_s=proc_s)
                results.setdefault((kind, w), []).append(r)
                print(f"  run {rep + 1}/{a.repeats} {kind} workers={w}: {steps} steps, process {proc_s:.1f}s", flush=True)

    print()
    fig: dict = {}
    R = a.rounds  # every figure is over all rounds: R times the pairs' tokens
    for r in results.get(("trl", 1), []):
        steady = median(r["step_seconds"][1:])
        whole = r["load_s"] + r["setup_s"] + r["train_s"] + r.get("save_s", 0.0)
        f = dict(train=R * r["tokens"] / r["train_s"], steady=r["tokens"] / r["steps_n"] / steady,
                 whole=R * r["tokens"] / whole)
        fig.setdefault("trl", []).append(f)
        print(f"TRL DPOTrainer ({r['threads']} threads): {r['steps_n']} steps, tokens {r['tokens']:.0f} "
              f"{'(exact epoch)' if r['exact_epoch'] else '(scaled)'}; train() {r['train_s']:.2f}s -> "
              f"{f['train']:8.0f} tok/s; median step {steady * 1e3:.1f} ms -> steady {f['steady']:8.0f} tok/s; "
              f"whole (load {r['load_s']:.1f}s + set-up {r['setup_s']:.1f}s + train()"
              + (f" + save {r['save_s']:.1f}s; rounds " + ", ".join(f"{x:.1f}s" for x in r["round_s"]) if R > 1 else "")
              + f") {whole:.2f}s -> {f['whole']:8.0f} tok/s; train loss {r['train_loss']:.4f}")
    for (kind, w), rs in results.items():
        if kind != "ours":
            continue
        for r in rs:
            steps_s = sum(r["step_seconds"])
            steady = median(r["step_seconds"][1:])
            f = dict(total=R * tokens / r["total_s"], steps=R * tokens / steps_s, steady=tokens / r["steps_n"] / steady)
            fig.setdefault(("ours", w), []).append(f)
            print(f"ours, {w} worker(s) x {r['threads_per_worker']} thread(s), DeepSpeed ZeRO-{r['zero_stage']}: "
                  f"{r['steps_n']} steps per round, tokens {R * tokens} (metrics.jsonl says {r['metric_tokens']:.0f}); "
                  f"loss {r['first_loss']:.4f} -> {r['last_loss']:.4f}\n"
                  f"    total run_training {r['total_s']:.1f}s -> {f['total']:8.0f} tok/s (Ray Train start-up, RefLogp "
                  f"stage, checkpoint included" + (f"; rounds " + ", ".join(f"{x:.1f}s" for x in r["round_s"])
                                                   if R > 1 else "") + ")\n"
                  f"    steps only {steps_s:.2f}s (first step {r['step_seconds'][0]:.2f}s) -> {f['steps']:8.0f} tok/s "
                  f"(reference log-probs computed before)\n"
                  f"    median step {steady * 1e3:.1f} ms -> steady {f['steady']:8.0f} tok/s")
    if "trl" in fig:
        print()
        for w in workers:
            ratios = {k: median([o[k] / t[t_key] for o, t in zip(fig[("ours", w)], fig["trl"])])
                      for k, t_key in (("steps", "train"), ("steady", "steady"), ("total", "whole"))}
            print(f"RATIO ours({w} worker)/TRL tokens/s, median of {a.repeats} paired run(s): steps-only vs train() "
                  f"{ratios['steps']:.2f}x | steady vs steady {ratios['steady']:.2f}x | total run_training vs TRL "
                  f"whole {ratios['total']:.3f}x")
        print("(TRL's reference forward is inside each timed step; ours is the RefLogp stage before training: "
              "in 'total', not in 'steps' or 'steady')")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
