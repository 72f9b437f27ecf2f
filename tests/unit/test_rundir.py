"""Run directory: manifest as the only source of truth, config mismatch refused once a stage is
recorded (adopted before), --fresh, temp leftovers."""

import json
import logging

import pytest
import yaml

from wpo_ray.config import load_config
from wpo_ray.rundir import RunDir, RunDirError


def _cfg(tmp_path, *ov):
    return load_config(None, [f"run.dir={tmp_path / 'run'}", *ov])


def test_manifest_records_stages_and_survives_reopen(tmp_path):
    run = RunDir(_cfg(tmp_path))
    assert run.done(1, "samples") is None
    run.mark_done(1, "samples", rows=32)
    again = RunDir(_cfg(tmp_path))
    assert again.done(1, "samples")["rows"] == 32
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["round-001/samples"]["rows"] == 32


def test_different_config_is_refused_with_the_difference(tmp_path):
    RunDir(_cfg(tmp_path)).mark_done(0, "eval", greedy_accuracy=0.5)
    with pytest.raises(RunDirError) as e:
        RunDir(_cfg(tmp_path, "train.loss.beta=0.3", "sampling.n=4"))
    msg = str(e.value)
    assert "train.loss.beta: 0.1 -> 0.3" in msg and "sampling.n: 8 -> 4" in msg and "--fresh" in msg
    # Ray settings are where the run executes, not what it computes: they may change.
    RunDir(_cfg(tmp_path, "ray.num_cpus=3"))


def test_changed_config_is_adopted_while_no_stage_is_recorded(tmp_path, caplog):
    # A first attempt that stopped before finishing any stage (e.g. on bad input) leaves only
    # config.yaml: the user's corrected config replaces it instead of being refused.
    RunDir(_cfg(tmp_path, "data.max_prompts=5"))
    with caplog.at_level(logging.INFO, logger="wpo_ray"):
        run = RunDir(_cfg(tmp_path, "data.max_prompts=7"))
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["data"]["max_prompts"] == 7
    assert "no stage completed yet" in caplog.text and "data.max_prompts: 5 -> 7" in caplog.text
    # Once a stage is recorded the config is fixed again.
    run.mark_done(1, "prompts", rows=7, bad_rows=0)
    with pytest.raises(RunDirError, match="data.max_prompts: 7 -> 9"):
        RunDir(_cfg(tmp_path, "data.max_prompts=9"))
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]["max_prompts"] == 7


def test_fresh_starts_over(tmp_path):
    run = RunDir(_cfg(tmp_path))
    run.mark_done(1, "samples", rows=1)
    fresh = RunDir(_cfg(tmp_path, "sampling.n=4"), fresh=True)
    assert fresh.done(1, "samples") is None


def test_unrecorded_and_temporary_outputs_are_not_taken_as_complete(tmp_path):
    run = RunDir(_cfg(tmp_path))
    rd = run.round_dir(1)
    (rd / "samples").mkdir(parents=True)
    (rd / "samples" / "part.parquet").write_bytes(b"half")
    (rd / "graded.tmp").mkdir()
    (rd / "eval.json.tmp").write_text("{")
    run2 = RunDir(_cfg(tmp_path))  # a crashed run's leftovers
    assert not (rd / "graded.tmp").exists() and not (rd / "eval.json.tmp").exists()
    seen = []

    def produce(out):
        seen.append(sorted(p.name for p in rd.iterdir()))
        out("samples").mkdir()
        (out("samples") / "part.parquet").write_bytes(b"whole")
        return {"rows": 1}

    run2.stage(1, "samples", produce)
    assert seen == [[]]  # never recorded in the manifest: removed before the stage ran
    assert (rd / "samples" / "part.parquet").read_bytes() == b"whole"


def test_stage_runs_once_commits_every_output_and_records_last(tmp_path):
    run = RunDir(_cfg(tmp_path))
    calls = []

    def produce(out):
        calls.append(1)
        out("pairs").mkdir()
        (out("pairs") / "a.parquet").write_text("p")
        out("skips").mkdir()
        out("eval.json").write_text("{}")  # a file output works too
        assert not (run.output(1, "pairs")).exists()  # nothing is in place before the stage ends
        return {"pairs": 1}

    info = run.stage(1, "pairs", produce, outputs=("pairs", "skips", "eval.json"))
    assert info["pairs"] == 1 and "seconds" in info and "completed_at" in info
    assert (run.output(1, "pairs") / "a.parquet").read_text() == "p" and run.output(1, "skips").is_dir()
    assert run.output(1, "eval.json").read_text() == "{}"
    assert run.stage(1, "pairs", produce) == info and len(calls) == 1  # recorded: not run again
    assert RunDir(_cfg(tmp_path)).stage(1, "pairs", produce)["pairs"] == 1 and len(calls) == 1


def test_a_failing_stage_records_nothing_and_leaves_only_temporaries(tmp_path):
    run = RunDir(_cfg(tmp_path))

    def produce(out):
        out("graded").mkdir()
        raise RuntimeError("grader pool died")

    with pytest.raises(RuntimeError, match="grader pool died"):
        run.stage(2, "graded", produce)
    assert run.done(2, "graded") is None and not run.output(2, "graded").exists()
    RunDir(_cfg(tmp_path))  # the next run deletes the temporary
    assert not (run.round_dir(2) / "graded.tmp").exists()


def test_layout_paths_come_from_one_place(tmp_path):
    run = RunDir(_cfg(tmp_path))
    assert run.round_dir(3) == tmp_path / "run" / "round-003"
    assert run.policy_dir(3) == tmp_path / "run" / "round-003" / "checkpoint" / "policy"
    assert run.metrics_file(3) == tmp_path / "run" / "round-003" / "train" / "metrics.jsonl"
    assert run.parse_key(run.key(12, "eval")) == (12, "eval") and run.parse_key("config") is None


def test_corrupt_manifest_is_a_clear_error(tmp_path):
    RunDir(_cfg(tmp_path))
    (tmp_path / "run" / "manifest.json").write_text("{not json")
    with pytest.raises(RunDirError, match="manifest.json is not valid JSON"):
        RunDir(_cfg(tmp_path))
