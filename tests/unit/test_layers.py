"""The architecture as a test: layers that only point down, one training step for every caller,
the policy read once per training worker.

    wpo_ray/ (pure library) <- actors/ (Ray hosts) <- pipeline/ (orchestration) <- jobs/ (entry points, CLI)

The import graph is built from the sources with `ast`, so a new import that points up a layer or
closes a cycle fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("wpo_ray", "actors", "pipeline", "jobs")  # each may import only those before it (and itself)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str) -> set[str]:
    """Modules of this project that `path` imports, anywhere in the file (lazy imports count)."""
    out = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            out |= {f"{target}.{a.name}" for a in node.names}  # `from pkg import module`
    return {m for m in out if m.split(".")[0] in LAYERS}


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for layer in LAYERS for p in (ROOT / layer).rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        # An import of `a.b.c` names module a.b.c if it exists, else the symbol c of module a.b.
        graph[name] = {m if m in modules else m.rpartition(".")[0] for m in _imports(path, name)} - {name}
        graph[name] &= set(modules)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_graph_sees_real_imports():
    graph = import_graph()
    assert "wpo_ray.step" in graph["actors.train_worker"]  # `from wpo_ray.step import ...`
    assert "pipeline.round" in graph["jobs.cli"]  # a lazy import inside a function
    assert "wpo_ray.config" in graph["wpo_ray.rundir"]  # `from .config import ...`
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_layers_only_point_down():
    upward = []
    for module, deps in import_graph().items():
        rank = LAYERS.index(module.split(".")[0])
        upward += [f"{module} -> {d}" for d in deps if LAYERS.index(d.split(".")[0]) > rank]
    assert not upward, "imports that point up a layer:\n" + "\n".join(sorted(upward))


def test_no_import_cycle():
    cycle = _cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("caller", ["actors/train_worker.py", "actors/ref_logp.py", "experiments/weighting.py",
                                    "bench/_common.py", "bench/train_flops.py", "bench/weighted_step_overhead.py"])
def test_every_caller_uses_the_one_training_step(caller):
    """Encode / log-probs / loss come from wpo_ray.step: nobody calls the pieces underneath."""
    tree = ast.parse((ROOT / caller).read_text())
    imported = {(n.module, a.name) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert any(mod == "wpo_ray.step" for mod, _ in imported), caller
    beneath = {("wpo_ray.batching", n) for n in ("collate", "encode_pairs", "sequence_logps", "split_pair_logps")}
    if caller != "bench/weighted_step_overhead.py":  # it also times the loss alone, on purpose
        beneath |= {("wpo_ray.losses", "preference_loss")}
    beneath |= {("wpo_ray.losses", "reward_gaps")}
    assert not imported & beneath, f"{caller} bypasses wpo_ray.step: {sorted(imported & beneath)}"


@pytest.mark.parametrize("reference_logps, loads", [("precomputed", 2), ("worker", 4)])
def test_a_training_worker_reads_the_policy_once(tmp_path, monkeypatch, reference_logps, loads):
    """The worker's model loading: one policy model + one tokenizer (+ the reference model and its
    tokenizer when the reference runs on the worker), counted at transformers' from_pretrained."""
    import transformers

    from actors.train_worker import load_models
    from wpo_ray.arithmetic import ALPHABET
    from wpo_ray.config import Config, TinyModelConfig
    from wpo_ray.tiny_model import build_char_tokenizer, build_tiny_model, save_policy

    tok = build_char_tokenizer(ALPHABET)
    save_policy(build_tiny_model(TinyModelConfig(), tok, seed=0), tok, tmp_path / "policy")
    calls = []
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        original = cls.from_pretrained.__func__

        def counting(klass, path, *a, _original=original, **kw):
            calls.append((klass.__name__, str(path)))
            return _original(klass, path, *a, **kw)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(counting))
    cfg = Config.model_validate({"train": {"reference_logps": reference_logps}})
    config = {"policy_path": str(tmp_path / "policy"), "reference_path": str(tmp_path / "policy")}
    model, tokenizer, ref = load_models(config["policy_path"], config["reference_path"], cfg)
    assert len(calls) == loads, calls
    assert [c for c in calls if c[0] == "AutoModelForCausalLM"].count(("AutoModelForCausalLM", config["policy_path"])) \
        == loads // 2
    assert (ref is not None) == (reference_logps == "worker") and tokenizer.pad_token_id is not None
