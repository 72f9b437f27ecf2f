"""Run directory: manifest as the only source of truth, config mismatch refused once a stage is
recorded (adopted before), --fresh, temp leftovers."""

import json

import pytest
import yaml

from wpo_ray.config import load_config
from wpo_ray.rundir import RunDir, RunDirError


def _cfg(tmp_path, *ov):
    return load_config(None, [f"run.dir={tmp_path / 'run'}", *ov])


def test_manifest_records_stages_and_survives_reopen(tmp_path):
    run = RunDir(_cfg(tmp_path), log=lambda *_: None)
    assert run.done(1, "samples") is None
    run.mark_done(1, "samples", rows=32)
    again = RunDir(_cfg(tmp_path), log=lambda *_: None)
    assert again.done(1, "samples")["rows"] == 32
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["round-001/samples"]["rows"] == 32


def test_different_config_is_refused_with_the_difference(tmp_path):
    RunDir(_cfg(tmp_path), log=lambda *_: None).mark_done(0, "eval", greedy_accuracy=0.5)
    with pytest.raises(RunDirError) as e:
        RunDir(_cfg(tmp_path, "train.loss.beta=0.3", "sampling.n=4"), log=lambda *_: None)
    msg = str(e.value)
    assert "train.loss.beta: 0.1 -> 0.3" in msg and "sampling.n: 8 -> 4" in msg and "--fresh" in msg
    # Ray settings are where the run executes, not what it computes: they may change.
    RunDir(_cfg(tmp_path, "ray.num_cpus=3"), log=lambda *_: None)


def test_changed_config_is_adopted_while_no_stage_is_recorded(tmp_path):
    # A first attempt that stopped before finishing any stage (e.g. on bad input) leaves only
    # config.yaml: the user's corrected config replaces it instead of being refused.
    RunDir(_cfg(tmp_path, "data.max_prompts=5"), log=lambda *_: None)
    logged = []
    run = RunDir(_cfg(tmp_path, "data.max_prompts=7"), log=logged.append)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["data"]["max_prompts"] == 7
    assert "no stage completed yet" in logged[0] and "data.max_prompts: 5 -> 7" in logged[0]
    # Once a stage is recorded the config is fixed again.
    run.mark_done(1, "prompts", rows=7, bad_rows=0)
    with pytest.raises(RunDirError, match="data.max_prompts: 7 -> 9"):
        RunDir(_cfg(tmp_path, "data.max_prompts=9"), log=lambda *_: None)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]["max_prompts"] == 7


def test_fresh_starts_over(tmp_path):
    run = RunDir(_cfg(tmp_path), log=lambda *_: None)
    run.mark_done(1, "samples", rows=1)
    fresh = RunDir(_cfg(tmp_path, "sampling.n=4"), fresh=True, log=lambda *_: None)
    assert fresh.done(1, "samples") is None


def test_unrecorded_and_temporary_outputs_are_not_taken_as_complete(tmp_path):
    run = RunDir(_cfg(tmp_path), log=lambda *_: None)
    rd = run.round_dir(1)
    (rd / "samples").mkdir()
    (rd / "samples" / "part.parquet").write_bytes(b"half")
    (rd / "graded.tmp").mkdir()
    run2 = RunDir(_cfg(tmp_path), log=lambda *_: None)  # a crashed run's leftovers
    assert not (rd / "graded.tmp").exists()
    final, tmp = run2.stage_output(1, "samples")
    assert not final.exists() and not tmp.exists()  # never recorded in the manifest: removed


def test_corrupt_manifest_is_a_clear_error(tmp_path):
    RunDir(_cfg(tmp_path), log=lambda *_: None)
    (tmp_path / "run" / "manifest.json").write_text("{not json")
    with pytest.raises(RunDirError, match="manifest.json is not valid JSON"):
        RunDir(_cfg(tmp_path), log=lambda *_: None)
