"""The Ray Data stages that feed the actors: thin tasks that send each Arrow batch to one of the
actors hosting a heavy resource (engines, graders, reference models) and return its answer.

Tasks, not Ray Data actor pools: Ray Data runs tasks in the worker processes Ray already has,
where an actor stage starts new processes (and their imports) every time it runs, i.e. in every
round. The tasks reserve no CPU (the actors hold the resources) and `proxy_tasks` caps how many
run at once. This module imports nothing heavy, so a task starts in a worker at once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)


def actor_for(batch: pa.Table, n: int) -> int:
    """Which of `n` actors a batch goes to. Any would do (no result depends on it), so take the
    batch's first prompt_id: stable across retries, and it spreads batches over the actors."""
    first = batch.column("prompt_id")[0].as_py() if batch.num_rows else ""
    return zlib.crc32(first.encode()) % n


def proxy_tasks(n_actors: int, per_actor: int = 1):
    """A stage's compute: at most `per_actor` batches in flight per actor. Without a cap, tasks
    that reserve no CPU would all start at once, each in a new worker process."""
    import ray.data

    return ray.data.TaskPoolStrategy(size=n_actors * per_actor)


def call_with_failover(engines: list, start: int, call, what: str, timeout_s: float):
    """`ray.get(call(engine))` on the engine at `start`, or on the next ones while engines are dead.

    A dead engine raises at once (ActorDiedError, or ActorUnavailableError while Ray restarts it);
    the call moves to the next engine and, after trying them all, waits a little and goes round
    again, until `timeout_s` has passed.
    """
    import ray
    from ray.exceptions import RayActorError

    t0, tries = time.time(), 0
    while True:
        engine = engines[(start + tries) % len(engines)]
        try:
            return ray.get(call(engine))
        except RayActorError as e:
            tries += 1
            waited = time.time() - t0
            if waited > timeout_s:
                raise RuntimeError(f"{what}: no sampler engine answered within {timeout_s:g}s "
                                   f"(sampling.failover_timeout_s); last error: {e}") from e
            log.warning("[samplers] %s: engine %d is dead or restarting (%s); trying engine %d", what,
                        (start + tries - 1) % len(engines), type(e).__name__, (start + tries) % len(engines))
            if tries % len(engines) == 0:
                time.sleep(min(10.0, 0.5 * tries))


def sample_batch(batch: pa.Table, engines: list, round_idx: int, run_seed: int, policy: str,
                 failover_timeout_s: float) -> pa.Table:
    """prompts → samples on one of the `SamplerEngine`s, or on the next ones while engines are dead."""
    return call_with_failover(
        engines, actor_for(batch, len(engines)), lambda e: e.sample.remote(batch, round_idx, run_seed, policy),
        f"round {round_idx} batch of {len(batch)} prompts", failover_timeout_s)


def grade_batch(batch: pa.Table, actors: list) -> pa.Table:
    """samples → graded on one of the `GraderActor`s (Ray restarts a dead one and retries)."""
    import ray

    return ray.get(actors[actor_for(batch, len(actors))].grade.remote(batch))


def pair_batch(batch: pa.Table, actors: list, round_idx: int, weighting: dict, too_long=None) -> pa.Table:
    """graded → pairs and skips (one PAIRS_AND_SKIPS table) on one of the `GraderActor`s."""
    import ray

    return ray.get(actors[actor_for(batch, len(actors))].pair.remote(batch, round_idx, weighting, too_long))


def grade_and_pair_batch(batch: pa.Table, actors: list, round_idx: int, weighting: dict, too_long=None) -> pa.Table:
    """samples → graded rows with their pairs and skips (GRADED_AND_OUTCOMES) on one of the `GraderActor`s."""
    import ray

    return ray.get(actors[actor_for(batch, len(actors))].grade_and_pair.remote(batch, round_idx, weighting, too_long))


def ref_logp_batch(batch: pa.Table, actors: list, model_path: str, weights: list | None = None) -> pa.Table:
    """pairs → pairs with reference log-probs under `model_path` (its weights handed over as
    `weights`, when given), on one of the `RefLogpActor`s."""
    import ray

    return ray.get(actors[actor_for(batch, len(actors))].logps.remote(batch, model_path, weights))


def ref_logp_outcomes_batch(batch: pa.Table, actors: list, model_path: str, weights: list | None = None) -> pa.Table:
    """Graded rows with their outcomes → the same with their pairs' reference log-probs under
    `model_path` (null on skips), scored on one of the `RefLogpActor`s."""
    import ray

    from wpo_ray.pairing import outcome_pairs, with_ref_logps

    pairs, idx = outcome_pairs(batch)
    if not len(idx):
        return with_ref_logps(batch, idx, [], [])
    scored = ray.get(actors[actor_for(batch, len(actors))].logps.remote(pairs, model_path, weights))
    return with_ref_logps(batch, idx, scored.column("ref_chosen_logp").to_pylist(),
                          scored.column("ref_rejected_logp").to_pylist())


def pair_and_persist(batch: pa.Table, actors: list, out_dir: str, round_idx: int, weighting: dict,
                     too_long=None) -> pa.Table:
    """A streamed round's graded batch → its pairs, paired on one of the `GraderActor`s; the
    batch's samples / graded / pairs / skips are written as Parquet parts under `out_dir`, named
    by a hash of its prompt ids (a retried task rewrites the same files)."""
    from wpo_ray import contracts
    from wpo_ray.pairing import split_pairs_and_skips

    graded = contracts.validate(batch, "graded", source="grader output")
    pairs, skips = split_pairs_and_skips(pair_batch(graded, actors, round_idx, weighting, too_long))
    name = hashlib.sha256("\0".join(graded.column("prompt_id").to_pylist()).encode()).hexdigest()[:20]
    samples = graded.select(contracts.SAMPLES.names)
    for stage, table in (("samples", samples), ("graded", graded), ("pairs", pairs), ("skips", skips)):
        d = Path(out_dir) / stage
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{name}.parquet.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, d / f"{name}.parquet")
    return pairs
