"""Bad input through the CLI: bad prompt data, bad policy directories, a missing `train --pairs` source
and a damaged recorded checkpoint exit 1 with the file and line (or the path and what is missing),
writing nothing.

`jobs.cli.main` runs `preflight` (every cheap input check) before `_dispatch` (the bootstrap, Ray,
the engines), so an input refused here is refused before anything heavy starts. Nothing is stubbed:
a test that got past the preflight would start the real thing and fail on another message.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wpo_ray.bootstrap import check_policy_dir
from jobs.cli import _parser, _split_config, main, preflight
from wpo_ray.config import load_config

DATA = Path(__file__).resolve().parents[1] / "data"
GOOD = {"question": "What is 1+1?", "answer": "2"}


def run_preflight(verb: str, *argv: str):
    """What `main([verb, *argv])` checks before it starts anything; raises on bad input."""
    args = _parser().parse_args([verb, *argv])
    return preflight(args, load_config(*_split_config(args)))


def fake_policy(path: Path, *, config=True, weights=("model.safetensors",), tokenizer=True) -> Path:
    """A directory that passes (or, with an argument off, fails) the policy check; weights are dummies."""
    path.mkdir(parents=True)
    if config:
        (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    for w in weights:
        (path / w).write_bytes(b"\0")
    if tokenizer:
        (path / "tokenizer_config.json").write_text("{}")
    return path


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines), encoding="utf-8")
    return path


def _empty(tmp):
    f = tmp / "empty.jsonl"
    f.touch()
    return f, "empty file"


def _not_utf8(tmp):
    return DATA / "not_utf8.jsonl", "line 2: not valid UTF-8"


def _truncated(tmp):
    return write_jsonl(tmp / "cut.jsonl", [GOOD, '{"question": "What is 3+4?", "ans']), "line 2, all fields: invalid JSON"


BAD_DATA = {"empty_file": _empty, "not_utf8": _not_utf8, "truncated_line": _truncated}


@pytest.mark.parametrize("verb", ["run", "sample", "eval"])
@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_prompt_data_exits_1_naming_file_and_line_before_anything_starts(tmp_path, capsys, verb, case):
    bad, words = BAD_DATA[case](tmp_path)
    good = write_jsonl(tmp_path / "good.jsonl", [GOOD])
    # run and sample read the train split first; eval reads only the test split.
    train, test = (good, bad) if verb == "eval" else (bad, good)
    run_dir = tmp_path / "run"
    code = main([verb, "data.source=jsonl", f"data.train_path={train}", f"data.test_path={test}",
                 f"model.path={fake_policy(tmp_path / 'policy')}", f"run.dir={run_dir}"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.startswith(f"wpo-ray {verb}: error: {bad}: "), err
    assert words in err, err
    # Nothing half-written: at most the run directory's config.yaml, no manifest, no round output.
    if run_dir.exists():
        assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml"]


def test_run_without_test_path_fails_before_anything_starts(tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", [GOOD])
    code = main(["run", "data.source=jsonl", f"data.train_path={good}", f"run.dir={tmp_path / 'run'}",
                 f"model.path={fake_policy(tmp_path / 'policy')}"])
    err = capsys.readouterr().err
    assert code == 1 and "data.test_path is required" in err, err


def test_good_data_passes_the_preflight(tmp_path):
    """The check does not refuse good input: `sample` and `run` go on to their work."""
    good = write_jsonl(tmp_path / "good.jsonl", [GOOD])
    args = ["data.source=jsonl", f"data.train_path={good}", f"data.test_path={good}",
            f"model.path={fake_policy(tmp_path / 'policy')}", f"run.dir={tmp_path / 'run'}"]
    assert run_preflight("sample", *args).path == tmp_path / "run"
    assert run_preflight("run", *args).path == tmp_path / "run"


def test_fixing_the_data_after_a_failed_first_run_is_accepted(tmp_path, capsys):
    """The first attempt stops on bad input; the rerun with data.train_path fixed is not refused."""
    policy = fake_policy(tmp_path / "policy")
    bad = write_jsonl(tmp_path / "cut.jsonl", [GOOD, '{"question": "What is 3+4?", "ans'])
    good = write_jsonl(tmp_path / "good.jsonl", [GOOD])
    common = ["data.source=jsonl", f"data.test_path={good}", f"model.path={policy}", f"run.dir={tmp_path / 'run'}"]
    assert main(["run", *common, f"data.train_path={bad}"]) == 1
    capsys.readouterr()
    run_preflight("run", *common, f"data.train_path={good}")  # no "made with a different config"
    assert str(good) in (tmp_path / "run" / "config.yaml").read_text()
    assert "no stage completed yet" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ policy directories

BAD_POLICIES = {
    # name: (how to make the directory, words in the error)
    "missing": (lambda p: p, "is not a directory"),
    "no_config": (lambda p: fake_policy(p, config=False), "no config.json"),
    "no_weights": (lambda p: fake_policy(p, weights=()), "no *.safetensors weights"),
    "only_pickle": (lambda p: fake_policy(p, weights=("pytorch_model.bin",)),
                    "only pickle-based weights ['pytorch_model.bin'], which are refused"),
    "no_tokenizer": (lambda p: fake_policy(p, tokenizer=False), "no tokenizer"),
}


def _missing_shard(p: Path) -> Path:
    fake_policy(p, weights=("model-00001-of-00002.safetensors",))
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (p / "model.safetensors.index.json").write_text(json.dumps(index))
    return p


def _not_a_model_config(p: Path) -> Path:
    fake_policy(p)
    (p / "config.json").write_text('{"architectures": ')  # cut off
    return p


BAD_POLICIES["missing_shard"] = (_missing_shard, "missing: ['model-00002-of-00002.safetensors']")
BAD_POLICIES["config_not_json"] = (_not_a_model_config, "config.json is not valid JSON")


@pytest.mark.parametrize("case", list(BAD_POLICIES))
def test_bad_policy_dir_is_refused_naming_path_and_what_is_missing(tmp_path, case):
    make, words = BAD_POLICIES[case]
    p = make(tmp_path / "policy")
    with pytest.raises(ValueError) as e:
        check_policy_dir(p)
    msg = str(e.value)
    assert msg.startswith(f"model.path: {tmp_path / 'policy'}"), msg
    assert words in msg, msg


def test_complete_policy_dir_passes(tmp_path):
    assert check_policy_dir(fake_policy(tmp_path / "policy")) == tmp_path / "policy"
    sharded = _missing_shard(tmp_path / "sharded")
    (sharded / "model-00002-of-00002.safetensors").write_bytes(b"\0")  # the download completed
    assert check_policy_dir(sharded) == sharded


@pytest.mark.parametrize("verb", ["run", "sample", "eval", "train"])
def test_cli_bad_model_path_exits_1_before_anything_starts(tmp_path, capsys, verb):
    policy = fake_policy(tmp_path / "policy", weights=("pytorch_model.bin",))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}])
    extra = ["--pairs", str(pairs)] if verb == "train" else []
    code = main([verb, f"model.path={policy}", f"run.dir={tmp_path / 'run'}", *extra])
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.startswith(f"wpo-ray {verb}: error: model.path: {policy} has no *.safetensors weights"), err


def test_cli_eval_checks_the_model_option(tmp_path, capsys):
    code = main(["eval", "--model", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert code == 1 and f"--model: {tmp_path / 'nope'} is not a directory" in err, err


# ------------------------------------------------------------------------------------ train --pairs

PAIRS_CASES = {
    # name: (how to make the --pairs path, words in the error)
    "missing": (lambda p: p / "nope", "does not exist"),
    "empty_dir": (lambda p: (p / "pairs").mkdir() or p / "pairs", "no *.parquet or *.jsonl files in the directory"),
}


@pytest.mark.parametrize("case", list(PAIRS_CASES))
def test_cli_train_bad_pairs_exits_1_before_anything_starts(tmp_path, capsys, case):
    """The --pairs source is checked before the bootstrap (model.path is builtin:tiny here) and Ray."""
    make, words = PAIRS_CASES[case]
    pairs = make(tmp_path)
    run_dir = tmp_path / "run"
    code = main(["train", str(Path(__file__).resolve().parents[2] / "configs" / "tiny-cpu.yaml"),
                 f"run.dir={run_dir}", "--pairs", str(pairs)])
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.startswith(f"wpo-ray train: error: --pairs {pairs}"), err
    assert words in err, err
    assert not run_dir.exists()  # no checkpoint or work directory begun


# ------------------------------------------------------------------------------------ resume


@pytest.mark.parametrize("damaged", [True, False])
def test_resume_rechecks_a_recorded_checkpoint_before_using_it(tmp_path, capsys, damaged):
    """A round whose training is recorded goes on with its checkpoint only if that is still complete:
    a checkpoint that lost its weights after it was recorded fails naming the round and path."""
    from wpo_ray.rundir import RunDir

    args = [f"model.path={fake_policy(tmp_path / 'policy')}", f"run.dir={tmp_path / 'run'}", "run.rounds=1"]
    run = RunDir(load_config(None, args))
    for r, stage in ((0, "eval"), (1, "train"), (1, "eval")):
        run.mark_done(r, stage)
    ckpt = fake_policy(run.round_dir(1) / "checkpoint" / "policy", weights=() if damaged else ("model.safetensors",))
    if not damaged:
        run_preflight("run", *args)  # past the check, on to the work
        return
    code = main(["run", *args])
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.startswith(f"wpo-ray run: error: round 1 checkpoint: {ckpt} has no *.safetensors weights"), err
