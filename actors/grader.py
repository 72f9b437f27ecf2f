"""Graders: actors that grade samples and pair graded questions, on CPU, for the whole run.

`GraderActor` hosts one grader (its checking worker process included) and, for pairing, the
policy's tokenizer that says whether a pair fits `train.max_length`. `GraderPool` starts
`grading.num_actors` of them once; its owner (the run, or one `wpo-ray sample` call) keeps them
for every round, so no round pays a grader start-up or a tokenizer load in a fresh worker (that
was ~20 s of a tiny round's pairing: docs/BENCHMARKS.md). Its Ray Data stages are
`actors/stages.py: grade_batch` and `pair_batch`.
"""

from __future__ import annotations

import importlib
import os
import threading

import pyarrow as pa

from wpo_ray import contracts
from wpo_ray.cluster import log_placement
from wpo_ray.config import Config, WeightingConfig
from wpo_ray.failpoints import failpoint
from wpo_ray.graders import get_grader
from wpo_ray.logs import setup_worker_logging
from wpo_ray.pairing import pairs_and_skips_batch, with_outcomes


class GraderActor:
    """Each answer is checked in the grader's worker process under ``timeout_s`` (see wpo_ray.graders):
    a hang or crash on one answer makes it ``invalid`` with its reason in ``grade_notes``.

    ``grader_kwargs`` go to :func:`get_grader` (tests pass ``check=`` to inject a hang).
    """

    def __init__(self, grader: str, timeout_s: float = 5.0, preload_tokenizers: bool = False, **grader_kwargs):
        setup_worker_logging()
        log_placement("grader")
        # transformers takes seconds to import: do it while the first round grades. `pair` waits for
        # it, since a second import of a package half-imported by another thread can fail.
        self._preload = None
        if preload_tokenizers:
            self._preload = threading.Thread(target=importlib.import_module, args=("transformers",), daemon=True)
            self._preload.start()
        self.grader = get_grader(grader, timeout_s=timeout_s, **grader_kwargs)
        self.length_check = None  # the LengthCheck of the last pairing call, its tokenizer loaded
        self.tokenizer_loads = 0

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.grade(batch)

    def grade(self, batch: pa.Table) -> pa.Table:
        """samples → graded: verdicts, extracted answers and notes added."""
        failpoint("grader.grade")
        verdicts, extracted, notes = [], [], []
        golds = batch.column("gold_answer").to_pylist()
        for responses, gold in zip(batch.column("responses").to_pylist(), golds):
            grades = self.grader.grade_many(responses, gold) if responses else []
            verdicts.append([g.verdict for g in grades])
            extracted.append([g.extracted for g in grades])
            notes.append([g.note for g in grades])
        out = batch.append_column("verdicts", pa.array(verdicts, pa.list_(pa.string())))
        out = out.append_column("extracted", pa.array(extracted, pa.list_(pa.string())))
        out = out.append_column("grade_notes", pa.array(notes, pa.list_(pa.string())))
        return contracts.validate(out, "graded", source="grader output")

    def pair(self, graded: pa.Table, round_idx: int, weighting: dict, too_long=None) -> pa.Table:
        """graded → pairs and skips as one table (wpo_ray/pairing.py). `too_long`: a LengthCheck;
        the one held is kept while the check is the same (its tokenizer already loaded)."""
        failpoint("grader.pair")
        if self._preload is not None:
            self._preload.join()
            self._preload = None
        if too_long is not None:
            if self.length_check is None or self.length_check.key() != too_long.key():
                self.length_check = too_long
                self.tokenizer_loads += 1
            too_long = self.length_check
        return pairs_and_skips_batch(graded, round_idx, WeightingConfig.model_validate(weighting), too_long)

    def grade_and_pair(self, batch: pa.Table, round_idx: int, weighting: dict, too_long=None) -> pa.Table:
        """samples → graded rows with their pairs and skips (GRADED_AND_OUTCOMES): `grade`, then `pair`."""
        graded = self.grade(batch)
        return with_outcomes(graded, self.pair(graded, round_idx, weighting, too_long))

    def info(self) -> dict:
        """Which process this is and how often it loaded a tokenizer (tests check the pool persists)."""
        return {"pid": os.getpid(), "tokenizer_loads": self.tokenizer_loads}

    def close(self) -> None:
        self.grader.close()


class GraderPool:
    """`grading.num_actors` GraderActors, started once and kept until `shutdown`. Ray restarts a
    dead one (as often as it dies: it holds no state but a cache) and retries the call it was
    running, twice at most, so a batch that kills its grader every time fails the stage instead of
    looping. Grading and pairing are pure: a retried batch gives the same rows."""

    def __init__(self, cfg: Config, **grader_kwargs):
        import ray

        g = cfg.grading
        remote = ray.remote(num_cpus=1, max_restarts=-1, max_task_retries=2)(GraderActor)
        self.actors = [remote.remote(g.grader, g.timeout_s, True, **grader_kwargs) for _ in range(g.num_actors)]
        ray.get([a.info.remote() for a in self.actors])  # started (a failing constructor raises here)

    # Both stages take a block at a time (batch_size=None: one sampling batch's rows, as the
    # samples are written): re-batching to a fixed size cost more than the grading (measured).
    # Two batches in flight per grader: one graded while the next arrives.

    def grade_stage(self, ds):
        """samples → graded, as a lazy Ray Data stage."""
        from actors.stages import grade_batch, proxy_tasks

        return ds.map_batches(grade_batch, fn_kwargs=dict(actors=self.actors), batch_size=None,
                              batch_format="pyarrow", num_cpus=0, compute=proxy_tasks(len(self.actors), 2))

    def pair_stage(self, ds, round_idx: int, weighting: WeightingConfig, too_long=None):
        """graded → pairs and skips as one table (schema PAIRS_AND_SKIPS), as a lazy Ray Data stage."""
        from actors.stages import pair_batch, proxy_tasks

        return ds.map_batches(pair_batch, fn_kwargs=dict(
            actors=self.actors, round_idx=round_idx, weighting=weighting.model_dump(), too_long=too_long),
            batch_size=None, batch_format="pyarrow", num_cpus=0, compute=proxy_tasks(len(self.actors), 2))

    def grade_and_pair_stage(self, ds, round_idx: int, weighting: WeightingConfig, too_long=None):
        """samples → graded rows with their pairs and skips (GRADED_AND_OUTCOMES), as one lazy Ray
        Data stage: a staged round grades and pairs in one execution."""
        from actors.stages import grade_and_pair_batch, proxy_tasks

        return ds.map_batches(grade_and_pair_batch, fn_kwargs=dict(
            actors=self.actors, round_idx=round_idx, weighting=weighting.model_dump(), too_long=too_long),
            batch_size=None, batch_format="pyarrow", num_cpus=0, compute=proxy_tasks(len(self.actors), 2))

    def info(self) -> list[dict]:
        import ray

        return ray.get([a.info.remote() for a in self.actors])

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            try:
                ray.get(a.close.remote(), timeout=10)
            except Exception:  # a dead actor has no grader process left to close
                pass
            ray.kill(a)
        self.actors = []
