"""A round with streaming overlap (`run.overlap: streaming`): samplers and trainers run at once.

One Ray Data pipeline goes from the round's prompts to the training workers:

    prompts → sample_batch (engines) → grade_batch, pair_and_persist (graders) → ref_logp_batch
            → the trainer group's workers (one streaming split per round, equal shares)

The workers train on the first pairs while the samplers still sample the rest. In the main job
they are the run's trainer group (`run.trainers: persistent`), already up from the round before,
so nothing but the first sampling batch stands between the round's start and its first step.
`pair_and_persist`
(actors/stages.py) pairs each graded batch and writes the batch's samples, graded rows, pairs and skips as Parquet
parts named by the batch's prompt ids, so a retried task rewrites the same files instead of adding
rows. When training ends, the parts, read in prompt order, become the round's usual `samples/
graded/ pairs/ skips/`, the accounting is checked, and the stages are recorded as in a staged round; the report,
resume and exports see no difference.

What streaming changes, and why:
- The number of pairs is unknown when training starts: the LR schedule is sized for the most pairs
  the round can give (one per prompt), and training ends with the stream.
- One pass (`train.epochs: 1`): a stream cannot be replayed without sampling again.
- Reference log-probs (`train.reference_logps: precomputed`) come from the RefLogp actor stage
  inside the stream, one sampling batch's pairs at a time (with `worker`, from a reference model on
  each worker).
- A failed worker restarts the round's training from its start (`train.checkpoint_every: 0`): the
  restarted group gets a fresh split of the stream, which samples again with the same per-prompt
  seeds: the same pairs, state exactly-once. Which worker trains which pair is not fixed, unlike the staged fixed shards.
- A driver that dies mid-round leaves only `stream.tmp/`, deleted on the rerun, which redoes the round.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import pyarrow.parquet as pq

from actors.stages import pair_and_persist, proxy_tasks
from pipeline.sampling import (length_check, pairs_stage, prompts_stage, read_in_order, sample_stage,
                               write_in_order)
from pipeline.training import run_training
from wpo_ray import contracts
from wpo_ray.cluster import data_context
from wpo_ray.config import Config
from wpo_ray.rundir import RunDir

log = logging.getLogger(__name__)

PARTS = "stream.tmp"


def run_round_streaming(cfg: Config, run: RunDir, r: int, policy_path: str, reference_path: str, pool,
                        checkpoint_dir: Path, graders=None, group=None) -> dict:
    """Sample, grade, pair and train round r in one pipeline on the run's engines (`pool`) and
    GraderPool (one is started for the call if none is given), writing the checkpoint to
    `checkpoint_dir`; record the sampling-half stages; return the training's record. `group`: the
    run's trainer group (pipeline/training.py), already up, so the first pairs meet running
    workers; without one a group is started for the round."""
    if graders is None:
        from actors.grader import GraderPool

        graders = GraderPool(cfg)
        try:
            return run_round_streaming(cfg, run, r, policy_path, reference_path, pool, checkpoint_dir, graders, group)
        finally:
            graders.shutdown()
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
    graded = graders.grade_stage(sample_stage(prompts, cfg, pool, r, policy_path))
    pairs = graded.map_batches(  # a block (one sampling batch) at a time, as it comes
        pair_and_persist, fn_kwargs=dict(actors=graders.actors, out_dir=str(parts), round_idx=r,
                                         weighting=cfg.weighting.model_dump(), too_long=length_check(cfg, policy_path)),
        batch_size=None, batch_format="pyarrow", num_cpus=0, compute=proxy_tasks(len(graders.actors), 2))
    info = run_training(cfg, None, checkpoint_dir, policy_path, reference_path, run.train_dir(r),
                        stream=(pairs, n_prompts), group=group, round_idx=r)

    # How long training and sampling ran at once: from the first optimizer step to the last pairs.
    last_pairs = max((f.stat().st_mtime for f in (parts / "pairs").glob("*.parquet")), default=t0)
    first_step = next((json.loads(x)["time"] for x in run.metrics_file(r).read_text().splitlines() if x.strip()),
                      None)
    info["overlap_seconds"] = round(last_pairs - first_step, 1) if first_step else 0.0

    # The parts become the round's stage outputs, exactly as a staged round writes them. Each part
    # is one sampling batch, a run of consecutive prompts, so reading them in order needs no sort.
    for stage, schema in (("samples", contracts.SAMPLES), ("graded", contracts.GRADED)):
        run.stage(r, stage, lambda out, stage=stage, schema=schema: dict(
            rows=write_in_order(read_in_order(parts / stage), out(stage), schema),
            policy=policy_path, backend=cfg.sampling.backend, overlap="streaming"))

    def pairs_and_skips(pairs_out: Path, skips_out: Path) -> None:
        write_in_order(read_in_order(parts / "pairs"), pairs_out, contracts.PAIRS)
        write_in_order(read_in_order(parts / "skips"), skips_out, contracts.SKIPS)

    pairs_stage(run, r, pairs_and_skips)
    shutil.rmtree(parts, ignore_errors=True)
    info["pairs"] = run.done(r, "pairs")["pairs"]
    info["overlap"] = "streaming"
    log.info("[round %d] streamed round done in %.1fs: %d pairs, %d steps; training ran alongside sampling for %ss",
             r, time.time() - t0, info["pairs"], info["steps"], info["overlap_seconds"])
    return info
