"""experiments/pipeline.py --table: prints the paired table from stored results and draws the
curves where --curves says, leaving the directory's own curves.png alone."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STORED = ROOT / "experiments" / "results" / "refprev-dev"


def _experiment():
    spec = importlib.util.spec_from_file_location("experiment_pipeline", ROOT / "experiments" / "pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table_reads_stored_results_and_draws_the_curves_where_asked(tmp_path, capsys):
    for name in ("weighted-refprev-s0.json", "uniform-refprev-s0.json"):
        shutil.copy(STORED / name, tmp_path / name)
    figure = tmp_path / "figures" / "mine.png"
    figure.parent.mkdir()
    assert _experiment().main(["--table", "--seeds", "0", "--arms", "weighted-refprev,uniform-refprev",
                               "--out", str(tmp_path), "--curves", str(figure)]) == 0
    printed = capsys.readouterr().out
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "curves.png").exists()
    # Seed 0 as docs/RESULTS.md reports it: weighted 0.640 and uniform 0.605 after round 5.
    assert "seed 0: +0.035 /" in printed
    assert "0.505 -> 0.560 -> 0.590 -> 0.610 -> 0.640 -> 0.640" in printed
