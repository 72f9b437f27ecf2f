"""Loading the prompt set of a split: the built-in arithmetic task, JSONL, Parquet or an HF dataset.

``load_prompts(cfg.data, "train")`` returns ``(prompts, bad_rows)``: a table of the PROMPTS contract
and a table of the SKIPS contract (reason ``bad_row``, round 0, ``detail`` = the error message).

Field mapping (``data.fields``): ``question`` and ``answer`` are required in every row; ``solution``
is optional (null when the field is unmapped, absent or null); ``id`` is optional as a whole: when
it is unmapped (None) or the file has no such field at all, ids are ``"<stem>-<row index>"``
(0-based; the stem is the file name without suffix, for a DatasetDict ``"<dir>-<split>"``). Once a
file does carry the id field, every row needs one and ids must be unique. Answers and ids may be
numbers (they become strings); questions must be non-empty strings.

Errors raise :class:`PromptDataError` naming the file, the row (``line N``, 1-based, for JSONL;
``row N``, 1-based, for tables) and the field. File-level problems always raise: a missing or empty
file, bytes that are not UTF-8 (line and byte offset), an unreadable Parquet file, a missing or
mistyped mapped column. Row-level problems (missing field, wrongly typed or empty value, duplicate
id, a line that is not a JSON object) raise under ``on_bad_row: error`` and become skip records
under ``on_bad_row: skip``; nothing is dropped silently. Bad-row skip records use the positional id
``"<stem>-<row index>"``. Blank JSONL lines are not rows. ``max_prompts`` stops reading once that
many good rows are collected (later rows are neither checked nor reported).

``hf_disk`` reads ``datasets.load_from_disk`` directories; a DatasetDict picks ``split``, and when
``data.test_path`` is unset the test split comes from the DatasetDict at ``data.train_path``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal, Optional

import pyarrow as pa

from wpo_ray import arithmetic
from wpo_ray.config import DataConfig
from wpo_ray.contracts import from_rows

log = logging.getLogger(__name__)


class PromptDataError(ValueError):
    """The prompt data cannot be used; the message names the file, row and field."""


class _BadRow(Exception):
    def __init__(self, field: str, problem: str):
        super().__init__(problem)
        self.field = field
        self.problem = problem


def _typename(v: Any) -> str:
    return type(v).__name__


def _as_text(v: Any, field: str, what: str) -> str:
    """A string, or an int/float turned into one; anything else is a bad row."""
    if isinstance(v, str):
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _BadRow(field, f"{what} must be a string or a number, got {_typename(v)} {str(v)[:40]!r}")
    return str(v)


class _Collector:
    """Turns raw records into prompt rows or bad-row records, with the shared checks."""

    def __init__(self, cfg: DataConfig, label: str, stem: str, use_ids: bool):
        self.cfg = cfg
        self.f = cfg.fields
        self.label = label
        self.stem = stem
        self.use_ids = use_ids
        self.rows: list[dict] = []
        self.skips: list[dict] = []
        self.seen: dict[str, str] = {}

    @property
    def full(self) -> bool:
        return self.cfg.max_prompts is not None and len(self.rows) >= self.cfg.max_prompts

    def bad(self, idx: int, where: str, field: Optional[str], problem: str) -> None:
        field_txt = f"field {field!r}" if field else "all fields"
        msg = f"{self.label}: {where}, {field_txt}: {problem}"
        if self.cfg.on_bad_row == "error":
            raise PromptDataError(msg + " (set data.on_bad_row=skip to skip bad rows)")
        self.skips.append({"prompt_id": f"{self.stem}-{idx}", "round": 0, "reason": "bad_row", "detail": msg})

    def add(self, idx: int, where: str, rec: dict) -> None:
        try:
            self.rows.append(self._row(idx, where, rec))
        except _BadRow as e:
            self.bad(idx, where, e.field, e.problem)

    def _row(self, idx: int, where: str, rec: dict) -> dict:
        f = self.f
        q = rec.get(f.question)
        if q is None:
            raise _BadRow(f.question, "missing field (the question)")
        if not isinstance(q, str):
            raise _BadRow(f.question, f"the question must be a string, got {_typename(q)} {str(q)[:40]!r}")
        if not q.strip():
            raise _BadRow(f.question, "empty question")
        a = rec.get(f.answer)
        if a is None:
            raise _BadRow(f.answer, "missing field (the gold answer)")
        answer = _as_text(a, f.answer, "the answer")
        if not answer.strip():
            raise _BadRow(f.answer, "empty answer")
        solution = None
        if f.solution is not None and rec.get(f.solution) is not None:
            solution = _as_text(rec[f.solution], f.solution, "the solution")
        if self.use_ids:
            raw = rec.get(f.id)
            if raw is None:
                raise _BadRow(f.id, "missing field (the id; other rows have one)")
            if isinstance(raw, float) and raw.is_integer():
                raw = int(raw)
            pid = _as_text(raw, f.id, "the id")
            if not pid.strip():
                raise _BadRow(f.id, "empty id")
            if pid in self.seen:
                raise _BadRow(f.id, f"duplicate id {pid!r} (first at {self.seen[pid]})")
            self.seen[pid] = where
        else:
            pid = f"{self.stem}-{idx}"
        return {"prompt_id": pid, "prompt": q, "gold_answer": answer, "gold_solution": solution}


# ------------------------------------------------------------------------------------ readers


def _check_file(path: Path, key: str) -> None:
    if not path.exists():
        raise PromptDataError(f"{path}: file not found ({key})")
    if not path.is_file():
        raise PromptDataError(f"{path}: not a file ({key})")


def _read_jsonl(path: Path, cfg: DataConfig, key: str) -> _Collector:
    _check_file(path, key)
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    # Decode and parse line by line, so an error names its line and byte offset.
    records: list[tuple[int, Any]] = []  # (line number, dict | _BadRow)
    offset = 0
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        line_start = offset
        offset += len(raw) + 1
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise PromptDataError(
                f"{path}: line {lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte offset "
                f"{line_start + e.start} of the file, column {e.start + 1} of the line)"
            ) from None
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            records.append((lineno, _BadRow("", f"invalid JSON at column {e.colno} ({e.msg}; truncated line?)")))
            continue
        if not isinstance(obj, dict):
            records.append((lineno, _BadRow("", f"expected a JSON object, got {_typename(obj)}")))
            continue
        records.append((lineno, obj))
    if not records:
        raise PromptDataError(f"{path}: empty file (no rows) ({key})")
    f = cfg.fields
    use_ids = f.id is not None and any(isinstance(r, dict) and f.id in r for _, r in records)
    col = _Collector(cfg, str(path), path.stem, use_ids)
    for idx, (lineno, rec) in enumerate(records):
        if col.full:
            break
        where = f"line {lineno}"
        if isinstance(rec, _BadRow):
            col.bad(idx, where, rec.field or None, rec.problem)
        else:
            col.add(idx, where, rec)
    return col


def _check_columns(table: pa.Table, cfg: DataConfig, label: str) -> bool:
    """File-level checks of a table's columns; returns whether ids come from the file."""
    f = cfg.fields
    names = table.column_names

    def typ(name: str) -> pa.DataType:
        return table.schema.field(name).type

    def textual(t: pa.DataType) -> bool:
        return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)

    def numeric(t: pa.DataType) -> bool:
        return pa.types.is_integer(t) or pa.types.is_floating(t)

    for role, name in (("question", f.question), ("answer", f.answer)):
        if name not in names:
            raise PromptDataError(
                f"{label}: missing column {name!r} (data.fields.{role}); columns present: {names}"
            )
    if not textual(typ(f.question)):
        raise PromptDataError(
            f"{label}: column {f.question!r} (data.fields.question) has type {typ(f.question)}, "
            "expected string"
        )
    for role, name in (("answer", f.answer), ("solution", f.solution), ("id", f.id)):
        if name is None or name not in names:
            continue
        if not (textual(typ(name)) or numeric(typ(name))):
            raise PromptDataError(
                f"{label}: column {name!r} (data.fields.{role}) has type {typ(name)}, "
                "expected string or number"
            )
    return f.id is not None and f.id in names


def _collect_table(table: pa.Table, cfg: DataConfig, label: str, stem: str) -> _Collector:
    if table.num_rows == 0:
        raise PromptDataError(f"{label}: empty file (no rows)")
    use_ids = _check_columns(table, cfg, label)
    f = cfg.fields
    wanted = [n for n in dict.fromkeys([f.id, f.question, f.answer, f.solution]) if n and n in table.column_names]
    col = _Collector(cfg, label, stem, use_ids)
    idx = 0
    for batch in table.select(wanted).to_batches(max_chunksize=4096):
        for rec in batch.to_pylist():
            if col.full:
                return col
            col.add(idx, f"row {idx + 1}", rec)
            idx += 1
    return col


def _read_parquet(path: Path, cfg: DataConfig, key: str) -> _Collector:
    import pyarrow.parquet as pq

    _check_file(path, key)
    if path.stat().st_size == 0:
        raise PromptDataError(f"{path}: empty file (no rows) ({key})")
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad file
        raise PromptDataError(f"{path}: cannot read as Parquet: {e}") from None
    return _collect_table(table, cfg, str(path), path.stem)


def _read_hf_disk(path: Path, cfg: DataConfig, split: str, key: str, need_split: bool) -> _Collector:
    import datasets

    if not path.exists():
        raise PromptDataError(f"{path}: directory not found ({key})")
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001
        raise PromptDataError(f"{path}: cannot load with datasets.load_from_disk: {e}") from None
    label, stem = str(path), path.name
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise PromptDataError(f"{path}: the DatasetDict has no split {split!r}; splits: {sorted(ds)}")
        ds = ds[split]
        label, stem = f"{path}[{split}]", f"{path.name}-{split}"
    elif need_split:
        raise PromptDataError(
            f"data.test_path is not set and {path} is a single Dataset, not a DatasetDict with a "
            f"{split!r} split"
        )
    table = ds.with_format("arrow")[:]
    return _collect_table(table, cfg, label, stem)


# ------------------------------------------------------------------------------------ entry point


def chat_prompts(prompts: list[str], tokenizer) -> list[str]:
    if tokenizer is None:
        raise PromptDataError("data.chat_template is true but no tokenizer was given to load_prompts")
    out = []
    for q in prompts:
        try:
            out.append(
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
                )
            )
        except Exception as e:  # noqa: BLE001
            raise PromptDataError(f"data.chat_template: the tokenizer cannot apply a chat template: {e}") from None
    return out


def split_too_long(prompts: pa.Table, tokenizer, limit: int, round_idx: int) -> tuple[pa.Table, list[dict]]:
    """(prompts that fit `limit` tokens, `too_long` skip records of the others). Counted with the
    policy's tokenizer and its special tokens, as the engine sees them."""
    texts = prompts.column("prompt").to_pylist()
    lengths = [len(tokenizer(t or "")["input_ids"]) for t in texts]
    keep = [n <= limit for n in lengths]
    skips = [{"prompt_id": pid, "round": round_idx, "reason": "too_long",
              "detail": f"prompt of {n} tokens > {limit} (data.max_prompt_length, or the engine's length "
                        "minus sampling.max_tokens)"}
             for pid, n, k in zip(prompts.column("prompt_id").to_pylist(), lengths, keep) if not k]
    return prompts.filter(pa.array(keep, pa.bool_())), skips


def check_template_fits(tokenizer, limit: int) -> None:
    """A chat template longer than the prompt limit on its own would skip every prompt: refuse it."""
    empty = tokenizer.apply_chat_template([{"role": "user", "content": ""}], tokenize=False, add_generation_prompt=True)
    n = len(tokenizer(empty)["input_ids"])
    if n >= limit:
        raise PromptDataError(f"data.max_prompt_length: {limit} tokens, but the chat template alone takes {n}; "
                              "every prompt would be too long")


def round_prompts(prompts: pa.Table, bad: pa.Table, cfg: DataConfig, rounds: int, r: int) -> tuple[pa.Table, pa.Table]:
    """Round r's slice of the train split (:func:`round_window`) and the loader's bad rows it reports:
    every round's, unless rounds take fresh windows (:meth:`DataConfig.round_window`), when round 1 reports them once."""
    start, stop = cfg.round_window(prompts.num_rows, rounds, r)
    windowed = cfg.prompts_per_round is not None and not cfg.reuse_prompts
    return prompts.slice(start, stop - start), bad.slice(0, 0) if windowed and r > 1 else bad


def load_prompts(
    cfg: DataConfig, split: Literal["train", "test", "dev"], tokenizer=None
) -> tuple[pa.Table, pa.Table]:
    """``(prompts, bad_rows)`` of one split: PROMPTS and SKIPS contract tables (see module doc).
    The arithmetic task's dev split depends on the bootstrap: `wpo_ray.bootstrap.dev_rows`."""
    if split not in ("train", "test", "dev"):
        raise ValueError(f"split must be 'train', 'test' or 'dev', got {split!r}")
    if cfg.source == "arithmetic" and split == "dev":
        raise ValueError("the arithmetic task's dev split comes from wpo_ray.bootstrap.dev_rows")
    if cfg.source == "arithmetic":
        n = cfg.arithmetic.n_train if split == "train" else cfg.arithmetic.n_test
        if cfg.max_prompts is not None:
            n = min(n, cfg.max_prompts)
        rows = arithmetic.make_split(cfg.arithmetic, split, n=n)
        if cfg.chat_template:
            for r, p in zip(rows, chat_prompts([r["prompt"] for r in rows], tokenizer)):
                r["prompt"] = p
        return arithmetic.to_prompts_table(rows), from_rows([], "skips")

    key = f"data.{split}_path"
    raw_path = {"train": cfg.train_path, "test": cfg.test_path, "dev": cfg.dev_path}[split]
    fallback = raw_path is None and split == "test" and cfg.source == "hf_disk"
    if fallback:  # a DatasetDict at train_path carries its own test split
        raw_path, key = cfg.train_path, "data.train_path (its 'test' split; data.test_path is unset)"
    if raw_path is None:
        raise PromptDataError(f"{key} is not set (data.source is {cfg.source!r})")
    path = Path(raw_path).expanduser()
    if cfg.source == "jsonl":
        col = _read_jsonl(path, cfg, key)
    elif cfg.source == "parquet":
        col = _read_parquet(path, cfg, key)
    elif cfg.source == "hf_disk":
        col = _read_hf_disk(path, cfg, split, key, need_split=fallback)
    else:  # pragma: no cover - the config's Literal forbids it
        raise PromptDataError(f"unknown data.source {cfg.source!r}")

    if not col.rows:
        first = col.skips[0]["detail"] if col.skips else "no rows"
        raise PromptDataError(f"{col.label}: no usable rows ({len(col.skips)} bad); first: {first}")
    if col.skips:
        log.warning("%s: skipped %d bad row(s) (on_bad_row=skip); first: %s",
                    col.label, len(col.skips), col.skips[0]["detail"])
    rows = col.rows
    if cfg.chat_template:
        for r, p in zip(rows, chat_prompts([r["prompt"] for r in rows], tokenizer)):
            r["prompt"] = p
    return from_rows(rows, "prompts"), from_rows(col.skips, "skips")

