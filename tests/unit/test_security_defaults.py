"""Safe by default: no remote code unless configured, no unpickling of files, clear CLI exit codes.

The loader checks read the project's source with `ast`, so a new `from_pretrained` call that
forgets `trust_remote_code`, or a `pickle` / unguarded `torch.load` that slips in, fails here.
"""

from __future__ import annotations

import ast
import functools
import inspect
from pathlib import Path

import pytest

from wpo_ray.config import Config, load_config

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(p for d in ("wpo_ray", "actors", "pipeline", "jobs") for p in (ROOT / d).rglob("*.py"))


@functools.cache
def _trees() -> tuple[tuple[Path, ast.Module], ...]:
    return tuple((p.relative_to(ROOT), ast.parse(p.read_text(), str(p))) for p in SOURCES)


def _calls(name: str):
    for path, tree in _trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                f = node.func
                called = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
                if called == name:
                    yield path, node


def test_trust_remote_code_is_off_by_default_and_in_every_shipped_config():
    assert Config().model.trust_remote_code is False
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    run_configs = [c for c in configs if c.name != "runtime_env.yaml"]
    assert len(run_configs) >= 3
    for c in run_configs:
        assert load_config(c).model.trust_remote_code is False, c.name


def test_every_hf_loader_is_told_trust_remote_code_explicitly():
    sites = list(_calls("from_pretrained"))
    assert len(sites) >= 3  # tokenizer + model in load_hf_policy, chat templating (sampling, eval)
    missing = [f"{p}:{n.lineno}" for p, n in sites if "trust_remote_code" not in {k.arg for k in n.keywords}]
    assert not missing, f"from_pretrained without trust_remote_code=: {missing}"


def test_vllm_engine_gets_trust_remote_code():
    from wpo_ray.generation import VLLMSampler

    src = ast.parse((ROOT / "wpo_ray" / "generation.py").read_text())
    init = next(n for n in ast.walk(src) if isinstance(n, ast.FunctionDef) and n.name == "__init__"
                and n.args.args[1].arg == "model_path")
    kwargs = next(n for n in ast.walk(init) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "dict")
    assert "trust_remote_code" in {k.arg for k in kwargs.keywords}
    assert inspect.signature(VLLMSampler.__init__).parameters["trust_remote_code"].default is False


def test_no_pickle_and_no_unguarded_torch_load():
    for path, tree in _trees():
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                assert not {"pickle", "cloudpickle", "dill"} & set(names), f"{path}:{node.lineno} imports pickle"
    for path, node in _calls("load"):
        f = node.func
        if isinstance(f, ast.Attribute) and getattr(f.value, "id", None) == "torch":
            kw = {k.arg: k.value for k in node.keywords}
            assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, \
                f"{path}:{node.lineno}: torch.load without weights_only=True"


@pytest.mark.parametrize("override, key", [("train.loss.beta=-1", "train.loss.beta"),
                                           ("sampling.nn=4", "sampling.nn")])
def test_cli_config_errors_exit_2_naming_the_key(override, key, capsys):
    from jobs.cli import main

    assert main(["run", str(ROOT / "configs" / "tiny-cpu.yaml"), override]) == 2
    err = capsys.readouterr().err
    assert f"  {key}:" in err and err.startswith("wpo-ray: invalid config")


def test_cli_report_on_a_missing_run_dir_exits_1(tmp_path, capsys):
    from jobs.cli import main

    code = main(["report", f"run.dir={tmp_path / 'nope'}"])
    err = capsys.readouterr().err
    assert code == 1 and "nope" in err, err
    assert not (tmp_path / "nope").exists()  # nothing half-written


def test_a_hub_id_is_refused_unless_downloading_is_on_naming_the_key(tmp_path, capsys):
    from jobs.cli import main

    code = main(["run", str(ROOT / "configs" / "tiny-cpu.yaml"), "model.path=Qwen/Qwen2-0.5B-Instruct",
                 f"run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 1 and "'Qwen/Qwen2-0.5B-Instruct' is not a local directory" in err, err
    assert "model.allow_download=true" in err
    assert not list((tmp_path / "run").glob("round-*"))  # refused before anything ran


def test_a_download_that_cannot_reach_the_hub_is_a_clear_error_naming_the_id(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub

    from wpo_ray.bootstrap import resolve_policy
    from wpo_ray.config import load_config

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: no network
    cfg = load_config(None, ["model.path=Qwen/Qwen2-0.5B-Instruct", "model.allow_download=true",
                             f"model.download_dir={tmp_path / 'hub'}"])
    with pytest.raises(ValueError, match=r"model.path 'Qwen/Qwen2-0.5B-Instruct': could not download it from the "
                                         r"Hugging Face hub"):
        resolve_policy(cfg)
