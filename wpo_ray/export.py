"""A round's pairs as a dataset other trainers read: TRL's preference format, in Parquet.

TRL's standard (not conversational) preference format with an explicit prompt: one row per pair
with string columns ``prompt``, ``chosen`` and ``rejected`` (the completions without the prompt;
TRL adds the EOS token itself). Two extra columns travel along: ``weight`` (the pair's difficulty
weight, which TRL ignores and `wpo-ray train --pairs` uses) and ``prompt_id``. The file loads with
``datasets.load_dataset("parquet", data_files=...)`` and trains with ``trl.DPOTrainer``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .contracts import PAIRS, validate

TRL_COLUMNS = ("prompt", "chosen", "rejected", "weight", "prompt_id")
TRL_FILE = "train.parquet"


def export_trl(pairs_dir: Path, out_dir: Path) -> Path:
    """Write `pairs_dir`'s pairs (the PAIRS contract) to `out_dir`/train.parquet; returns the file.

    Written under `<out_dir>.tmp` and renamed, so `out_dir` exists only complete; an existing
    `out_dir` is replaced.
    """
    files = sorted(Path(pairs_dir).glob("*.parquet"))
    if not files:
        raise ValueError(f"{pairs_dir}: no *.parquet pairs to export")
    table = pa.concat_tables([validate(pq.read_table(f), "pairs", source=str(f)) for f in files])
    table = table.select(list(TRL_COLUMNS)).cast(pa.schema([PAIRS.field(c) for c in TRL_COLUMNS]))
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    pq.write_table(table, tmp / TRL_FILE)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir / TRL_FILE
