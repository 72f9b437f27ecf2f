"""Unit tests of wpo_ray.report on a small synthetic run directory (docs/DESIGN.md).

The run: round 0 (initial eval), round 1 complete, round 2 with graded/pairs/skips but no training
and no eval yet, and a manifest whose round-2 prompt count breaks the accounting invariant.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from wpo_ray.report import collect, write_report

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

CONFIG = """\
# note for the reader: <script>alert("x")</script> & more
run:
  dir: runs/synthetic
  rounds: 3
train:
  loss:
    base: dpo
    weight_placement: margin
weighting:
  scheme: difficulty
  alpha: 1.5
eval:
  maj_n: 8
"""

EVALS = {
    0: {"n_prompts": 200, "greedy_accuracy": 0.412, "greedy_by_bucket": {"easy": 0.875, "hard": 0.042, "medium": 0.333},
        "maj@8_accuracy": 0.456, "maj_by_bucket": {"easy": 0.901, "hard": 0.061, "medium": 0.377},
        "policy": "initial", "seconds": 3.2},
    1: {"n_prompts": 200, "greedy_accuracy": 0.523, "greedy_by_bucket": {"easy": 0.934, "hard": 0.118, "medium": 0.487},
        "maj@8_accuracy": 0.571, "maj_by_bucket": {"easy": 0.952, "hard": 0.143, "medium": 0.529},
        "policy": "round-001/checkpoint/policy", "seconds": 3.0},
}

# round -> graded verdicts per prompt; pairs are the prompts with a wrong answer.
GRADED = {
    1: {"a": ["correct"] * 4, "b": ["correct", "wrong", "wrong", "invalid"], "c": ["wrong"] * 4,
        "d": ["correct", "correct", "correct", "wrong"], "e": ["correct", "wrong", "correct", "wrong"]},
    2: {"a": ["correct"] * 4, "b": ["correct"] * 4, "c": ["wrong"] * 4, "d": ["correct", "wrong", "wrong", "wrong"],
        "e": ["wrong", "wrong", "wrong", "wrong"], "f": ["correct", "correct", "wrong", "wrong"]},
}
PAIRS = {1: {"b": 1.1, "c": 2.0, "d": 0.4, "e": 0.9}, 2: {"d": 1.3, "f": 0.8, "c": 1.9}}
SKIPS = {1: [("a", "all_correct")], 2: [("a", "all_correct"), ("b", "all_correct"), ("e", "no_gold_and_none_correct")]}


def _write(path: Path, rows: list[dict], schema: pa.Schema) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


PAIRS_SCHEMA = pa.schema([("prompt_id", pa.string()), ("round", pa.int32()), ("weight", pa.float64()),
                          ("n_samples", pa.int32()), ("n_correct", pa.int32()), ("n_wrong", pa.int32()),
                          ("chosen_source", pa.string())])
SKIPS_SCHEMA = pa.schema([("prompt_id", pa.string()), ("round", pa.int32()), ("reason", pa.string()),
                          ("detail", pa.string())])
GRADED_SCHEMA = pa.schema([("prompt_id", pa.string()), ("round", pa.int32()), ("verdicts", pa.list_(pa.string()))])


def make_run(root: Path) -> Path:
    run = root / "run"
    run.mkdir()
    (run / "config.yaml").write_text(CONFIG)
    stages = {"round-000/eval": {"greedy_accuracy": 0.412}}
    for r, ev in EVALS.items():
        (run / f"round-{r:03d}").mkdir(exist_ok=True)
        (run / f"round-{r:03d}" / "eval.json").write_text(json.dumps(ev, indent=2))
    for r in (1, 2):
        rd = run / f"round-{r:03d}"
        ids = sorted(GRADED[r])
        half = len(ids) // 2
        for i, part in enumerate((ids[:half], ids[half:])):  # two files per stage, like Ray writes
            _write(rd / "graded" / f"{i}_000000.parquet",
                   [{"prompt_id": p, "round": r, "verdicts": GRADED[r][p]} for p in part], GRADED_SCHEMA)
        pair_rows = []
        for p, w in PAIRS[r].items():
            v = GRADED[r][p]
            pair_rows.append({"prompt_id": p, "round": r, "weight": w, "n_samples": len(v),
                              "n_correct": v.count("correct"), "n_wrong": v.count("wrong"),
                              "chosen_source": "sampled" if "correct" in v else "gold"})
        _write(rd / "pairs" / "0_000000.parquet", pair_rows[:2], PAIRS_SCHEMA)
        _write(rd / "pairs" / "1_000000.parquet", pair_rows[2:], PAIRS_SCHEMA)
        _write(rd / "skips" / "0_000000.parquet",
               [{"prompt_id": p, "round": r, "reason": why, "detail": None} for p, why in SKIPS[r]], SKIPS_SCHEMA)
        n_pairs, n_skips = len(PAIRS[r]), len(SKIPS[r])
        reasons: dict[str, int] = {}
        for _, why in SKIPS[r]:
            reasons[why] = reasons.get(why, 0) + 1
        # Round 2's manifest claims one prompt more than came out: the accounting must flag it.
        stages[f"round-{r:03d}/pairs"] = {"pairs": n_pairs, "skips": n_skips, "prompts": n_pairs + n_skips + (r == 2),
                                          "skip_reasons": reasons}
    # The loader's bad rows sit next to the pairing skips, with a different integer width for `round`.
    _write(run / "round-001" / "skips" / "bad_rows.parquet",
           [{"prompt_id": "z", "round": 1, "reason": "bad_row", "detail": "prompt too long"}],
           pa.schema([("prompt_id", pa.string()), ("round", pa.int64()), ("reason", pa.string()),
                      ("detail", pa.string())]))
    stages["round-001/pairs"]["skips"] += 1
    stages["round-001/pairs"]["prompts"] += 1
    stages["round-001/pairs"]["skip_reasons"]["bad_row"] = 1

    metrics = [{"step": s, "loss": 0.69 - 0.05 * s, "rewards/margin": 0.1 * s, "rewards/accuracy": 0.5 + 0.08 * s,
                "rewards/chosen": 0.05 * s, "rewards/rejected": -0.05 * s, "weight/mean": 1.05, "lr": 1e-6,
                "tokens_per_s": 1000.0 + s} for s in range(1, 6)]
    (run / "round-001" / "train").mkdir()
    (run / "round-001" / "train" / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    stages["round-001/train"] = {"steps": 5, "placement": {"train_workers": [
        {"node_id": "head-node-1", "ip": "127.0.0.1", "rank": 0}, {"node_id": "second-node-2", "ip": "127.0.0.2", "rank": 1}]}}
    stages["round-001/samples"] = {"rows": 3, "placement": {"samplers": [{"node_id": "second-node-2", "ip": "127.0.0.2"}]}}
    stages["round-001/eval"] = {"greedy_accuracy": 0.523}
    (run / "manifest.json").write_text(json.dumps({"stages": stages}, indent=2))
    return run


class _Tables(HTMLParser):
    """Every <table> of a page as a list of rows of cell texts."""

    def __init__(self):
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def tables(page: str) -> list[list[list[str]]]:
    p = _Tables()
    p.feed(page)
    return p.tables


def table_with(page: str, header: str) -> list[dict[str, str]]:
    for t in tables(page):
        if header in t[0]:
            return [dict(zip(t[0], row)) for row in t[1:]]
    raise AssertionError(f"no table with a {header!r} column")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("report"))
    path = write_report(run)
    return run, path, path.read_text(encoding="utf-8")


def test_writes_html_and_returns_its_path(built):
    run, path, page = built
    assert path == run / "report.html" and path.is_file()
    assert page.startswith("<!DOCTYPE html>")
    assert not list(run.glob(".*.tmp")) and not list((run / "report").glob(".*.tmp"))


def test_header(built):
    run, _, page = built
    kv = {row[0]: row[1] for row in tables(page)[0]}
    assert kv["run directory"] == str(run)
    assert kv["loss base"] == "dpo"
    assert kv["weight placement"] == "margin"
    assert kv["weighting"] == "difficulty (alpha = 1.5)"
    assert kv["rounds done"] == "1 of 3 planned"


def test_accuracy_table(built):
    _, _, page = built
    rows = {r["round"].split()[0]: r for r in table_with(page, "maj@8")}
    assert rows["0"]["greedy"] == "0.412" and rows["0"]["maj@8"] == "0.456"
    assert rows["0"]["greedy easy"] == "0.875" and rows["0"]["greedy hard"] == "0.042"
    assert rows["0"]["maj@8 medium"] == "0.377"
    assert rows["1"]["greedy"] == "0.523" and rows["1"]["maj@8"] == "0.571"
    assert rows["1"]["greedy medium"] == "0.487" and rows["1"]["maj@8 hard"] == "0.143"
    assert "eval.json missing" in rows["2"]["prompts"]
    head = tables(page)[1][0]  # buckets in difficulty order, not alphabetical
    assert head.index("greedy easy") < head.index("greedy medium") < head.index("greedy hard")


def test_accounting_table(built):
    _, _, page = built
    rows = {r["round"]: r for r in table_with(page, "prompts = pairs + skips")}
    one = rows["1"]
    assert (one["prompts in"], one["pairs"], one["skips"]) == ("6", "4", "2")
    assert (one["skip: all_correct"], one["skip: bad_row"], one["skip: no_gold_and_none_correct"]) == ("1", "1", "0")
    assert "✓" in one["prompts = pairs + skips"]
    two = rows["2"]
    assert (two["prompts in"], two["pairs"], two["skips"]) == ("7", "3", "3")
    assert (two["skip: all_correct"], two["skip: no_gold_and_none_correct"]) == ("2", "1")
    assert "MISMATCH" in two["prompts = pairs + skips"]
    assert page.count('class="bad"') == 1 and "MISMATCH: 7 ≠ 3 + 3" in page
    assert "round 2: 7 prompts in != 3 pairs + 3 skips" in page  # also in the notes at the top
    assert "round 1: 6 prompts in" not in page


def test_missing_training_is_reported(built):
    _, _, page = built
    rows = {r["round"]: r for r in table_with(page, "final loss")}
    assert rows["1"]["steps"] == "5" and rows["1"]["final loss"] == "0.4400"
    assert rows["1"]["final margin"] == "0.5000" and rows["1"]["final ranking acc."] == "0.900"
    assert "train/metrics.jsonl missing" in rows["2"]["steps"]
    assert "round 2: missing train/metrics.jsonl" in page
    assert "round 2: missing eval.json" in page
    assert "round 3: not started" in page


def test_config_is_shown_escaped(built):
    _, _, page = built
    assert "<script>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; more" in page
    pre = re.search(r"<pre>(.*)</pre>", page, re.S).group(1)
    assert "weight_placement: margin" in pre and "alpha: 1.5" in pre


def test_images_referenced_exist_and_are_png(built):
    run, _, page = built
    refs = re.findall(r'<img src="([^"]+)"', page)
    assert refs and all(r.startswith("report/") for r in refs)
    assert len(refs) == len(set(refs))
    on_disk = {p.relative_to(run).as_posix() for p in (run / "report").iterdir()}
    assert set(refs) == on_disk  # every image on disk is shown, every image shown exists
    assert on_disk == {"report/accuracy.png", "report/training.png",
                       "report/weights_round-001.png", "report/weights_round-002.png",
                       "report/pc_round-001.png", "report/pc_round-002.png"}
    for ref in refs:
        data = (run / ref).read_bytes()
        assert len(data) > 1000 and data[:8] == PNG_MAGIC, ref
    assert "http://" not in page and "https://" not in page and "<link" not in page  # opens offline


def test_collect_reads_weights_and_p_correct_of_all_graded_prompts(built):
    run, _, _ = built
    data = collect(run)
    r1 = data["rounds"][1]
    assert r1["round"] == 1 and sorted(r1["pair_weights"]) == sorted(PAIRS[1].values())
    # P_c comes from the graded verdicts, so the all-correct prompt (skipped, no pair) is included.
    expected = sorted(v.count("correct") / len(v) for v in GRADED[1].values())
    np.testing.assert_allclose(sorted(r1["p_correct"]), expected)
    assert 1.0 in r1["p_correct"] and 0.0 in r1["p_correct"]
    assert data["rounds"][2]["metrics"] is None and data["rounds"][2]["eval"] is None
    assert data["maj"] == "maj@8" and data["rounds_done"] == 1


def test_rewrite_drops_stale_images_and_tolerates_a_cut_metrics_line(tmp_path):
    run = make_run(tmp_path)
    write_report(run)
    assert (run / "report" / "pc_round-002.png").exists()
    shutil.rmtree(run / "round-002" / "graded")
    with open(run / "round-001" / "train" / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 0.3')  # a crash mid-write
    page = write_report(run).read_text()
    assert not (run / "report" / "pc_round-002.png").exists()
    assert "round 2: missing graded/" in page
    assert "1 unreadable line(s) ignored" in page
    assert {r["round"]: r for r in table_with(page, "final loss")}["1"]["steps"] == "5"


def test_nearly_empty_run_renders(tmp_path):
    (tmp_path / "config.yaml").write_text("run:\n  rounds: 2\n")
    page = write_report(tmp_path).read_text()
    assert "No eval.json in any round yet." in page
    assert "round 1: not started" in page and "manifest.json is missing" in page
    assert not list((tmp_path / "report").glob("*.png"))
    assert not re.findall(r"<img ", page)


def test_round_with_pairs_but_nothing_else(tmp_path):
    run = make_run(tmp_path)
    rd = run / "round-003"
    _write(rd / "pairs" / "0.parquet", [{"prompt_id": "q", "round": 3, "weight": 1.0, "n_samples": 4,
                                         "n_correct": 1, "n_wrong": 3, "chosen_source": "sampled"}], PAIRS_SCHEMA)
    page = write_report(run).read_text()
    for what in ("graded/", "skips/", "train/metrics.jsonl", "eval.json"):
        assert f"round 3: missing {what}" in page
    three = {r["round"]: r for r in table_with(page, "prompts = pairs + skips")}["3"]
    assert three["pairs"] == "1" and three["prompts in"] == "—" and "unknown" in three["prompts = pairs + skips"]
    assert (run / "report" / "weights_round-003.png").exists()
    assert not (run / "report" / "pc_round-003.png").exists()


@pytest.mark.integration
def test_screenshot_renders(built, tmp_path):
    """Headless Chromium opens report.html from disk and renders a non-blank page."""
    assert Path("/usr/bin/chromium").exists(), "install chromium: apt-get install -y chromium"
    run, path, _ = built
    out = tmp_path / "shot.png"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "screenshot_report.py"), str(run), str(out)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert out.stat().st_size > 10_000
    from matplotlib.image import imread

    img = imread(out)
    assert img.shape[0] >= 1000 and img.shape[1] >= 1000
    assert float(img[..., :3].std()) > 0.02  # not a single colour
    # Not just text: some strongly coloured pixels come from the embedded plots.
    rgb = img[..., :3]
    assert float((rgb.max(axis=-1) - rgb.min(axis=-1) > 0.3).mean()) > 0.001


def test_placement_shows_which_node_each_actor_ran_on(built):
    _, _, page = built
    rows = table_with(page, "node id")
    assert {(r["stage"], r["actor"], r["node id"], r["node IP"]) for r in rows} == {
        ("round-001/samples", "samplers", "second-node-2", "127.0.0.2"),
        ("round-001/train", "train_workers (rank 0)", "head-node-1", "127.0.0.1"),
        ("round-001/train", "train_workers (rank 1)", "second-node-2", "127.0.0.2")}
