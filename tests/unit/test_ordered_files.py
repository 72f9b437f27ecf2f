"""Stage outputs in prompt order without a shuffle: `ordered_files` says when reading a directory's
Parquet files one after another gives rows in key order (no Ray needed)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.sampling import ordered_files


def _write(d, name: str, ids: list[str]) -> str:
    d.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"prompt_id": pa.array(ids, pa.string()), "x": list(range(len(ids)))}), d / name)
    return str(d / name)


def test_files_in_name_order_with_ascending_disjoint_keys_are_ordered(tmp_path):
    a = _write(tmp_path, "0.parquet", ["p00", "p01", "p05"])
    _write(tmp_path, "1.parquet", [])  # an empty file (a stage with no rows writes one) is left out
    c = _write(tmp_path, "2.parquet", ["p06", "p09"])
    assert ordered_files(tmp_path) == [a, c]


def test_names_out_of_key_order_need_reordering(tmp_path):
    late = _write(tmp_path, "a.parquet", ["p10", "p11"])
    early = _write(tmp_path, "b.parquet", ["p00", "p03"])
    assert ordered_files(tmp_path) is None  # Ray Data reads a directory in name order
    assert ordered_files(tmp_path, reorder=True) == [early, late]


def test_unsorted_file_or_overlapping_ranges_have_no_order(tmp_path):
    _write(tmp_path / "unsorted", "0.parquet", ["p02", "p01"])
    assert ordered_files(tmp_path / "unsorted", reorder=True) is None
    _write(tmp_path / "overlap", "0.parquet", ["p00", "p05"])
    _write(tmp_path / "overlap", "1.parquet", ["p03", "p09"])
    assert ordered_files(tmp_path / "overlap", reorder=True) is None
    _write(tmp_path / "dup", "0.parquet", ["p00", "p01"])
    _write(tmp_path / "dup", "1.parquet", ["p01", "p02"])  # a prompt twice is not an order either
    assert ordered_files(tmp_path / "dup", reorder=True) is None


def test_no_rows_at_all_is_the_empty_order(tmp_path):
    _write(tmp_path, "empty.parquet", [])
    assert ordered_files(tmp_path) == []
