"""The second half of a round: pairs → reference log-probs → the trainer group → checkpoint.

The pairs are read with Ray Data and checked for values that would poison the optimizer before
any worker starts. They then get their reference log-probs from the RefLogp actor pool (when
precomputed), are materialised in Ray's object store (not in the driver) and split into equal
contiguous shards, one per worker, handed over through the group's feed: the same rows in the
same order on every (re)start of the workers, which is what makes resuming exactly-once.

`TrainerGroup` is one Ray Train run whose DeepSpeed workers (actors/train_worker.py) train round
after round: the main job starts it once (`run.trainers: persistent`), so no round pays for
starting workers, importing DeepSpeed, loading the policy or building the engine again. A
one-off call (`wpo-ray train`, `run.trainers: per_round`) starts a group for one round; the
workers then start while the driver prepares the pairs. A streamed round (pipeline/streaming.py)
reaches the same workers through the feed, as a streaming split made per round.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq
import ray.train

from wpo_ray import contracts
from wpo_ray.colocation import trainer_resources
from wpo_ray.config import Config
from wpo_ray.contracts import pairs_files
from wpo_ray.rundir import METRICS_FILE, STATE_FILE, RunDirError, atomic_write_text, checkpoint_has_policy
from wpo_ray.train_plan import expected_total_steps, zero_stage

log = logging.getLogger(__name__)

JOB_FILE = "train_job.json"


def refuse_untrainable(ds, source: str) -> None:
    """ContractError naming the first pair whose weight or reference log-prob is NaN, infinite or
    (for a weight) negative: one such value poisons the optimizer state."""
    bad = ds.map_batches(contracts.untrainable_rows, batch_format="pyarrow").materialize()
    n_bad = bad.count()
    if n_bad:
        raise contracts.untrainable_error(bad.take(1)[0], n_bad, source)


def refuse_untrainable_input(source: str | Path, ds) -> None:
    """refuse_untrainable on the pairs as given, before anything starts. Parquet is checked here,
    a few columns and one batch at a time (milliseconds, no Ray Data job to start); JSON Lines
    through `ds`."""
    files, fmt = pairs_files(Path(source))
    if fmt != "parquet":
        return refuse_untrainable(ds, str(source))
    wanted = {"prompt_id", "weight", *(f.name for f in contracts.REF_LOGP_FIELDS)}
    first, n_bad = None, 0
    for f in files:
        pf = pq.ParquetFile(f)
        for batch in pf.iter_batches(batch_size=65536, columns=[c for c in pf.schema_arrow.names if c in wanted]):
            bad = contracts.untrainable_rows(pa.Table.from_batches([batch]))
            n_bad += bad.num_rows
            first = first or (bad.slice(0, 1).to_pylist()[0] if bad.num_rows else None)
    if n_bad:
        raise contracts.untrainable_error(first, n_bad, str(source))


@ray.remote(num_cpus=0)
class RoundFeed:
    """What a trainer group's workers train next: the pending round, which ranks have finished it,
    and stop. Workers (re)started by Ray Train ask it for the pending round, so a restart trains
    the same round on the same shards. A streamed round's pairs are split here, once per start of
    the group (`stream_shard`): a restarted group reads a fresh split of the stream from its start."""

    def __init__(self, world: int):
        self.world, self.round, self.finished, self.stopped = world, None, set(), False
        self.weights = None  # (round index, [object ref]) of the last round whose rank 0 handed its weights over
        self.stream, self.split = None, None  # the pending round's stream; ((round, incarnation), iterators)
        self.found_trained = False  # restarted workers found the pending round trained in its final checkpoint
        self.changed = asyncio.Condition()

    async def put(self, rnd, stream=None) -> None:
        async with self.changed:
            self.round, self.finished, self.stream, self.split = rnd, set(), stream, None
            self.found_trained = False
            self.weights = None  # the engines have had them (or read the checkpoint): free the object store
            self.changed.notify_all()

    async def stream_shard(self, index: int, rank: int, incarnation: str):
        """Rank `rank`'s iterator over round `index`'s stream, for the group started as `incarnation`.
        Every rank of one start shares one streaming split; a new start (Ray Train restarted the
        group) gets a new split, which runs the stream again from its start."""
        async with self.changed:
            if self.round is None or self.round.index != index or self.stream is None:
                raise RuntimeError(f"round {index} is not a pending streamed round")
            if self.split is None or self.split[0] != (index, incarnation):
                # The old split's coordinator goes with the last handle to it (the dead workers held the others).
                self.split = ((index, incarnation), self.stream.streaming_split(self.world, equal=True))
            return self.split[1][rank]

    async def stop(self) -> None:
        async with self.changed:
            self.stopped = True
            self.changed.notify_all()

    async def next_round(self, after: int):
        """The pending round once its index is above `after`; None once stopped."""
        async with self.changed:
            await self.changed.wait_for(lambda: self.stopped or (self.round is not None and self.round.index > after))
            return None if self.stopped else self.round

    async def round_done(self, index: int, rank: int, weights: list | None = None, found_trained: bool = False) -> None:
        async with self.changed:
            if self.round is not None and self.round.index == index:
                self.finished.add(rank)
                if found_trained:  # a restart: weights put before it died with their owner
                    self.found_trained, self.weights = True, None
                if weights is not None:
                    self.weights = (index, weights)
                self.changed.notify_all()

    async def handed_over(self, index: int) -> list | None:
        """[object ref of round `index`'s final weights], or None (not handed over: the checkpoint has them)."""
        return self.weights[1] if self.weights is not None and self.weights[0] == index else None

    async def wait_done(self, index: int) -> bool:
        """Once every rank has finished round `index`: whether restarted workers found it trained."""
        async with self.changed:
            await self.changed.wait_for(lambda: len(self.finished) == self.world and self.round.index == index)
            return self.found_trained


class TrainerGroup:
    """`train.num_workers` DeepSpeed workers in one Ray Train run, training the rounds handed to
    `train` one after another. Ray Train's fault tolerance holds across rounds: a worker that dies
    brings the group back from the last checkpoint (`train.max_failures` times per run), and the
    pending round resumes from it exactly once (a streamed round: from its start, on a fresh split
    of the stream)."""

    def __init__(self, cfg: Config, storage: str | Path):
        from ray.train.torch import TorchConfig, TorchTrainer

        from actors.train_worker import train_loop_per_worker

        t = cfg.train
        self.storage = Path(storage).absolute() / "ray_train"
        self.feed = RoundFeed.remote(t.num_workers)
        self.reference = None  # the RefLogp pool (actors/ref_logp.py), once a round needs it
        self.error: Optional[BaseException] = None
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"cfg": cfg.model_dump(mode="json"), "feed": self.feed},
            scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                                   resources_per_worker=trainer_resources(cfg)),
            torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
            run_config=ray.train.RunConfig(name=self.storage.name, storage_path=str(self.storage.parent),
                                           failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
                                           # The newest is what a restart needs; each holds optimizer state.
                                           checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
        )
        self._thread = threading.Thread(target=self._fit, args=(trainer,), daemon=True, name="trainer-group")
        self._thread.start()

    def _fit(self, trainer) -> None:
        try:
            result = trainer.fit()
            if result.error:
                self.error = RuntimeError(f"training failed: {result.error}")
        except BaseException as e:  # noqa: BLE001 - raised in the driver by train()
            self.error = e

    def train(self, rnd, stream=None) -> tuple[Path, bool]:
        """Train round `rnd` (actors.train_worker.Round); returns its final checkpoint directory and
        whether the workers, restarted after reporting it, found the round trained there.
        The workers go on from the weights they hold (the last round's, which the caller wrote
        where `rnd.policy_path` points); only a (re)started worker loads `rnd.policy_path`.
        `stream`: the round's pairs as a Ray dataset, split among the workers as they flow (Ray
        Data's streaming_split, equal shares), for a round without fixed `rnd.shards`."""
        from actors.train_worker import checkpoint_name

        if (stream is None) == (rnd.shards is None):
            raise ValueError("a round is trained on fixed shards or on a stream, exactly one of them")
        ray.get(self.feed.put.remote(rnd, stream))
        finished = self.feed.wait_done.remote(rnd.index)
        while not ray.wait([finished], timeout=1.0)[0]:
            if not self._thread.is_alive():
                raise self.error or RuntimeError("the trainer group stopped before the round was trained")
        return self.storage / checkpoint_name(rnd.index), ray.get(finished)

    def weights(self, index: int):
        """The object ref of round `index`'s final weights in Ray's object store (owned by trainer
        rank 0, kept until the next round starts), or None when the round did not hand them over."""
        held = ray.get(self.feed.handed_over.remote(index))
        return None if held is None else held[0]

    def close(self, timeout_s: float = 120.0) -> None:
        """Stop the workers once they are idle (a worker mid-round finishes it first)."""
        self.feed.stop.remote()
        if self.reference is not None:
            self.reference.shutdown()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("[train] the trainer group did not stop within %.0fs; leaving it to Ray's shutdown", timeout_s)
        else:
            ray.kill(self.feed)


def carried_optimizer(cfg: Config, policy_path: str | Path) -> str | None:
    """With train.optimizer_state=carry, the checkpoint directory a round's optimizer state comes
    from: the one holding the policy the round starts from (`<checkpoint>/policy`), when it is a
    round's final checkpoint of ours with DeepSpeed state. None for the first round (a model
    directory) and without carry."""
    from wpo_ray.integrity import has_manifest
    from wpo_ray.rundir import DS_DIR

    ckpt = Path(policy_path).parent
    if cfg.train.optimizer_state != "carry" or not ((ckpt / DS_DIR).is_dir() and has_manifest(ckpt)):
        return None
    return str(ckpt)


def link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(src, dst)


def claim_work_dir(work_dir: Path, cfg: Config, policy: str, reference: str, pairs_files: list[Path]) -> None:
    """Refuse to resume Ray Train state in `work_dir` that another training job left there.

    Ray Train restores from any snapshot under `<work_dir>/ray_train`; one made with another model,
    config or pairs must not be continued as if it were this job's.
    """
    job = {
        "config": {k: v for k, v in cfg.model_dump(mode="json").items() if k not in ("ray", "run")},
        "policy": str(policy), "reference": str(reference),
        "pairs": [[f.name, f.stat().st_size] for f in pairs_files],
    }
    path = work_dir / JOB_FILE
    if path.exists():
        old = json.loads(path.read_text())
        changed = [k for k in job if old.get(k) != job[k]]
        if changed and (work_dir / "ray_train").exists():
            raise RunDirError(f"{work_dir / 'ray_train'} holds the training state of another job (different "
                              f"{', '.join(changed)}); remove {work_dir} or write the output elsewhere")
    work_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(job, indent=1))


def _content_ids(batch: pa.Table) -> pa.Table:
    """Ids for pairs from elsewhere that have none: a hash of the pair, stable across reads."""
    ids = [hashlib.sha256("\0".join(t).encode()).hexdigest()[:16]
           for t in zip(*(batch.column(c).to_pylist() for c in ("prompt", "chosen", "rejected")))]
    return batch.append_column("prompt_id", pa.array(ids, pa.string()))


def _converted_trl(files: list[Path], fmt: str, cfg: Config, tokenizer_path: Optional[str]):
    """A TRL dataset in another layout than standard explicit-prompt (wpo_ray/trl_format.py), as a
    Ray dataset of explicit prompt/chosen/rejected strings; None when it needs no conversion. The
    rows pass through the driver once: this is for imported datasets, not a round's pairs."""
    import json

    import ray.data

    from wpo_ray.trl_format import needs_conversion, to_explicit_strings

    if fmt == "parquet":  # the schema says it, without reading rows (a round's own pairs come here too)
        schema = pq.read_schema(files[0])
        text_chosen = "chosen" not in schema.names or pa.types.is_string(schema.field("chosen").type)
        if "prompt" in schema.names and text_chosen:  # explicit strings (a missing column: the contract says so)
            return None
        batch = next(pq.ParquetFile(files[0]).iter_batches(batch_size=1), None)
        first = batch.to_pylist() if batch is not None else []
    else:
        line = next((ln for ln in files[0].read_text(encoding="utf-8").splitlines() if ln.strip()), None)
        first = [json.loads(line)] if line else []
    if not needs_conversion(first[0] if first else None):
        return None
    tokenizer = None
    if isinstance(first[0].get("chosen"), list) and tokenizer_path:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=cfg.model.trust_remote_code)
    rows: list[dict] = []
    for f in files:
        if fmt == "parquet":
            part = pq.read_table(f).to_pylist()
        else:
            part = []
            for i, ln in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
                if ln.strip():
                    try:
                        part.append(json.loads(ln))
                    except ValueError as e:
                        raise contracts.ContractError(f"{f}: line {i}: not JSON ({e})") from None
        rows += to_explicit_strings(part, tokenizer, source=str(f))
    return ray.data.from_arrow(pa.Table.from_pylist(rows))


def read_pairs(source: str | Path, cfg: Config, tokenizer_path: Optional[str] = None):
    """A Ray dataset of pairs from our pairs directory or a TRL-format preference dataset.

    TRL data in any of TRL's layouts (standard or conversational, explicit or implicit prompt;
    conversations are rendered with the chat template of `tokenizer_path`, the policy); a missing
    `weight` means 1.0 (uniform). Returns (dataset, number of pairs, whether ref log-probs are
    already present).
    """
    import ray.data

    from wpo_ray.cluster import data_context

    data_context()
    files, fmt = pairs_files(Path(source))
    converted = _converted_trl(files, fmt, cfg, tokenizer_path)
    if converted is not None:
        ds = converted
        schema, n = ds.schema().base_schema, ds.count()
    elif fmt == "parquet":
        n = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        schema = pq.read_schema(files[0])
        ds = ray.data.read_parquet([str(f) for f in files])
    else:
        import json

        import pyarrow.json as pajson

        for f in files:  # the explicit schema below would fill a missing column with nulls
            first = next((ln for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()), None)
            if first is None:
                raise contracts.ContractError(f"{f}: empty file, expected JSON Lines of prompt/chosen/rejected")
            missing = [c for c in ("prompt", "chosen", "rejected") if c not in json.loads(first)]
            if missing:
                raise contracts.ContractError(f"{f}: line 1: missing column {missing[0]!r} (TRL preference format)")

        # Arrow's reader (it reads JSON Lines natively) with the text columns pinned to string:
        # the pandas reader behind lines=True turns an answer such as "36" into an integer.
        text = pa.schema([pa.field(c, pa.string()) for c in ("prompt", "chosen", "rejected")])
        ds = ray.data.read_json([str(f) for f in files], parse_options=pajson.ParseOptions(
            explicit_schema=text, unexpected_field_behavior="infer"))
        schema, n = ds.schema().base_schema, ds.count()
    probe = schema.empty_table()
    contracts.validate(probe, "trl", source=str(source))
    if "weight" in schema.names:
        if not pa.types.is_floating(schema.field("weight").type) and not pa.types.is_integer(schema.field("weight").type):
            raise contracts.ContractError(f"{source}: column 'weight' has type {schema.field('weight').type}, expected a number")
    else:
        ds = ds.map_batches(lambda b: b.append_column("weight", pa.array([1.0] * len(b), pa.float64())),
                            batch_format="pyarrow")
    if "prompt_id" not in schema.names:
        ds = ds.map_batches(_content_ids, batch_format="pyarrow")
    has_ref = {"ref_chosen_logp", "ref_rejected_logp"} <= set(schema.names)
    return ds, n, has_ref


def run_training(cfg: Config, pairs_source: str | Path | None, output_dir: str | Path, policy_path: str,
                 reference_path: str, work_dir: str | Path, stream=None, group: Optional[TrainerGroup] = None,
                 round_idx: int = 0) -> dict:
    """Train the policy on the pairs and write the directory `output_dir` (policy/ in HF
    safetensors, + deepspeed/ with train.optimizer_state=carry); the caller renames it into place
    (`RunDir.stage`, or the CLI).
    `work_dir` holds the step metrics and, for a group started here, Ray Train's state (resumed
    from on a rerun).

    `group`: the run's persistent trainer group, which trains this as round `round_idx`; without
    one, a group is started for this call and stopped after it.
    `stream` = (dataset, most pairs it can hold) replaces `pairs_source` for run.overlap=streaming
    (pipeline/streaming.py): the pairs are split among the workers as they flow, never materialised, and
    the schedule is sized for the upper bound; training ends when the stream does.
    """
    from actors.ref_logp import ReferencePool
    from actors.train_worker import Round

    t = cfg.train
    output_dir, work_dir = Path(output_dir).absolute(), Path(work_dir).absolute()
    if stream is None:
        ds, n_pairs, has_ref = read_pairs(pairs_source, cfg, tokenizer_path=policy_path)
        refuse_untrainable_input(pairs_source, ds)  # the weights (and reference log-probs) as given
    else:
        (ds, n_pairs), has_ref = stream, False
    total = expected_total_steps(n_pairs, cfg)
    ref_stage = t.loss.needs_reference and t.reference_logps == "precomputed" and not has_ref
    own = group is None
    if own and stream is None:
        claim_work_dir(work_dir, cfg, policy_path, reference_path, pairs_files(Path(pairs_source))[0])
    elif own:
        # A streamed round's training always starts from the round's start (run.overlap=streaming
        # has no mid-round checkpoints): no Ray Train state of an earlier attempt is kept.
        shutil.rmtree(work_dir / "ray_train", ignore_errors=True)
        (work_dir / JOB_FILE).unlink(missing_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = work_dir / METRICS_FILE
    metrics_path.unlink(missing_ok=True)
    running = group is not None and group.reference is not None
    reference_pool = None
    if ref_stage:  # the pool's actors start now (loading the reference) and serve the lazy stage below
        reference_pool = group.reference if running else ReferencePool(cfg, reference_path)
        ds = reference_pool.stage(ds, reference_path, streamed=stream is not None)
        log.info("[train] reference log-probs precomputed by %d %sRefLogp actor(s) (%s)", t.reference.num_actors,
                 "running " if running else "", reference_path)
    elif t.loss.needs_reference and has_ref and t.reference_logps == "precomputed":
        log.info("[train] reference log-probs given with the pairs")
    elif t.loss.needs_reference and t.reference_logps == "worker":
        log.info("[train] reference model on each worker (%s)", reference_path)
    stage = zero_stage(cfg)
    log.info(f"[train] {'up to ' if stream else ''}{n_pairs} pairs -> {'at most ' if stream else ''}{total} optimizer "
        f"steps on {t.num_workers} {'running ' if group else ''}DeepSpeed ZeRO-{stage} worker(s), loss {t.loss.base} "
        f"(beta {t.loss.beta}, weight placement {t.loss.weight_placement})"
        + (f"; ZeRO-0 instead of the configured {t.deepspeed.zero_stage}: one worker has nothing to partition"
           if stage != t.deepspeed.zero_stage else ""))
    t0 = time.time()
    if own:  # its workers start (load the policy, build their engines) while the pairs are prepared
        try:
            group = TrainerGroup(cfg, work_dir)
        except BaseException:
            if reference_pool is not None:
                reference_pool.shutdown()
            raise
    if reference_pool is not None:
        group.reference = reference_pool  # kept (and stopped) with the group
    try:
        shards = None
        if stream is None:
            t_pairs = time.time()
            ds = ds.materialize()  # computed once: a restarted worker gets the same shard
            if ref_stage:  # the reference log-probs the RefLogp stage computed
                refuse_untrainable(ds, str(pairs_source))
            shards = ds.split(t.num_workers, equal=True)
            log.info("[train] pairs ready for the workers in %.1fs", time.time() - t_pairs)
        final, found_trained = group.train(Round(
            index=round_idx, policy_path=str(policy_path), reference_path=str(reference_path), total_steps=total,
            metrics_path=str(metrics_path), tensorboard_dir=str(work_dir / "tensorboard"), shards=shards,
            shuffle=t.shuffle and stream is None,  # a stream is read once, in the order it flows
            # Only a group that outlives the call can hand its weights over: a one-off one's die with it.
            hand_over=not own and cfg.sampling.weight_handover == "memory",
            optimizer_from=carried_optimizer(cfg, policy_path)), stream=ds if stream is not None else None)
    finally:
        if own:
            group.close()
    # Hard links where the run directory and Ray Train's storage share a file system: the checkpoint
    # is a round's largest output, and Ray Train never rewrites a reported checkpoint's files, it
    # only deletes old ones (which keeps our links).
    shutil.copytree(final, output_dir, copy_function=link_or_copy)
    if not checkpoint_has_policy(output_dir):
        raise RuntimeError(f"checkpoint {final} has no HF policy weights")
    shutil.copy(output_dir / METRICS_FILE, metrics_path)
    state = json.loads((output_dir / STATE_FILE).read_text())
    steps = state["optimizer_steps"]
    info = {"pairs": n_pairs, "steps": steps, "seconds": round(time.time() - t0, 1),
            "policy": str(policy_path), "reference": str(reference_path),
            "placement": {"train_workers": state.get("placement", [])}}
    if found_trained:
        info["found_trained"] = True  # the workers died after its final checkpoint; their restart found it there
        log.info("[train] the restarted workers found the round trained in its final checkpoint")
    log.info("[train] done: %d steps in %.1fs", steps, info["seconds"])
    return info
