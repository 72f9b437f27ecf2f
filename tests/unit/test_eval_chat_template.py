"""`run_eval` with data.chat_template=true renders the test prompts with the policy's own chat template.

End to end without Ray: a tiny untrained policy whose tokenizer carries a Jinja chat template, a
JSONL test file, and the in-process transformers sampler. Accuracy is irrelevant; what matters is
that evaluation runs at all (it used to fail with "no tokenizer was given to load_prompts") and that
the prompts reaching the sampler went through the template.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest

from pipeline.evaluation import eval_rows, run_eval
from wpo_ray.config import TinyModelConfig, load_config
from wpo_ray.generation import HFSampler
from wpo_ray.prompts import PromptDataError

ROOT = Path(__file__).resolve().parents[2]
MARKER = "[user] "
TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")
ROWS = [{"id": "q1", "question": "1+1=", "answer": "2"},
        {"id": "q2", "question": "3*4=", "answer": "12"},
        {"id": "q3", "question": "9-5=", "answer": "4"}]


@pytest.fixture(scope="module")
def templated_policy(tmp_path_factory) -> Path:
    """The tiny Llama (untrained) with a character tokenizer that has a chat template."""
    from wpo_ray.tiny_model import build_char_tokenizer, build_tiny_model, save_policy

    tok = build_char_tokenizer(string.ascii_letters + string.digits + string.punctuation + " \n")
    tok.chat_template = TEMPLATE
    model = build_tiny_model(TinyModelConfig(hidden_size=64, num_layers=1, num_heads=2, intermediate_size=64,
                                             max_position_embeddings=128), tok)
    return save_policy(model, tok, tmp_path_factory.mktemp("policy") / "policy")


@pytest.fixture
def cfg(tmp_path, templated_policy, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    test_file = tmp_path / "test.jsonl"
    test_file.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return load_config(ROOT / "configs" / "tiny-cpu.yaml", [
        "data.source=jsonl", f"data.train_path={test_file}", f"data.test_path={test_file}",
        "data.chat_template=true", f"model.path={templated_policy}", f"run.dir={tmp_path / 'run'}",
        "sampling.backend=transformers", "grading.grader=arithmetic", "eval.maj_n=1", "eval.max_tokens=4",
    ])


def test_run_eval_applies_the_policy_chat_template(cfg, templated_policy, monkeypatch):
    seen: list[str] = []
    generate = HFSampler.generate

    def spy(self, prompts, *a, **k):
        seen.extend(prompts)
        return generate(self, prompts, *a, **k)

    monkeypatch.setattr(HFSampler, "generate", spy)
    result = run_eval(cfg, str(templated_policy))  # builds the transformers sampler in-process

    assert result["n_prompts"] == len(ROWS)
    assert result["policy"] == str(templated_policy)
    assert 0.0 <= result["greedy_accuracy"] <= 1.0
    expected = [f"{MARKER}{r['question']}\n[assistant] " for r in ROWS]
    assert seen[: len(ROWS)] == expected  # the greedy pass got the templated prompts


def test_chat_template_rows_need_the_tokenizer(cfg, templated_policy):
    """What run_eval relies on: without the policy's tokenizer the test split cannot be loaded."""
    from transformers import AutoTokenizer

    with pytest.raises(PromptDataError, match="no tokenizer was given to load_prompts"):
        eval_rows(cfg)
    rows = eval_rows(cfg, AutoTokenizer.from_pretrained(templated_policy))
    assert [r["prompt"] for r in rows] == [f"{MARKER}{r['question']}\n[assistant] " for r in ROWS]
