"""The training worker loop: one DeepSpeed engine per Ray Train worker, fed by a Ray Data shard of pairs.

Each worker reads `get_dataset_shard("train")` (equal fixed shards, `jobs.train.FixedShards`:
uneven batch counts would hang DeepSpeed's collectives), tokenises pairs, runs chosen and rejected
in one forward pass, and optimises the weighted preference loss of `wpo_ray.losses`. Checkpoints
go through `ray.train.report`: every rank contributes its DeepSpeed shard and its ledger of the
pair ids it has applied; rank 0 adds the HF weights (safetensors), the trainer state and the
metrics.

Restarts are exactly-once: a restarted worker restores the state of the last checkpoint and skips
the micro-batches that state already contains. Its shard is the same on every start, and the
skipped batches are checked against the ledger, so a changed stream is an error, never a silent
double or missed update.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from wpo_ray.batching import collate, encode_pairs, sequence_logps, split_pair_logps
from wpo_ray.config import Config
from wpo_ray.failpoints import failpoint
from wpo_ray.losses import GammaPOMargins, dist_gather_fn, preference_loss, reward_gaps

STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"
POLICY_DIR = "policy"
DS_DIR = "deepspeed"


def ledger_file(rank: int) -> str:
    return f"pairs-applied-rank{rank:03d}.json"


class StreamChangedError(RuntimeError):
    """After a restart, the pairs stream differs from the one the checkpoint was trained on."""


def zero_stage(cfg: Config) -> int:
    """The ZeRO stage the workers run: the configured one, or 0 for a single worker.

    ZeRO partitions optimizer state, gradients and parameters across ranks; one rank has nothing
    to partition, and stages 1-3 then only add copies into and out of flat buffers (a quarter of a
    CPU training step: docs/BENCHMARKS.md).
    """
    return cfg.train.deepspeed.zero_stage if cfg.train.num_workers > 1 else 0


def deepspeed_config(cfg: Config, total_steps: int) -> dict:
    t, ds = cfg.train, cfg.train.deepspeed
    zero: dict = {"stage": zero_stage(cfg)}
    if zero["stage"] == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # lets rank 0 write full HF weights
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": ds.grad_clip,
        "zero_optimization": zero,
        "optimizer": {"type": ds.optimizer, "params": {"lr": t.lr, "weight_decay": ds.weight_decay}},
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {"warmup_min_lr": 0.0, "warmup_max_lr": t.lr, "warmup_num_steps": t.warmup_steps,
                       "total_num_steps": max(total_steps, t.warmup_steps + 1), "warmup_type": "linear"},
        },
        "bf16": {"enabled": t.use_gpu and cfg.model.dtype == "bfloat16"},
        "steps_per_print": 10**9,  # our own progress line replaces DeepSpeed's
        "wall_clock_breakdown": False,
    }


def optimizer_steps(n_pairs: int, cfg: Config) -> int:
    """Optimizer steps the run will take: equal shards, whole micro-batches, whole accumulations."""
    t = cfg.train
    per_rank = n_pairs // t.num_workers
    steps = (per_rank // t.micro_batch_size) // t.grad_accum * t.epochs
    return min(steps, t.max_steps) if t.max_steps else steps


def _save_hf(engine, tokenizer, path: Path, rank: int, zero_stage: int) -> None:
    # ZeRO-3 partitions parameters: gather them (a collective every rank joins) before rank 0 writes.
    state = engine._zero3_consolidated_16bit_state_dict() if zero_stage == 3 else None
    if rank == 0:
        module = engine.module
        module.save_pretrained(path, state_dict=state if zero_stage == 3 else module.state_dict(),
                               safe_serialization=True)
        tokenizer.save_pretrained(path)


def _mean_across_ranks(metrics: dict[str, float]) -> dict[str, float]:
    import torch.distributed as dist

    keys = sorted(metrics)
    vals = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(vals)
        vals /= dist.get_world_size()
    return dict(zip(keys, vals.tolist()))


def train_loop_per_worker(config: dict) -> None:
    import deepspeed
    import ray.train
    from transformers import AutoModelForCausalLM

    from wpo_ray.generation import load_hf_policy

    cfg = Config.model_validate(config["cfg"])
    t, loss_cfg = cfg.train, cfg.train.loss
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(t.cpus_per_worker)))
    torch.manual_seed(cfg.run.seed + rank)
    dtype = getattr(torch, cfg.model.dtype)

    model = AutoModelForCausalLM.from_pretrained(config["policy_path"], dtype=dtype,
                                                 trust_remote_code=cfg.model.trust_remote_code)
    _, tokenizer = load_hf_policy(config["policy_path"], cfg.model.dtype, cfg.model.trust_remote_code)
    ref_model = None
    if loss_cfg.needs_reference and t.reference_logps == "worker":
        ref_model, _ = load_hf_policy(config["reference_path"], cfg.model.dtype, cfg.model.trust_remote_code)
    total_steps = config["total_steps"]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=deepspeed_config(cfg, total_steps), dist_init_required=False)
    if world == 1:
        # No peers to average gradients with: skip DeepSpeed's flatten / all-reduce / copy-back
        # of every gradient after each backward (a fifth of a CPU step on one rank).
        engine.enable_backward_allreduce = False
    margins_fn = (GammaPOMargins(loss_cfg.gamma_po, loss_cfg.beta, gather_fn=dist_gather_fn())
                  if loss_cfg.gamma_po.enabled else None)

    # Resume: DeepSpeed state (weights, optimizer, scheduler) + how far the data stream got.
    micro_done, step, metrics_lines, applied = 0, 0, [], []
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            engine.load_checkpoint(str(Path(d) / DS_DIR), tag="ds")
            applied = json.loads((Path(d) / ledger_file(rank)).read_text())
            state = json.loads((Path(d) / STATE_FILE).read_text())
            micro_done, step = state["micro_steps"], state["optimizer_steps"]
            if margins_fn is not None and state.get("gamma_po_queue") is not None:
                margins_fn.load_state_dict({"queue": torch.tensor(state["gamma_po_queue"], dtype=torch.float64)})
            if (Path(d) / METRICS_FILE).exists():
                metrics_lines = (Path(d) / METRICS_FILE).read_text().splitlines()
        if rank == 0:
            print(f"[train] resumed from checkpoint at optimizer step {step} ({micro_done} micro-batches)", flush=True)

    metrics_path = Path(config["metrics_path"]) if config.get("metrics_path") else None
    tb = None
    if rank == 0 and config.get("tensorboard_dir"):
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(config["tensorboard_dir"])

    def report(final: bool) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            engine.save_checkpoint(str(d / DS_DIR), tag="ds")
            if final:
                _save_hf(engine, tokenizer, d / POLICY_DIR, rank, zero_stage(cfg))
            (d / ledger_file(rank)).write_text(json.dumps(applied))
            if rank == 0:
                queue = margins_fn.state_dict()["queue"].tolist() if margins_fn is not None else None
                (d / STATE_FILE).write_text(json.dumps({"micro_steps": micro_done, "optimizer_steps": step,
                                                        "gamma_po_queue": queue, "final": final}))
                (d / METRICS_FILE).write_text("\n".join(metrics_lines) + ("\n" if metrics_lines else ""))
            ray.train.report({"step": step, "final": final}, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"checkpoint-{step:06d}{'-final' if final else ''}")

    shard = ray.train.get_dataset_shard("train")
    seen, accum, t_step, tokens = 0, [], time.time(), 0
    done = step >= total_steps
    for epoch in range(t.epochs):
        if done:
            break
        for batch in shard.iter_batches(batch_size=t.micro_batch_size, batch_format="pyarrow", drop_last=True):
            seen += 1
            cols = batch.to_pydict()
            ids = [str(i) for i in cols.get("prompt_id") or []]
            if seen <= micro_done:  # already in the restored state: check it is the same batch, skip it
                mb = t.micro_batch_size
                if ids != applied[(seen - 1) * mb : seen * mb]:
                    raise StreamChangedError(
                        f"rank {rank}: micro-batch {seen} after the restart holds pairs {ids[:3]}..., the checkpoint "
                        f"applied {applied[(seen - 1) * mb : (seen - 1) * mb + 3]}...; the pairs changed since "
                        "the checkpoint, refusing to resume on them")
                continue
            failpoint("train.micro_step")
            enc = encode_pairs(tokenizer, cols["prompt"], cols["chosen"], cols["rejected"],
                               config["max_length"], cols.get("prompt_id"))
            coll = collate(enc, tokenizer.pad_token_id)
            tokens += int(coll["attention_mask"].sum())
            logps, lengths = sequence_logps(engine, coll)
            pc, pr, lc, lr = split_pair_logps(logps, lengths)
            rc = rr = None
            if loss_cfg.needs_reference:
                if ref_model is not None:
                    with torch.no_grad():
                        rl, _ = sequence_logps(ref_model, coll)
                    rc, rr = rl[: len(pc)], rl[len(pc) :]
                else:
                    rc = torch.tensor(cols["ref_chosen_logp"], dtype=torch.float64)
                    rr = torch.tensor(cols["ref_rejected_logp"], dtype=torch.float64)
            weights = torch.tensor(cols.get("weight") or [1.0] * len(pc), dtype=torch.float64)
            margins = None
            if margins_fn is not None:
                margins = margins_fn(reward_gaps(loss_cfg, pc, pr, rc, rr, lc, lr, weights))
            # preference_loss refuses NaN/inf inputs (ValueError) before anything reaches the optimizer.
            out = preference_loss(loss_cfg, pc, pr, rc, rr, lc, lr, weights, margins)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.backward(out.loss)
            engine.step()
            micro_done += 1
            applied.extend(ids)
            accum.append(out.metrics)
            if not boundary:
                continue
            step += 1
            dt = time.time() - t_step
            m = {k: sum(a[k] for a in accum) / len(accum) for k in accum[0]}
            m["tokens_per_s"] = tokens / max(dt, 1e-9)
            m = _mean_across_ranks(m)
            m["tokens_per_s"] *= world
            m.update(step=step, epoch=epoch, lr=engine.get_lr()[0], step_seconds=dt, time=time.time())
            accum, tokens, t_step = [], 0, time.time()
            if rank == 0:
                metrics_lines.append(json.dumps(m))
                if metrics_path is not None and metrics_path.parent.is_dir():
                    with metrics_path.open("a") as f:
                        f.write(metrics_lines[-1] + "\n")
                if tb is not None:
                    for k, v in m.items():
                        tb.add_scalar(k, v, step)
                print(f"[train] step {step}/{total_steps} loss {m['loss']:.4f} acc {m['rewards/accuracy']:.2f} "
                      f"margin {m['rewards/margin']:+.3f} w {m['weight/mean']:.2f} lr {m['lr']:.2e} "
                      f"{m['tokens_per_s']:.0f} tok/s", flush=True)
            if t.checkpoint_every and step % t.checkpoint_every == 0 and step < total_steps:
                report(final=False)
            if step >= total_steps:
                done = True
                break
    if tb is not None:
        tb.close()
    report(final=True)


def checkpoint_has_policy(path: Path) -> bool:
    p = Path(path) / POLICY_DIR
    return (p / "config.json").is_file() and any(p.glob("*.safetensors"))


def expected_total_steps(n_pairs: int, cfg: Config) -> int:
    steps = optimizer_steps(n_pairs, cfg)
    if steps < 1:
        need = cfg.train.num_workers * cfg.train.micro_batch_size * cfg.train.grad_accum
        raise ValueError(f"{n_pairs} pairs make no optimizer step: one step needs num_workers x micro_batch_size "
                         f"x grad_accum = {need} pairs (lower train.micro_batch_size or train.grad_accum)")
    return steps

