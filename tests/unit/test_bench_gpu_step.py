"""bench/gpu_step.py runs (here on CPU with its tiny model; its figures are a GPU matter)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_step_bench_runs_the_project_step_and_prints_its_figures(capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_step
    finally:
        sys.path.remove(str(ROOT / "bench"))
    assert gpu_step.main(["--device", "cpu", "--tiny", "--steps", "2", "--warmup", "1", "--pairs", "2",
                          "--prompt-len", "8", "--response-len", "8", "--peak-tflops", "1"]) == 0
    out = capsys.readouterr().out
    train = re.search(r"training step: [\d.]+ ms/step, ([\d,]+) tokens/s, loss ([\d.]+)", out)
    ref = re.search(r"reference forward: [\d.]+ ms/batch, ([\d,]+) tokens/s", out)
    assert train and ref and "MFU against 1 TFLOP/s" in out, out
    assert int(train.group(1).replace(",", "")) > 0 and float(train.group(2)) > 0
    # 6N + 12·L·d·T per trained token, 2N + 4·L·d·T per reference token (N=100, L=2, d=8, T=16).
    cfg = type("C", (), {"num_hidden_layers": 2, "hidden_size": 8})
    assert gpu_step.flops_per_token(100, cfg, 16, True) == 600 + 12 * 2 * 8 * 16
    assert gpu_step.flops_per_token(100, cfg, 16, False) == 200 + 4 * 2 * 8 * 16
