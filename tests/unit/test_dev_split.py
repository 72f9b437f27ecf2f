"""The dev split that settings are chosen on (eval.dev): disjoint from what rounds train on and from
the test split that is only reported."""

from __future__ import annotations

import json

import pytest

from pipeline.evaluation import eval_rows
from wpo_ray.arithmetic import make_split
from wpo_ray.bootstrap import DEV_SIZE, dev_rows, sft_and_dev_rows
from wpo_ray.config import load_config


def test_arithmetic_dev_split_is_held_out_from_rounds_and_test():
    cfg = load_config("configs/tiny-cpu.yaml")
    dev = dev_rows(cfg)
    prompts = [r["prompt"] for r in dev]
    pool = {r["prompt"] for r in make_split(cfg.data.arithmetic, "train")}  # what rounds sample
    test = {r["prompt"] for r in make_split(cfg.data.arithmetic, "test")}
    assert 200 <= len(dev) <= DEV_SIZE
    assert not pool & set(prompts) and not test & set(prompts)
    assert len(set(prompts)) == len(prompts)
    # The bootstrap's own held-out slice, so the policy never trained on it.
    assert set(prompts) <= {r["prompt"] for r in sft_and_dev_rows(cfg)[1]}
    assert {r["difficulty"] for r in dev} == {"easy", "medium", "hard"}
    assert eval_rows(cfg, split="dev") == dev
    assert eval_rows(cfg) != dev  # the default stays the test split


def test_file_dataset_dev_split_reads_dev_path(tmp_path):
    rows = [{"id": f"d{i}", "question": f"q{i}", "answer": str(i)} for i in range(3)]
    (tmp_path / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "train.jsonl").write_text(json.dumps({"id": "t", "question": "x", "answer": "1"}) + "\n")
    base = ["data.source=jsonl", f"data.train_path={tmp_path / 'train.jsonl'}", "grading.grader=gsm8k"]
    got = eval_rows(load_config(None, [*base, f"data.dev_path={tmp_path / 'dev.jsonl'}"]), split="dev")
    assert [r["prompt_id"] for r in got] == ["d0", "d1", "d2"]
    with pytest.raises(ValueError, match="data.dev_path"):
        eval_rows(load_config(None, base), split="dev")
