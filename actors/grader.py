"""GraderActor: grades every sample of a batch on CPU; adds verdicts, extracted answers, notes."""

from __future__ import annotations

import pyarrow as pa

from wpo_ray import contracts
from wpo_ray.cluster import log_placement
from wpo_ray.graders import get_grader
from wpo_ray.logs import setup_worker_logging


class GraderActor:
    """Each answer is checked in the grader's worker process under ``timeout_s`` (see wpo_ray.graders):
    a hang or crash on one answer makes it ``invalid`` with its reason in ``grade_notes``.

    ``grader_kwargs`` go to :func:`get_grader` (tests pass ``check=`` to inject a hang).
    """

    def __init__(self, grader: str, timeout_s: float = 5.0, **grader_kwargs):
        setup_worker_logging()
        log_placement("grader")
        self.grader = get_grader(grader, timeout_s=timeout_s, **grader_kwargs)

    def __call__(self, batch: pa.Table) -> pa.Table:
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
