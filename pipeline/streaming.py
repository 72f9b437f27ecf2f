"""A round with streaming overlap (`run.overlap: streaming`): samplers and trainers run at once.

One Ray Data pipeline goes from the round's prompts to the training workers:

    prompts → SampleBatch (engines) → GraderActor → persist_and_pair → RefLogpActor → Ray Train workers

The workers start on the first pairs while the samplers still sample the rest. `persist_and_pair`
pairs each graded batch and writes the batch's samples, graded rows, pairs and skips as Parquet
parts named by the batch's prompt ids, so a retried task rewrites the same files instead of adding
rows. When training ends, the parts are sorted into the round's usual `samples/ graded/ pairs/
skips/`, the accounting is checked, and the stages are recorded as in a staged round; the report,
resume and exports see no difference.

What streaming changes, and why:
- The number of pairs is unknown when training starts: the LR schedule is sized for the most pairs
  the round can give (one per prompt), and training ends with the stream.
- One pass (`train.epochs: 1`): a stream cannot be replayed without sampling again.
- Reference log-probs (`train.reference_logps: precomputed`) come from the RefLogp actor stage
  inside the stream, one sampling batch's pairs at a time (with `worker`, from a reference model on
  each worker).
- A failed worker restarts the round's training from its start (`train.checkpoint_every: 0`), and
  the restarted stream samples again with the same per-prompt seeds: the same pairs, state
  exactly-once. Which worker trains which pair is not fixed, unlike the staged fixed shards.
- A driver that dies mid-round leaves only `stream.tmp/`, deleted on the rerun, which redoes the round.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.sampling import grade_stage, length_check, pairs_stage, prompts_stage, sample_stage, write_parquet
from pipeline.training import run_training
from wpo_ray import contracts
from wpo_ray.cluster import data_context
from wpo_ray.config import Config, WeightingConfig
from wpo_ray.rundir import RunDir

log = logging.getLogger(__name__)

PARTS = "stream.tmp"


def persist_and_pair(batch: pa.Table, out_dir: str, round_idx: int, weighting: dict, too_long=None) -> pa.Table:
    """Pair a graded batch, write its samples / graded / pairs / skips parts, pass the pairs on."""
    from wpo_ray.pairing import build_pairs

    graded = contracts.validate(batch, "graded", source="grader output")
    pairs, skips = build_pairs(graded, round_idx, WeightingConfig.model_validate(weighting), too_long)
    name = hashlib.sha256("\0".join(graded.column("prompt_id").to_pylist()).encode()).hexdigest()[:20]
    samples = graded.select(contracts.SAMPLES.names)
    for stage, table in (("samples", samples), ("graded", graded), ("pairs", pairs), ("skips", skips)):
        d = Path(out_dir) / stage
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{name}.parquet.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, d / f"{name}.parquet")
    return pairs


def run_round_streaming(cfg: Config, run: RunDir, r: int, policy_path: str, reference_path: str, pool,
                        checkpoint_dir: Path) -> dict:
    """Sample, grade, pair and train round r in one pipeline, writing the checkpoint to
    `checkpoint_dir`; record the sampling-half stages; return the training's record."""
    import ray.data

    data_context()
    n_prompts = prompts_stage(cfg, run, r, policy_path)
    parts = run.round_dir(r) / PARTS
    shutil.rmtree(parts, ignore_errors=True)
    pool.load_weights(policy_path)
    t0 = time.time()
    log.info("[round %d] streaming: %d prompts x %d samples flow through the graders into %d training worker(s) "
             "as they are sampled", r, n_prompts, cfg.sampling.n, cfg.train.num_workers)
    # One block per sampling batch: a map task emits its output when its input block is done, so
    # a single block of all prompts would reach the trainers only once everything is sampled.
    table, bs = pq.read_table(run.output(r, "prompts") / "prompts.parquet"), cfg.sampling.batch_size
    prompts = ray.data.from_arrow([table.slice(i, bs) for i in range(0, max(len(table), 1), bs)])
    pairs = grade_stage(sample_stage(prompts, cfg, pool, r, policy_path), cfg).map_batches(
        persist_and_pair, fn_kwargs=dict(out_dir=str(parts), round_idx=r, weighting=cfg.weighting.model_dump(),
                                         too_long=length_check(cfg, policy_path)),
        # No CPU reserved: it only writes small files, and a reservation would keep the RefLogp actor
        # from starting until sampling ends (measured). Batch size: Ray's default waits for 1024 rows.
        batch_size=cfg.sampling.batch_size, batch_format="pyarrow", num_cpus=0)
    info = run_training(cfg, None, checkpoint_dir, policy_path, reference_path, run.train_dir(r),
                        stream=(pairs, n_prompts), round_idx=r)

    # How long training and sampling ran at once: from the first optimizer step to the last pairs.
    last_pairs = max((f.stat().st_mtime for f in (parts / "pairs").glob("*.parquet")), default=t0)
    first_step = next((json.loads(x)["time"] for x in run.metrics_file(r).read_text().splitlines() if x.strip()),
                      None)
    info["overlap_seconds"] = round(last_pairs - first_step, 1) if first_step else 0.0

    # The parts become the round's stage outputs, exactly as a staged round writes them.
    for stage, schema in (("samples", contracts.SAMPLES), ("graded", contracts.GRADED)):
        run.stage(r, stage, lambda out, stage=stage, schema=schema: dict(
            rows=write_parquet(ray.data.read_parquet(str(parts / stage)).sort("prompt_id"), out(stage), schema),
            policy=policy_path, backend=cfg.sampling.backend, overlap="streaming"))
    pairs_stage(run, r, lambda: (ray.data.read_parquet(str(parts / "pairs")), ray.data.read_parquet(str(parts / "skips"))))
    shutil.rmtree(parts, ignore_errors=True)
    info["pairs"] = run.done(r, "pairs")["pairs"]
    info["overlap"] = "streaming"
    log.info("[round %d] streamed round done in %.1fs: %d pairs, %d steps; training ran alongside sampling for %ss",
             r, time.time() - t0, info["pairs"], info["steps"], info["overlap_seconds"])
    return info
