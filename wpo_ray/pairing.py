"""Difficulty weights and preference pairs from graded samples (Ma et al.; docs/DESIGN.md).

Pure functions: no Ray, no torch. One graded question becomes exactly one pair or one skip record,
so a round keeps its invariant `#prompts in == #pairs + #skips`.

- `difficulty_weights`: the weight of each question from P_c, P_e and N.
- `build_pairs`: a GRADED table -> (PAIRS table, SKIPS table), input order kept.
- `pairs_and_skips_batch` / `split_pairs_and_skips`: the same as one table with a `kind` column,
  because a Ray Data `map_batches` function returns a single table per batch: the round pairs its
  graded table in one pass and splits the result.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from wpo_ray.config import WeightingConfig
from wpo_ray.contracts import GRADED, PAIRS, PAIRS_WITH_REF, REF_LOGP_FIELDS, SKIP_REASONS, SKIPS, VERDICTS, ContractError

# Columns of GRADED this module reads (grade_notes and round are carried but not needed).
_NEEDED = (
    "prompt_id",
    "prompt",
    "gold_answer",
    "gold_solution",
    "responses",
    "response_logps",
    "response_lengths",
    "verdicts",
    "extracted",
)
# The per-sample columns that must line up one-to-one with `responses`.
_PER_SAMPLE = ("responses", "verdicts", "extracted", "response_logps", "response_lengths")

# One table for both outcomes: `kind` plus the union of PAIRS and SKIPS columns, all nullable
# except the shared key, because a skip row has no chosen/rejected and a pair row no reason.
KIND_PAIR = "pair"
KIND_SKIP = "skip"
PAIRS_AND_SKIPS = pa.schema(
    [pa.field("kind", pa.string(), nullable=False)]
    + [f if f.name in ("prompt_id", "round") else f.with_nullable(True) for f in PAIRS]
    + [f.with_nullable(True) for f in SKIPS if f.name not in ("prompt_id", "round")]
)
# A graded batch and its outcomes in one table, so that one Ray Data execution grades and pairs a
# round: the GRADED columns plus each row's PAIRS_AND_SKIPS row as a struct, and optionally the
# pair's reference log-probs (REF_LOGP_FIELDS, null on a skip: `with_ref_logps`).
GRADED_AND_OUTCOMES = pa.schema(list(GRADED) + [pa.field("outcome", pa.struct(list(PAIRS_AND_SKIPS)))])


# --------------------------------------------------------------------------------------- weights


def difficulty_weights(
    n_correct: np.ndarray, n_wrong: np.ndarray, n: np.ndarray | int, alpha: float, eps: float = 1e-6
) -> np.ndarray:
    """Ma et al.'s weight of each question, over arrays (broadcast together), as float64:

    w = 1 + α·P_e/N                          if P_c = 0
    w = max(1, 1 + α·P_e/((P_c + ε)·N))      if P_c > 0

    P_e counts invalid answers as wrong, so normally P_c + P_e = N; fewer is allowed (a caller may
    count only the samples it trusts), more is not. α ≥ 0 and ε > 0 are WeightingConfig's rules.
    """
    pc_, pe_, n_ = np.broadcast_arrays(np.asarray(n_correct), np.asarray(n_wrong), np.asarray(n))
    for name, arr in (("n_correct", pc_), ("n_wrong", pe_), ("n", n_)):
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    if np.any(n_ < 1):
        raise ValueError(f"n must be >= 1, got min {n_.min()}")
    if np.any(pc_ < 0):
        raise ValueError(f"n_correct must be >= 0, got min {pc_.min()}")
    if np.any(pe_ < 0):
        raise ValueError(f"n_wrong must be >= 0, got min {pe_.min()}")
    if np.any(pc_ + pe_ > n_):
        i = int(np.argmax(pc_ + pe_ > n_))
        raise ValueError(
            f"n_correct + n_wrong must be <= n; at index {i}: "
            f"{pc_.flat[i]} + {pe_.flat[i]} > {n_.flat[i]}"
        )
    pcf, pef, nf = pc_.astype(np.float64), pe_.astype(np.float64), n_.astype(np.float64)
    hard = 1.0 + alpha * pef / nf
    soft = np.maximum(1.0, 1.0 + alpha * pef / ((pcf + eps) * nf))
    return np.where(pc_ == 0, hard, soft).astype(np.float64)


# ----------------------------------------------------------------------------------------- pairing


def skip_record(prompt_id: str, round: int, reason: str, detail: Optional[str] = None) -> dict:
    """A SKIPS row; refuses a reason outside contracts.SKIP_REASONS."""
    if reason not in SKIP_REASONS:
        raise ValueError(f"reason must be one of {SKIP_REASONS}, got {reason!r}")
    return {"prompt_id": prompt_id, "round": int(round), "reason": reason, "detail": detail}


def _mean_logp(logp: Optional[float], length: Optional[int]) -> float:
    # Per-token mean so long answers are not penalised; a missing log-prob ranks last.
    if logp is None or (isinstance(logp, float) and math.isnan(logp)):
        return -math.inf
    return float(logp) / max(int(length or 0), 1)


def _best(indices: list[int], means: list[float]) -> int:
    """Index with the highest mean log-prob; ties go to the lowest index."""
    return min(indices, key=lambda i: (-means[i], i))


def _nonblank(text: Optional[str]) -> bool:
    return text is not None and text.strip() != ""


def _choose(row: dict, round: int, mode: str = "sampled_or_gold") -> tuple[Optional[dict], Optional[dict]]:
    """The pair without its weight, or a skip. `mode` is WeightingConfig.chosen: where the chosen
    response comes from (a correct sample, else gold; always gold; only a correct sample)."""
    pid = row["prompt_id"]
    cols = {c: list(row.get(c) or []) for c in _PER_SAMPLE}  # a null list means no samples
    lengths = {c: len(v) for c, v in cols.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"prompt_id {pid!r}: per-sample columns differ in length: {lengths}")
    bad = sorted({v for v in cols["verdicts"] if v not in VERDICTS}, key=str)
    if bad:
        raise ValueError(f"prompt_id {pid!r}: verdicts {bad} not in {VERDICTS}")

    if not _nonblank(row.get("prompt")):
        return None, skip_record(pid, round, "empty_prompt", "prompt is empty or whitespace")
    n = lengths["responses"]
    if n == 0:
        return None, skip_record(pid, round, "no_samples", "no responses")

    verdicts, extracted = cols["verdicts"], cols["extracted"]
    means = [_mean_logp(lp, ln) for lp, ln in zip(cols["response_logps"], cols["response_lengths"])]
    correct = [i for i, v in enumerate(verdicts) if v == "correct"]
    not_correct = [i for i, v in enumerate(verdicts) if v != "correct"]
    n_correct, n_wrong = len(correct), len(not_correct)  # invalid counts as wrong

    if n_wrong == 0:
        return None, skip_record(pid, round, "all_correct", f"{n_correct}/{n} correct")

    gold = next((row[k] for k in ("gold_solution", "gold_answer") if _nonblank(row.get(k))), None)
    if correct and mode != "gold":
        chosen, source = cols["responses"][_best(correct, means)], "sampled"
    elif mode == "sampled":
        return None, skip_record(pid, round, "none_correct", f"0/{n} correct (weighting.chosen=sampled)")
    elif gold is not None:
        chosen, source = gold, "gold"
    elif mode == "gold":
        return None, skip_record(pid, round, "no_gold", "no gold_solution or gold_answer (weighting.chosen=gold)")
    else:
        return None, skip_record(
            pid, round, "no_gold_and_none_correct", f"0/{n} correct and no gold_solution or gold_answer"
        )

    # Group the mistakes by final answer. Invalid samples (even with an extracted answer: its
    # check never finished) and wrong ones with nothing extracted share one group keyed None.
    groups: dict[Optional[str], list[int]] = {}
    for i in not_correct:
        key = extracted[i] if verdicts[i] == "wrong" else None
        groups.setdefault(key, []).append(i)

    def rank(item: tuple[Optional[str], list[int]]) -> tuple:
        key, members = item
        # Most frequent first; a real wrong answer beats "no answer"; then the more confident
        # group; then the earliest one, so the choice never depends on dict or hash order.
        return (-len(members), key is None, -max(means[i] for i in members), members[0])

    answer, members = min(groups.items(), key=rank)
    rejected = cols["responses"][_best(members, means)]

    pair = {
        "prompt_id": pid,
        "round": int(round),
        "prompt": row["prompt"],
        "chosen": chosen if chosen is not None else "",
        "rejected": rejected if rejected is not None else "",
        "weight": None,  # filled by the caller (_fill_weights), one numpy call per batch
        "n_samples": n,
        "n_correct": n_correct,
        "n_wrong": n_wrong,
        "chosen_source": source,
        "rejected_answer": answer,
        "rejected_count": len(members),
    }
    return pair, None


# ------------------------------------------------------------------------------------------ tables


def _fill_weights(pairs: list[dict], weighting: WeightingConfig) -> None:
    # One numpy call for the whole batch instead of a Python call per pair.
    if not pairs:
        return
    if weighting.scheme == "uniform":
        weights = np.ones(len(pairs))
    else:
        weights = difficulty_weights(
            np.array([p["n_correct"] for p in pairs], dtype=np.int64),
            np.array([p["n_wrong"] for p in pairs], dtype=np.int64),
            np.array([p["n_samples"] for p in pairs], dtype=np.int64),
            weighting.alpha,
            weighting.eps,
        )
    for p, w in zip(pairs, weights):
        p["weight"] = float(w)


def _outcomes(graded: pa.Table, round: int, weighting: WeightingConfig,
              too_long: Optional[Callable[[str, str, str], Optional[str]]] = None) -> list[tuple[Optional[dict], Optional[dict]]]:
    """(pair, skip) per input row, in input order, weights filled in. `too_long(prompt, chosen,
    rejected)` says why a pair does not fit training (skip reason `too_long`), or None."""
    missing = [c for c in _NEEDED if c not in graded.column_names]
    if missing:
        raise ContractError(
            f"graded table lacks column(s) {missing}; columns present: {graded.column_names}"
        )
    outcomes = [_choose(row, round, weighting.chosen) for row in graded.select(list(_NEEDED)).to_pylist()]
    if too_long is not None:
        for i, (pair, _) in enumerate(outcomes):
            why = pair and too_long(pair["prompt"], pair["chosen"], pair["rejected"])
            if why:
                outcomes[i] = (None, skip_record(pair["prompt_id"], round, "too_long", why))
    _fill_weights([p for p, _ in outcomes if p is not None], weighting)
    return outcomes


def build_pairs(graded: pa.Table, round: int, weighting: WeightingConfig,
                too_long: Optional[Callable[[str, str, str], Optional[str]]] = None) -> tuple[pa.Table, pa.Table]:
    """A GRADED table -> (PAIRS table, SKIPS table), each in input order.

    Every input row lands in exactly one of the two: len(pairs) + len(skips) == len(graded).
    """
    outcomes = _outcomes(graded, round, weighting, too_long)
    pairs = [p for p, _ in outcomes if p is not None]
    skips = [s for _, s in outcomes if s is not None]
    return pa.Table.from_pylist(pairs, schema=PAIRS), pa.Table.from_pylist(skips, schema=SKIPS)


def pairs_and_skips_batch(graded: pa.Table, round: int, weighting: WeightingConfig,
                          too_long: Optional[Callable[[str, str, str], Optional[str]]] = None) -> pa.Table:
    """`build_pairs` as one table (schema PAIRS_AND_SKIPS), rows in input order.

    For Ray Data: `ds.map_batches(pairs_and_skips_batch, batch_format="pyarrow",
    fn_kwargs={"round": r, "weighting": cfg})`, then `split_pairs_and_skips` on the result.
    """
    rows = []
    for pair, skip in _outcomes(graded, round, weighting, too_long):
        if pair is not None:
            rows.append({"kind": KIND_PAIR, **pair})
        else:
            rows.append({"kind": KIND_SKIP, **skip})
    return pa.Table.from_pylist(rows, schema=PAIRS_AND_SKIPS)


def split_pairs_and_skips(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """Inverse of `pairs_and_skips_batch`: (PAIRS table, SKIPS table), order kept."""
    if table.column("kind").null_count:
        raise ContractError("column 'kind' has null values; each row must be 'pair' or 'skip'")
    kinds = set(table.column("kind").unique().to_pylist())
    if not kinds <= {KIND_PAIR, KIND_SKIP}:
        raise ContractError(f"column 'kind' has values {sorted(kinds - {KIND_PAIR, KIND_SKIP}, key=str)}")
    is_pair = pc.equal(table.column("kind"), KIND_PAIR)
    pairs = table.filter(is_pair).select(PAIRS.names)
    skips = table.filter(pc.invert(is_pair)).select(SKIPS.names)
    # cast restores the non-null flags of the contracts (and fails loudly if a required value is null).
    return pairs.cast(PAIRS), skips.cast(SKIPS)


def with_outcomes(graded: pa.Table, outcomes: pa.Table) -> pa.Table:
    """A GRADED table and its `pairs_and_skips_batch` rows (one per graded row, in its order) as one
    GRADED_AND_OUTCOMES table."""
    if outcomes.num_rows != graded.num_rows or not outcomes.column("prompt_id").equals(graded.column("prompt_id")):
        raise ContractError(f"{outcomes.num_rows} outcome rows for {graded.num_rows} graded rows, or in another "
                            "prompt_id order; expected one per graded row, in its order")
    return graded.append_column(GRADED_AND_OUTCOMES.field("outcome"), outcomes.to_struct_array())


def outcome_pairs(table: pa.Table) -> tuple[pa.Table, np.ndarray]:
    """The pair rows of a GRADED_AND_OUTCOMES table (prompt_id, prompt, chosen, rejected, in order)
    and their row indices in it: what the reference model scores."""
    both = _outcomes_table(table)
    idx = np.flatnonzero(pc.equal(both.column("kind"), KIND_PAIR).to_numpy(zero_copy_only=False))
    return both.take(idx).select(["prompt_id", "prompt", "chosen", "rejected"]), idx


def with_ref_logps(table: pa.Table, idx: np.ndarray, chosen, rejected) -> pa.Table:
    """`table` (GRADED_AND_OUTCOMES) with the reference log-probs of its pair rows `idx` (from
    `outcome_pairs`) as REF_LOGP_FIELDS columns, null on skip rows."""
    if not len(idx) == len(chosen) == len(rejected):
        raise ContractError(f"{len(chosen)}/{len(rejected)} reference log-probs for {len(idx)} pairs")
    for field, values in zip(REF_LOGP_FIELDS, (chosen, rejected)):
        column = [None] * table.num_rows
        for i, v in zip(idx.tolist(), values):
            column[i] = v
        table = table.append_column(field, pa.array(column, field.type))
    return table


def _outcomes_table(table: pa.Table) -> pa.Table:
    outcome = table.column("outcome")
    if outcome.null_count:
        raise ContractError("column 'outcome' has null values; each graded row must have its pair or skip")
    both = pa.Table.from_struct_array(outcome) if outcome.num_chunks else PAIRS_AND_SKIPS.empty_table()
    return both.cast(PAIRS_AND_SKIPS)


def split_outcomes(table: pa.Table) -> tuple[pa.Table, pa.Table, pa.Table]:
    """Inverse of `with_outcomes` (and `with_ref_logps`): (GRADED, PAIRS or PAIRS_WITH_REF, SKIPS)
    tables, order kept."""
    both = _outcomes_table(table)
    pairs, skips = split_pairs_and_skips(both)
    refs = [f.name for f in REF_LOGP_FIELDS]
    if set(refs) <= set(table.column_names):
        scored = table.select(refs).filter(pc.equal(both.column("kind"), KIND_PAIR))
        pairs = pa.Table.from_arrays(pairs.columns + scored.columns, schema=PAIRS_WITH_REF)
    return table.drop_columns(["outcome", *(c for c in refs if c in table.column_names)]).cast(GRADED), pairs, skips
