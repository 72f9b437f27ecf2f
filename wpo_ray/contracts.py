"""The Arrow data contracts every stage speaks (docs/DESIGN.md).

One schema per stage. Column names are a contract: reports, resume and exports depend on them.
`validate(table, "pairs", source=...)` checks an incoming table and names the first wrong column.
"""

from __future__ import annotations

from typing import Iterable

from pathlib import Path

import pyarrow as pa

VERDICTS = ("correct", "wrong", "invalid")
CHOSEN_SOURCES = ("sampled", "gold")
SKIP_REASONS = (
    "all_correct",  # nothing to learn: no wrong answer to reject
    "no_gold_and_none_correct",  # no correct sample and no gold solution to fall back on
    "none_correct",  # weighting.chosen=sampled: no correct sample to choose
    "no_gold",  # weighting.chosen=gold: the question has no gold solution or answer
    "empty_prompt",
    "no_samples",
    "bad_row",  # the loader refused the row (on_bad_row: skip); detail says why
    "too_long",  # prompt + response tokens exceed train.max_length; never truncated
)


class ContractError(ValueError):
    """A table does not match its stage's schema; the message names the column."""


_PROMPT_KEY = [
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("round", pa.int32(), nullable=False),
]

PROMPTS = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("gold_answer", pa.string()),
        pa.field("gold_solution", pa.string()),
    ]
)

SAMPLES = pa.schema(
    _PROMPT_KEY
    + [
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("gold_answer", pa.string()),
        # Not in the design's list, but the pair needs it when no sample is correct.
        pa.field("gold_solution", pa.string()),
        pa.field("responses", pa.list_(pa.string())),
        pa.field("response_logps", pa.list_(pa.float64())),
        pa.field("response_lengths", pa.list_(pa.int32())),
    ]
)

GRADED = pa.schema(
    list(SAMPLES)
    + [
        pa.field("verdicts", pa.list_(pa.string())),  # each one of VERDICTS
        pa.field("extracted", pa.list_(pa.string())),  # null where nothing could be extracted
        pa.field("grade_notes", pa.list_(pa.string())),  # why an answer is invalid (timeout, crash)
    ]
)

PAIRS = pa.schema(
    _PROMPT_KEY
    + [
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("chosen", pa.string(), nullable=False),
        pa.field("rejected", pa.string(), nullable=False),
        pa.field("weight", pa.float64(), nullable=False),
        pa.field("n_samples", pa.int32()),
        pa.field("n_correct", pa.int32()),
        pa.field("n_wrong", pa.int32()),
        pa.field("chosen_source", pa.string()),  # one of CHOSEN_SOURCES
        pa.field("rejected_answer", pa.string()),
        pa.field("rejected_count", pa.int32()),
    ]
)

# Added by the reference log-prob stage; optional in PAIRS.
REF_LOGP_FIELDS = [
    pa.field("ref_chosen_logp", pa.float64()),
    pa.field("ref_rejected_logp", pa.float64()),
]
PAIRS_WITH_REF = pa.schema(list(PAIRS) + REF_LOGP_FIELDS)

SKIPS = pa.schema(
    _PROMPT_KEY
    + [
        pa.field("reason", pa.string(), nullable=False),  # one of SKIP_REASONS
        pa.field("detail", pa.string()),
    ]
)

# TRL's preference format: the minimum a pairs table from elsewhere must have to be trained here.
TRL_PREFERENCE = pa.schema(
    [
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("chosen", pa.string(), nullable=False),
        pa.field("rejected", pa.string(), nullable=False),
    ]
)

SCHEMAS: dict[str, pa.Schema] = {
    "prompts": PROMPTS,
    "samples": SAMPLES,
    "graded": GRADED,
    "pairs": PAIRS,
    "skips": SKIPS,
    "trl": TRL_PREFERENCE,
}

_ENUMS = {
    ("graded", "verdicts"): VERDICTS,
    ("pairs", "chosen_source"): CHOSEN_SOURCES,
    ("skips", "reason"): SKIP_REASONS,
}


def _compatible(actual: pa.DataType, expected: pa.DataType) -> bool:
    """Same type, allowing large_/small string and list variants and widening integer widths."""
    if actual.equals(expected) or pa.types.is_null(actual):  # an all-null column infers as `null`
        return True
    if pa.types.is_string(expected):
        return pa.types.is_string(actual) or pa.types.is_large_string(actual)
    if pa.types.is_integer(expected):
        return pa.types.is_integer(actual)
    if pa.types.is_floating(expected):
        return pa.types.is_floating(actual)
    if pa.types.is_list(expected):
        if pa.types.is_list(actual) or pa.types.is_large_list(actual):
            return _compatible(actual.value_type, expected.value_type)
    return False


def validate(table: pa.Table, stage: str, source: str = "table", extra_required: Iterable[str] = ()) -> pa.Table:
    """Check `table` against `stage`'s schema and return it cast to the exact contract types.

    Extra columns are kept (a TRL dataset may carry more); missing or mistyped ones raise
    ContractError naming the column, the expected type and `source` (a file path, a stage name).
    """
    schema = SCHEMAS[stage]
    names = set(table.column_names)
    fields = list(schema) + [f for f in REF_LOGP_FIELDS if stage == "pairs" and f.name in names]
    for col in extra_required:
        if col not in names:
            raise ContractError(f"{source}: missing column {col!r} required for {stage}")
    for f in fields:
        if f.name not in names:
            raise ContractError(
                f"{source}: missing column {f.name!r} (expected {f.type}) in the {stage} schema; "
                f"columns present: {sorted(names)}"
            )
        actual = table.schema.field(f.name).type
        if not _compatible(actual, f.type):
            raise ContractError(
                f"{source}: column {f.name!r} has type {actual}, expected {f.type} ({stage} schema)"
            )
        col = table.column(f.name)
        if not f.nullable and col.null_count:
            raise ContractError(f"{source}: column {f.name!r} has {col.null_count} null value(s); it must not")
        allowed = _ENUMS.get((stage, f.name))
        if allowed is not None:
            flat = col.combine_chunks()
            if pa.types.is_list(actual) or pa.types.is_large_list(actual):
                flat = flat.flatten()
            bad = set(v for v in flat.unique().to_pylist() if v is not None) - set(allowed)
            if bad:
                raise ContractError(f"{source}: column {f.name!r} has values {sorted(bad)}; allowed: {allowed}")
    target = pa.schema([pa.field(f.name, f.type) for f in fields])
    cols = {f.name: table.column(f.name).cast(f.type) for f in fields}
    rest = {n: table.column(n) for n in table.column_names if n not in cols}
    out = pa.table({**cols, **rest})
    return out.cast(pa.schema(list(target) + [out.schema.field(n) for n in rest]))


def from_rows(rows: list[dict], stage: str) -> pa.Table:
    """Build a table of `stage`'s schema from Python dicts (missing optional keys become null)."""
    schema = SCHEMAS[stage] if stage != "pairs_with_ref" else PAIRS_WITH_REF
    return pa.Table.from_pylist(rows, schema=schema)


def untrainable_rows(batch: pa.Table) -> pa.Table:
    """The pairs of `batch` whose weight or reference log-probs would poison the optimizer state:
    NaN or infinite values, or a negative weight. One row per bad value: prompt_id, column, value,
    expected. Runs as a Ray Data stage: it reports rather than raises, so the driver can name them."""
    import pyarrow.compute as pc

    out = {"prompt_id": [], "column": [], "value": [], "expected": []}
    checks = [("weight", "a finite number >= 0")] + [(f.name, "a finite number") for f in REF_LOGP_FIELDS]
    ids = batch.column("prompt_id").to_pylist() if "prompt_id" in batch.column_names else None
    for col, expected in checks:
        if col not in batch.column_names:
            continue
        values = batch.column(col).cast(pa.float64())
        bad = pc.invert(pc.fill_null(pc.is_finite(values), False))
        if col == "weight":
            bad = pc.or_(bad, pc.fill_null(pc.less(values, 0.0), False))
        for i in pc.indices_nonzero(bad).to_pylist():
            out["prompt_id"].append(str(ids[i]) if ids else f"row {i}")
            out["column"].append(col)
            out["value"].append(str(values[i].as_py()))
            out["expected"].append(expected)
    return pa.table(out, schema=pa.schema([(k, pa.string()) for k in out]))


def untrainable_error(first: dict, n_bad: int, source: str) -> ContractError:
    return ContractError(f"{source}: pair {first['prompt_id']!r} has {first['column']} = {first['value']}, expected "
                         f"{first['expected']} ({n_bad} such value(s)); refusing to train on these pairs")


class AccountingError(ContractError):
    """#prompts in != #pairs + #skips: something was lost or duplicated."""


def check_accounting(r: int, n_in: int, n_pairs: int, n_skips: int) -> None:
    """The invariant of a round: every prompt in comes out as one pair or one skip record."""
    if n_in != n_pairs + n_skips:
        raise AccountingError(
            f"round {r}: {n_in} prompts in but {n_pairs} pairs + {n_skips} skips out; refusing to continue"
        )


def pairs_files(source: Path) -> tuple[list[Path], str]:
    """The files of a pairs source (our pairs directory, a TRL-format dataset directory or one
    file) and their format, "parquet" or "json"; FileNotFoundError naming `--pairs` if none."""
    source = Path(source)
    if source.is_dir():
        files = sorted(source.glob("*.parquet"))
        if files:
            return files, "parquet"
        files = sorted(source.glob("*.jsonl"))
        if files:
            return files, "json"
        raise FileNotFoundError(f"--pairs {source}: no *.parquet or *.jsonl files in the directory")
    if not source.exists():
        raise FileNotFoundError(f"--pairs {source} does not exist")
    return [source], "json" if source.suffix in (".jsonl", ".json") else "parquet"
