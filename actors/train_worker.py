"""The training workers: DeepSpeed engines on Ray Train that live for the whole run, one round at a time.

This module only hosts the step (`wpo_ray.step.pair_loss`). A worker sets its engine up once,
then trains each round the driver puts in its feed (pipeline/training.py): the round's fixed
shard of pairs (equal shards: uneven batch counts would hang DeepSpeed's collectives), a fresh
optimizer state (or the last round's: `train.optimizer_state`) and LR schedule per round, metrics,
checkpoints. Checkpoints go through `ray.train.report`: every rank contributes its DeepSpeed shard
and its ledger of the pair ids it has applied; rank 0 adds the HF weights (safetensors), the
trainer state and the metrics. A round's final checkpoint leaves the DeepSpeed state out unless
the next round goes on from its optimizer state: its weights are the HF policy.

Restarts are exactly-once: a restarted worker restores the state of the last checkpoint and skips
the micro-batches that state already contains. Its shard is the same on every start, and the
skipped batches are checked against the ledger, so a changed stream is an error, never a silent
double or missed update.
"""

from __future__ import annotations

import gc
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from wpo_ray.config import Config
from wpo_ray.failpoints import failpoint
from wpo_ray.integrity import HashingCheckpointEngine, check_rank_manifests, verify_checkpoint, write_manifest
from wpo_ray.losses import GammaPOMargins, dist_gather_fn
from wpo_ray.rundir import DS_DIR, METRICS_FILE, POLICY_DIR, STATE_FILE, gamma_po_file, ledger_file
from wpo_ray.step import encode_batch, model_device, pair_loss
from wpo_ray.train_plan import deepspeed_config, lr_scheduler, train_max_length, zero_stage
from wpo_ray.weights import pack_state

log = logging.getLogger(__name__)


class StreamChangedError(RuntimeError):
    """After a restart, the pairs stream differs from the one the checkpoint was trained on."""


def collective_device(backend: str) -> torch.device:
    """Where tensors handed to a collective must live: NCCL takes CUDA tensors only."""
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def _mean_across_ranks(metrics: dict[str, float]) -> dict[str, float]:
    import torch.distributed as dist

    keys = sorted(metrics)
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return metrics
    vals = torch.tensor([metrics[k] for k in keys], dtype=torch.float64,
                        device=collective_device(dist.get_backend()))
    dist.all_reduce(vals)
    vals /= dist.get_world_size()
    return dict(zip(keys, vals.tolist()))


def _incarnation(world: int) -> str:
    """An id of this start of the worker group, the same on every rank (rank 0 draws it): the feed
    gives each start of the group its own split of a streamed round."""
    import uuid

    import torch.distributed as dist

    mine = [uuid.uuid4().hex]
    if world > 1 and dist.is_initialized():
        dist.broadcast_object_list(mine, src=0)
    return mine[0]


def _gather_placement(world: int) -> list[dict]:
    """Every rank's node, in rank order (rank 0 records it with the checkpoint)."""
    import torch.distributed as dist

    from wpo_ray.cluster import where_am_i

    mine = {**where_am_i(), "rank": dist.get_rank() if dist.is_initialized() else 0}
    if world == 1 or not dist.is_initialized():
        return [mine]
    every: list = [None] * world
    dist.all_gather_object(every, mine)
    return every


def _save_hf(engine, tokenizer, path: Path, rank: int, stage: int, hand_over: bool):
    """Rank 0 writes the HF policy; with `hand_over` it also puts the same weights in Ray's
    object store (host memory) for the engines, and returns that object ref."""
    import ray

    # ZeRO-3 partitions parameters: gather them (a collective every rank joins) before rank 0 writes.
    state = engine._zero3_consolidated_16bit_state_dict() if stage == 3 else None
    if rank != 0:
        return None
    module = engine.module
    state = state if stage == 3 else module.state_dict()
    module.save_pretrained(path, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(path)
    if not hand_over:
        return None
    try:  # ray.put copies the bytes into the object store now: the next round may train these tensors in place
        return ray.put(pack_state(state))
    except Exception as e:  # noqa: BLE001 - e.g. an object store too small: the engines read the checkpoint
        log.warning("[train] the weights could not be put in the object store (%s: %s); the engines will load "
                    "the checkpoint", type(e).__name__, e)
        return None


@dataclass
class Progress:
    """How far this worker got: what a checkpoint holds besides the DeepSpeed state."""

    micro_done: int = 0
    step: int = 0
    applied: list[str] = field(default_factory=list)  # pair ids in the order this rank applied them
    metrics_lines: list[str] = field(default_factory=list)  # rank 0: one JSON line per optimizer step
    final: bool = False  # the restored checkpoint is the round's last: nothing left to train
    stale: bool = False  # ... and held no engine state, so the engine does not hold the round's weights


@dataclass
class Round:
    """One round's training, as the driver hands it to the workers (pipeline/training.py's RoundFeed)."""

    index: int
    policy_path: str  # the weights the round starts from (the group's own weights after its first round)
    reference_path: str
    total_steps: int
    metrics_path: str | None = None
    tensorboard_dir: str | None = None
    shards: list | None = None  # one fixed shard per rank; None: a stream, split by the feed
    shuffle: bool = False
    hand_over: bool = False  # rank 0 puts the final weights in the object store (sampling.weight_handover)
    optimizer_from: str | None = None  # train.optimizer_state=carry: the checkpoint whose optimizer state goes on


def _restore(engine, margins_fn, rank: int, ckpt, rnd: Round) -> Progress:
    """Resume round `rnd` from Ray Train's last checkpoint `ckpt`: DeepSpeed state + how far the
    round got (`final`: the round is already trained), when the checkpoint is one of this round's
    (and the round is not streamed: a stream read anew starts over). Every file is checked against
    the checkpoint's manifests before anything is read."""
    progress = Progress()
    if not ckpt:
        return progress
    with ckpt.as_directory() as d:
        d = Path(d)
        verified = verify_checkpoint(d)  # before anything is read, let alone unpickled
        state = json.loads((d / STATE_FILE).read_text())
        if state.get("round", rnd.index) != rnd.index:  # an earlier round's: this round starts from its policy
            return progress
        if rnd.shards is None:  # streamed: trained again from the round's start, on a fresh split
            return progress
        if state.get("final") and not (d / DS_DIR).is_dir():  # trained; its weights are only in its policy/
            progress.final = progress.stale = True
            return progress
        check_rank_manifests(d, state["world_size"])
        engine.checkpoint_engine.verified = verified
        engine.load_checkpoint(str(d / DS_DIR), tag="ds")
        progress.applied = json.loads((d / ledger_file(rank)).read_text())
        progress.micro_done, progress.step = state["micro_steps"], state["optimizer_steps"]
        progress.final = bool(state.get("final"))
        if margins_fn is not None:  # this rank's own queue (older checkpoints: rank 0's, in the state)
            own = d / gamma_po_file(rank)
            queue = json.loads(own.read_text()) if own.exists() else state.get("gamma_po_queue")
            if queue is not None:
                margins_fn.load_state_dict({"queue": torch.tensor(queue, dtype=torch.float64)})
        if (d / METRICS_FILE).exists():
            progress.metrics_lines = (d / METRICS_FILE).read_text().splitlines()
    if rank == 0:
        log.info("[train] resumed from checkpoint at optimizer step %d (%d micro-batches)", progress.step,
                 progress.micro_done)
    return progress


def _carry_in(engine, cfg: Config, rnd: Round, rank: int) -> None:
    """A (re)started engine takes the optimizer state the previous round ended with, from that
    round's final checkpoint (`train.optimizer_state=carry`), verified first; the LR schedule
    stays this round's. Named by the driver, not found in Ray Train's registry, which may not yet
    hold a checkpoint reported just before a worker died."""
    d = Path(rnd.optimizer_from)
    engine.checkpoint_engine.verified = verify_checkpoint(d)
    state = json.loads((d / STATE_FILE).read_text())
    check_rank_manifests(d, state["world_size"])
    engine.load_checkpoint(str(d / DS_DIR), tag="ds", load_lr_scheduler_states=False)
    # The loaded param groups hold the old round's last rate: the round's own schedule takes over again.
    restart_optimizer(engine, cfg, rnd.total_steps)
    if rank == 0:
        log.info("[train] optimizer state carried over from %s", d)


def checkpoint_name(round_idx: int, step: int | None = None) -> str:
    """The directory Ray Train keeps a checkpoint in: a mid-round one at `step`, else the round's
    final one (the one the driver copies)."""
    return f"round-{round_idx:03d}-final" if step is None else f"round-{round_idx:03d}-step-{step:06d}"


def _report_checkpoint(engine, tokenizer, cfg: Config, rnd: Round, progress: Progress, margins_fn, rank: int,
                       world: int, placement: list[dict], final: bool):
    """Report a checkpoint to Ray Train; the final one also holds the HF policy, and returns (on
    rank 0, when the round hands its weights over in memory) the object ref of those weights."""
    import ray.train

    weights = None
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        engine.checkpoint_engine.written.clear()
        # A round's final checkpoint holds the optimizer state only where the next round goes on from it.
        if not final or cfg.train.optimizer_state == "carry":
            engine.save_checkpoint(str(d / DS_DIR), tag="ds")
        if final:
            weights = _save_hf(engine, tokenizer, d / POLICY_DIR, rank, zero_stage(cfg), rnd.hand_over)
        (d / ledger_file(rank)).write_text(json.dumps(progress.applied))
        if margins_fn is not None:
            (d / gamma_po_file(rank)).write_text(json.dumps(margins_fn.state_dict()["queue"].tolist()))
        if rank == 0:
            (d / STATE_FILE).write_text(json.dumps({"round": rnd.index, "micro_steps": progress.micro_done,
                                                    "optimizer_steps": progress.step, "world_size": world,
                                                    "placement": placement, "final": final}))
            lines = progress.metrics_lines
            (d / METRICS_FILE).write_text("\n".join(lines) + ("\n" if lines else ""))
        write_manifest(d, rank, engine.checkpoint_engine.written)  # last: it vouches for the rest
        ray.train.report({"round": rnd.index, "step": progress.step, "final": final},
                         checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=checkpoint_name(rnd.index, None if final else progress.step))
    return weights


class StepLog:
    """Rank 0's record of each optimizer step: metrics.jsonl, TensorBoard, one progress line."""

    def __init__(self, rnd: Round, rank: int, progress: Progress):
        self.rank, self.total, self.progress = rank, rnd.total_steps, progress
        self.path = Path(rnd.metrics_path) if rnd.metrics_path else None
        self.tb = None
        if rank == 0 and rnd.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(rnd.tensorboard_dir)

    def write(self, m: dict) -> None:
        if self.rank != 0:
            return
        self.progress.metrics_lines.append(json.dumps(m))
        if self.path is not None and self.path.parent.is_dir():
            with self.path.open("a") as f:
                f.write(self.progress.metrics_lines[-1] + "\n")
        if self.tb is not None:
            for k, v in m.items():
                self.tb.add_scalar(k, v, m["step"])
        log.info("[train] step %d/%d loss %.4f acc %.2f margin %+.3f w %.2f lr %.2e %.0f tok/s", m["step"], self.total,
                 m["loss"], m["rewards/accuracy"], m["rewards/margin"], m["weight/mean"], m["lr"], m["tokens_per_s"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def epoch_order(n: int, seed: int, rank: int, epoch: int) -> list[int]:
    """The order a rank reads its n pairs in during `epoch`: a permutation seeded by the run seed,
    the rank and the epoch, so that it differs per epoch and is the same on every restart."""
    gen = torch.Generator().manual_seed(((seed * 1_000_003 + rank) * 1009 + epoch) & 0x7FFFFFFF)
    return torch.randperm(n, generator=gen).tolist()


def epoch_batches(shard, micro_batch_size: int, seed: int, rank: int, epoch: int):
    """The rank's fixed shard, read whole (pairs are small next to a model) and cut in the epoch's
    seeded order into full micro-batches (an equal shard gives every rank as many)."""
    import pyarrow as pa

    parts = list(shard.iter_batches(batch_size=4096, batch_format="pyarrow"))
    if not parts:
        return
    table = pa.concat_tables(parts)
    order = epoch_order(table.num_rows, seed, rank, epoch)
    for i in range(0, len(order) - micro_batch_size + 1, micro_batch_size):
        yield table.take(order[i : i + micro_batch_size])


def load_models(policy_path: str, reference_path: str, cfg: Config, device: torch.device | str = "cpu"):
    """(policy, tokenizer, reference model or None): each read from disk once. The reference model
    is loaded only when it runs on the worker (`train.reference_logps=worker`), on `device`."""
    from wpo_ray.generation import load_hf_policy
    from wpo_ray.integrity import verify_policy_dir

    on_worker = cfg.train.loss.needs_reference and cfg.train.reference_logps == "worker"
    # A round's checkpoint is verified before it is read; each directory once (the reference is
    # often the policy itself), and the reference only when this worker loads it.
    for path in dict.fromkeys([policy_path, *([reference_path] if on_worker else [])]):
        verify_policy_dir(path)
    model, tokenizer = load_hf_policy(policy_path, cfg.model.dtype, cfg.model.trust_remote_code)
    ref_model = load_reference(reference_path, cfg, device) if on_worker else None
    return model, tokenizer, ref_model


def load_reference(path: str, cfg: Config, device: torch.device | str):
    from wpo_ray.generation import load_hf_policy

    return load_hf_policy(path, cfg.model.dtype, cfg.model.trust_remote_code, device=str(device))[0]


def skip_shm_comm_build() -> None:
    """Keep DeepSpeed from JIT-compiling its CPU shared-memory all-reduce op. Only
    `inference_all_reduce` uses it, never training, and building it costs 40-70 s of a CPU
    training call whenever the cached build is stale (docs/ENVIRONMENT.md). No effect on GPUs,
    where the op does not exist."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def restart_optimizer(engine, cfg: Config, total_steps: int) -> None:
    """Start the next round as a fresh trainer would (what iterative DPO does): Adam's moments and
    step counts cleared (torch's and DeepSpeed's Adam create them again on the next step), unless
    `train.optimizer_state=carry`, and the LR schedule from its first step, sized for this round."""
    if cfg.train.optimizer_state == "restart":
        engine.basic_optimizer.state.clear()
    engine.lr_scheduler = lr_scheduler(cfg, total_steps)(engine.basic_optimizer)


def train_loop_per_worker(config: dict) -> None:
    """A Ray Train worker for the whole run: set up once, then train each round the driver puts in
    the feed (`config["feed"]`, pipeline/training.py) until it says stop. A (re)started worker
    loads the pending round's starting policy and resumes that round from Ray Train's last
    checkpoint when the checkpoint is one of that round's."""
    import ray
    import ray.train
    import ray.train.torch

    from wpo_ray.logs import setup_worker_logging

    setup_worker_logging()
    cfg = Config.model_validate(config["cfg"])
    t = cfg.train
    feed = config["feed"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(t.cpus_per_worker)))
    torch.manual_seed(cfg.run.seed + rank)

    rnd: Round | None = ray.get(feed.next_round.remote(-1))
    if rnd is None:
        return
    device = ray.train.torch.get_device() if t.use_gpu else torch.device("cpu")
    engine, tokenizer, ref_model = build_engine(cfg, rnd, world, device)
    device = model_device(engine)  # where DeepSpeed placed the policy: its inputs go there
    placement, incarnation = _gather_placement(world), _incarnation(world)
    ckpt, reference = ray.train.get_checkpoint(), rnd.reference_path
    first = True
    while rnd is not None:
        if not first:
            restart_optimizer(engine, cfg, rnd.total_steps)
            if ref_model is not None and rnd.reference_path != reference:  # run.reference=previous
                ref_model, reference = load_reference(rnd.reference_path, cfg, device), rnd.reference_path
        shard = (rnd.shards[rank] if rnd.shards is not None
                 else ray.get(feed.stream_shard.remote(rnd.index, rank, incarnation)))
        weights, found = train_round(engine, tokenizer, ref_model, cfg, rnd, shard, ckpt, rank, world, placement,
                                     device, fresh_engine=first)
        ckpt, first = None, False  # only a (re)start resumes from a checkpoint
        failpoint("train.round_reported")
        # Wrapped in a list: the feed keeps the reference (this worker stays its owner) instead of the tensors.
        ray.get(feed.round_done.remote(rnd.index, rank, None if weights is None else [weights], found is not None))
        rnd = ray.get(feed.next_round.remote(rnd.index))
        if found is not None and found.stale and rnd is not None:
            # The restored checkpoint was the round's final one, which holds its weights as a policy
            # but no engine state: build the engine again on them (the next round's starting policy).
            del engine
            gc.collect()
            engine, tokenizer, ref_model = build_engine(cfg, rnd, world, device)
            reference, first = rnd.reference_path, True


def build_engine(cfg: Config, rnd: Round, world: int, device):
    """(DeepSpeed engine, tokenizer, reference model or None) on round `rnd`'s starting policy."""
    import deepspeed

    t = cfg.train
    model, tokenizer, ref_model = load_models(rnd.policy_path, rnd.reference_path, cfg, device)
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False  # a KV cache is useless in training and conflicts with it
    skip_shm_comm_build()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=deepspeed_config(cfg, rnd.total_steps),
                                      lr_scheduler=lr_scheduler(cfg, rnd.total_steps), dist_init_required=False)
    engine.checkpoint_engine = HashingCheckpointEngine(engine.checkpoint_engine)
    if world == 1:
        # No peers to average gradients with: skip DeepSpeed's flatten / all-reduce / copy-back
        # of every gradient after each backward (a fifth of a CPU step on one rank).
        engine.enable_backward_allreduce = False
    return engine, tokenizer, ref_model


def train_round(engine, tokenizer, ref_model, cfg: Config, rnd: Round, shard, ckpt, rank: int, world: int,
                placement: list[dict], device, fresh_engine: bool = False):
    """Train one round on this rank's shard (a fixed shard, or its iterator over a stream) and
    report its final checkpoint (HF policy included). Returns (the object ref of the final weights
    on rank 0 of a round that hands them over, else None; the restored Progress when the round was
    found trained in its final checkpoint, else None). `fresh_engine`: the engine was just built, so
    it holds no optimizer state yet."""
    t, loss_cfg = cfg.train, cfg.train.loss
    margins_fn = (GammaPOMargins(loss_cfg.gamma_po, loss_cfg.beta, gather_fn=dist_gather_fn())
                  if loss_cfg.gamma_po.enabled else None)
    progress = _restore(engine, margins_fn, rank, ckpt, rnd)
    if progress.final:  # trained before a restart: its weights went with the old worker; the checkpoint has them
        return None, progress
    if fresh_engine and rnd.optimizer_from and not progress.micro_done:  # (a mid-round checkpoint has its own)
        _carry_in(engine, cfg, rnd, rank)
    total_steps = rnd.total_steps
    steps = StepLog(rnd, rank, progress)
    seen, accum, t_step, tokens = 0, [], time.time(), 0
    mb, max_length = t.micro_batch_size, train_max_length(cfg)
    done = progress.step >= total_steps
    # A stream's blocks are used as they come: Ray Data's local prefetch holds a block back until
    # the next has arrived, so a rank could wait for pairs not yet sampled while its share of
    # those already sampled would make a micro-batch (docs/ENVIRONMENT.md).
    prefetch = 1 if rnd.shards is not None else 0
    for epoch in range(t.epochs):
        if done:
            break
        batches = (epoch_batches(shard, mb, cfg.run.seed, rank, epoch) if rnd.shuffle
                   else shard.iter_batches(batch_size=mb, batch_format="pyarrow", drop_last=True,
                                           prefetch_batches=prefetch))
        for batch in batches:
            seen += 1
            cols = batch.to_pydict()
            ids = [str(i) for i in cols.get("prompt_id") or []]
            if seen <= progress.micro_done:  # already in the restored state: check it is the same batch, skip it
                if ids != progress.applied[(seen - 1) * mb : seen * mb]:
                    raise StreamChangedError(
                        f"rank {rank}: micro-batch {seen} after the restart holds pairs {ids[:3]}..., the checkpoint "
                        f"applied {progress.applied[(seen - 1) * mb : (seen - 1) * mb + 3]}...; the pairs changed "
                        "since the checkpoint, refusing to resume on them")
                continue
            failpoint("train.micro_step")
            inputs = encode_batch(tokenizer, cols["prompt"], cols["chosen"], cols["rejected"], max_length,
                                  cols.get("prompt_id"), device=device)
            tokens += int(inputs["attention_mask"].sum())
            # pair_loss refuses NaN/inf inputs (ValueError) before anything reaches the optimizer.
            out = pair_loss(engine, inputs, loss_cfg, cols.get("weight") or [1.0] * len(cols["prompt"]),
                            cols.get("ref_chosen_logp"), cols.get("ref_rejected_logp"), ref_model, margins_fn)
            boundary = engine.is_gradient_accumulation_boundary()
            lr = engine.get_lr()[0]  # the rate this optimizer step applies (the schedule moves on in step())
            engine.backward(out.loss)
            engine.step()
            progress.micro_done += 1
            progress.applied.extend(ids)
            accum.append(out.metrics)
            if not boundary:
                continue
            progress.step += 1
            dt = time.time() - t_step
            m = {k: sum(a[k] for a in accum) / len(accum) for k in accum[0]}
            m["tokens_per_s"] = tokens / max(dt, 1e-9)
            m = _mean_across_ranks(m)
            m["tokens_per_s"] *= world
            m.update(step=progress.step, epoch=epoch, lr=lr, step_seconds=dt, time=time.time())
            accum, tokens, t_step = [], 0, time.time()
            steps.write(m)
            if t.checkpoint_every and progress.step % t.checkpoint_every == 0 and progress.step < total_steps:
                _report_checkpoint(engine, tokenizer, cfg, rnd, progress, margins_fn, rank, world, placement, final=False)
            if progress.step >= total_steps:
                done = True
                break
    steps.close()
    return _report_checkpoint(engine, tokenizer, cfg, rnd, progress, margins_fn, rank, world, placement,
                              final=True), None
