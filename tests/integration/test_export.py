"""`wpo-ray export --format trl`: a round's pairs as a dataset that `datasets` loads and TRL's
DPOTrainer trains on (the real TRL, on the tiny policy)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.integration


def _run_with_round_1_pairs(run_dir: Path, pairs_dir: Path) -> None:
    (run_dir / "round-001" / "pairs").mkdir(parents=True)
    shutil.copy(pairs_dir / "pairs.parquet", run_dir / "round-001" / "pairs" / "pairs.parquet")
    n = pq.read_metadata(pairs_dir / "pairs.parquet").num_rows
    (run_dir / "manifest.json").write_text(json.dumps({"stages": {"round-001/pairs": {"pairs": n}}}))


def test_an_exported_round_loads_with_datasets_and_trains_with_trl(arithmetic_pairs, tiny_policy, tmp_path, capsys):
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from jobs.cli import main

    run_dir = tmp_path / "run"
    _run_with_round_1_pairs(run_dir, Path(arithmetic_pairs))
    assert main(["export", f"run.dir={run_dir}", "--round", "1", "--format", "trl"]) == 0
    out = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert out == run_dir / "export" / "round-001-trl" / "train.parquet"
    assert not (run_dir / "export" / "round-001-trl.tmp").exists()

    ds = datasets.load_dataset("parquet", data_files=str(out), split="train")
    ours = pq.read_table(Path(arithmetic_pairs) / "pairs.parquet").to_pylist()
    assert ds.num_rows == len(ours)
    assert [(r["prompt"], r["chosen"], r["rejected"], r["weight"]) for r in ds] == \
        [(r["prompt"], r["chosen"], r["rejected"], r["weight"]) for r in ours]

    tok = AutoTokenizer.from_pretrained(tiny_policy)
    model = AutoModelForCausalLM.from_pretrained(tiny_policy, dtype=torch.float32)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=8, max_steps=3, learning_rate=1e-3,
                     use_cpu=True, report_to="none", save_strategy="no", eval_strategy="no", logging_steps=1,
                     disable_tqdm=True, dataloader_num_workers=0, max_length=None, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok).train()
    assert result.global_step == 3 and math.isfinite(result.training_loss)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # it trained


def test_export_of_a_round_without_recorded_pairs_is_refused_naming_the_round(tmp_path, capsys):
    from jobs.cli import main

    (tmp_path / "run").mkdir()
    assert main(["export", f"run.dir={tmp_path / 'run'}", "--round", "2"]) == 1
    err = capsys.readouterr().err
    assert "round 2 has no recorded pairs to export" in err, err
    assert not (tmp_path / "run" / "export").exists()


def test_trl_conversational_data_is_read_for_training_with_the_policy_chat_template(ray_session, tiny_cfg_factory,
                                                                                     tmp_path):
    """A conversational, implicit-prompt TRL dataset (JSON Lines) reaches the trainer's reader as
    explicit prompt/chosen/rejected strings rendered with the policy's chat template."""
    import string

    from pipeline.training import read_pairs
    from wpo_ray.config import TinyModelConfig
    from wpo_ray.tiny_model import build_char_tokenizer, build_tiny_model, save_policy

    tok = build_char_tokenizer(string.ascii_letters + string.digits + string.punctuation + " \n")
    tok.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}[assistant] {% endif %}")
    policy = save_policy(build_tiny_model(TinyModelConfig(hidden_size=64, num_layers=1, num_heads=2,
                                                          intermediate_size=64), tok), tok, tmp_path / "policy")
    rows = [{"chosen": [{"role": "user", "content": f"{i}+1?"}, {"role": "assistant", "content": str(i + 1)}],
             "rejected": [{"role": "user", "content": f"{i}+1?"}, {"role": "assistant", "content": str(i + 2)}]}
            for i in range(5)]
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds, n, has_ref = read_pairs(tmp_path / "prefs.jsonl", tiny_cfg_factory(), tokenizer_path=str(policy))
    got = sorted(ds.take_all(), key=lambda r: r["prompt"])
    assert n == 5 and not has_ref and {r["weight"] for r in got} == {1.0}
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in got] == \
        [(f"[user] {i}+1?\n[assistant] ", f"{i + 1}\n", f"{i + 2}\n") for i in range(5)]
    assert len({r["prompt_id"] for r in got}) == 5
