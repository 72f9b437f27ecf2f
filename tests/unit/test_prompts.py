"""Prompt loading: the four sources, field mapping, and every bad-row / bad-file case."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from wpo_ray.config import ArithmeticTaskConfig, DataConfig, FieldMap
from wpo_ray.contracts import PROMPTS, SKIPS
from wpo_ray.prompts import PromptDataError, load_prompts, round_prompts

DATA = Path(__file__).resolve().parents[1] / "data"
GSM8K = DATA / "gsm8k_sample.jsonl"
MATH = DATA / "math_sample.jsonl"


def jsonl_cfg(path, **kw) -> DataConfig:
    return DataConfig(source="jsonl", train_path=str(path), **kw)


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines), encoding="utf-8")
    return path


def assert_names(msg: str, file: Path, row: str, field: str | None) -> None:
    assert str(file) in msg, msg
    assert row in msg, msg
    if field is not None:
        assert f"field {field!r}" in msg, msg


# ------------------------------------------------------------------------------------ good data


def test_gsm8k_sample():
    prompts, skips = load_prompts(jsonl_cfg(GSM8K), "train")
    assert prompts.schema == PROMPTS
    assert skips.schema == SKIPS and skips.num_rows == 0
    assert prompts.num_rows == 8
    ids = prompts.column("prompt_id").to_pylist()
    assert ids == [f"gsm8k_sample-{i}" for i in range(8)]  # no id field: "<stem>-<row index>"
    first = prompts.slice(0, 1).to_pylist()[0]
    assert first["prompt"].startswith("Mia has 3 boxes")
    assert first["gold_answer"].endswith("#### 27")
    assert first["gold_solution"] is None  # the default solution field is absent from GSM8K


def test_gsm8k_solution_mapped_to_answer():
    cfg = jsonl_cfg(GSM8K, fields=FieldMap(solution="answer"))
    prompts, _ = load_prompts(cfg, "train")
    assert prompts.column("gold_solution").to_pylist() == prompts.column("gold_answer").to_pylist()


def test_math_sample_with_mapping():
    cfg = jsonl_cfg(MATH, fields=FieldMap(question="problem", answer="solution"))
    prompts, skips = load_prompts(cfg, "train")
    assert prompts.num_rows == 8 and skips.num_rows == 0
    assert prompts.column("prompt_id").to_pylist()[:2] == ["math-algebra-1", "math-prealgebra-2"]
    row = prompts.slice(1, 1).to_pylist()[0]
    assert row["prompt"] == "What is $\\frac{1}{4} + \\frac{1}{4}$?"
    assert "\\boxed{\\frac{1}{2}}" in row["gold_answer"]
    assert row["gold_solution"] == row["gold_answer"]


def test_max_prompts_truncates():
    prompts, _ = load_prompts(jsonl_cfg(GSM8K, max_prompts=3), "train")
    assert prompts.column("prompt_id").to_pylist() == ["gsm8k_sample-0", "gsm8k_sample-1", "gsm8k_sample-2"]


def test_arithmetic_source():
    cfg = DataConfig(arithmetic=ArithmeticTaskConfig(n_train=30, n_test=12))
    train, skips = load_prompts(cfg, "train")
    test, _ = load_prompts(cfg, "test")
    assert (train.num_rows, test.num_rows, skips.num_rows) == (30, 12, 0)
    assert train.schema.names == PROMPTS.names + ["difficulty"]
    assert train.column("prompt_id").to_pylist()[0] == "arith-train-000000"
    assert not set(train.column("prompt").to_pylist()) & set(test.column("prompt").to_pylist())
    small, _ = load_prompts(cfg.model_copy(update={"max_prompts": 5}), "train")
    assert small.column("prompt").to_pylist() == train.column("prompt").to_pylist()[:5]


def test_numeric_answers_and_ids_become_strings(tmp_path):
    f = write_lines(tmp_path / "nums.jsonl", [{"id": 7, "question": "q?", "answer": 42}])
    row = load_prompts(jsonl_cfg(f), "train")[0].to_pylist()[0]
    assert (row["prompt_id"], row["gold_answer"]) == ("7", "42")


def test_blank_lines_are_not_rows(tmp_path):
    f = write_lines(tmp_path / "gaps.jsonl", [{"question": "a?", "answer": "1"}, "", "   ", {"question": "b?", "answer": "2"}])
    prompts, skips = load_prompts(jsonl_cfg(f), "train")
    assert prompts.column("prompt_id").to_pylist() == ["gaps-0", "gaps-1"]
    assert skips.num_rows == 0


# ------------------------------------------------------------------------------------ chat template


class FakeTokenizer:
    def __init__(self):
        self.calls = []

    def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=False):
        self.calls.append((messages, tokenize, add_generation_prompt))
        return f"<user>{messages[0]['content']}</user><assistant>"


def test_chat_template():
    tok = FakeTokenizer()
    prompts, _ = load_prompts(jsonl_cfg(GSM8K, chat_template=True, max_prompts=2), "train", tokenizer=tok)
    assert prompts.column("prompt").to_pylist()[0].startswith("<user>Mia has 3 boxes")
    assert prompts.column("prompt").to_pylist()[0].endswith("</user><assistant>")
    assert tok.calls[0][0][0]["role"] == "user"
    assert tok.calls[0][1:] == (False, True)  # tokenize=False, add_generation_prompt=True
    with pytest.raises(PromptDataError, match="no tokenizer"):
        load_prompts(jsonl_cfg(GSM8K, chat_template=True), "train")


# ------------------------------------------------------------------------------------ file-level errors


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    for mode in ("error", "skip"):
        with pytest.raises(PromptDataError) as e:
            load_prompts(jsonl_cfg(missing, on_bad_row=mode), "train")
        assert str(missing) in str(e.value) and "not found" in str(e.value)


def test_test_path_unset():
    with pytest.raises(PromptDataError, match="data.test_path is not set"):
        load_prompts(jsonl_cfg(GSM8K), "test")


def test_empty_file(tmp_path):
    for f in (DATA / "empty.jsonl", tmp_path / "zero.jsonl"):
        f.touch()
        with pytest.raises(PromptDataError) as e:
            load_prompts(jsonl_cfg(f, on_bad_row="skip"), "train")
        assert str(f) in str(e.value) and "empty file" in str(e.value)


def test_not_utf8_names_line_and_offset():
    f = DATA / "not_utf8.jsonl"
    # line 1 is 43 characters + newline = 44 bytes; '{"question": "caf' is 17 more: offset 61
    for mode in ("error", "skip"):
        with pytest.raises(PromptDataError) as e:
            load_prompts(jsonl_cfg(f, on_bad_row=mode), "train")
        msg = str(e.value)
        assert str(f) in msg and "line 2" in msg and "byte offset 61" in msg and "UTF-8" in msg


# ------------------------------------------------------------------------------------ row-level errors

GOOD = {"question": "What is 1+1?", "answer": "2"}

ROW_CASES = [
    # (name, lines, line number, field, words in the message)
    ("missing_question", [GOOD, {"answer": "5"}], "line 2", "question", "missing field"),
    ("null_question", [GOOD, {"question": None, "answer": "5"}], "line 2", "question", "missing field"),
    ("empty_question", [GOOD, {"question": "  \n", "answer": "5"}], "line 2", "question", "empty question"),
    ("int_question", [GOOD, {"question": 17, "answer": "5"}], "line 2", "question", "must be a string"),
    ("missing_answer", [GOOD, GOOD, {"question": "What is 2+3?"}], "line 3", "answer", "missing field"),
    ("list_answer", [GOOD, {"question": "q?", "answer": [1]}], "line 2", "answer", "string or a number"),
    ("truncated_json", [GOOD, '{"question": "What is 3+4?", "ans'], "line 2", None, "invalid JSON"),
    ("not_an_object", [GOOD, "[1, 2]"], "line 2", None, "JSON object"),
    ("duplicate_id", [{"id": "a", **GOOD}, {"id": "b", **GOOD}, {"id": "a", **GOOD}], "line 3", "id", "duplicate id 'a' (first at line 1)"),
    ("missing_id", [{"id": "a", **GOOD}, GOOD], "line 2", "id", "missing field"),
]


@pytest.mark.parametrize("name, lines, row, field, words", ROW_CASES, ids=[c[0] for c in ROW_CASES])
def test_bad_row_raises(tmp_path, name, lines, row, field, words):
    f = write_lines(tmp_path / f"{name}.jsonl", lines)
    with pytest.raises(PromptDataError) as e:
        load_prompts(jsonl_cfg(f), "train")
    msg = str(e.value)
    assert_names(msg, f, row, field)
    assert words in msg


@pytest.mark.parametrize("name, lines, row, field, words", ROW_CASES, ids=[c[0] for c in ROW_CASES])
def test_bad_row_skipped_with_the_same_message(tmp_path, name, lines, row, field, words):
    f = write_lines(tmp_path / f"{name}.jsonl", lines)
    with pytest.raises(PromptDataError) as e:
        load_prompts(jsonl_cfg(f), "train")
    prompts, skips = load_prompts(jsonl_cfg(f, on_bad_row="skip"), "train")
    assert prompts.num_rows == len(lines) - 1  # the good rows all kept
    assert skips.schema == SKIPS
    (skip,) = skips.to_pylist()
    assert skip["reason"] == "bad_row" and skip["round"] == 0
    assert str(e.value).startswith(skip["detail"])  # the error message, minus the hint
    assert_names(skip["detail"], f, row, field)
    assert skip["prompt_id"] == f"{name}-{len(lines) - 1}"  # positional id of the bad row


def test_bad_rows_file_skip_mode():
    f = DATA / "bad_rows.jsonl"
    with pytest.raises(PromptDataError) as e:
        load_prompts(jsonl_cfg(f), "train")
    assert_names(str(e.value), f, "line 2", "question")  # the first bad row stops loading
    prompts, skips = load_prompts(jsonl_cfg(f, on_bad_row="skip"), "train")
    assert prompts.column("prompt_id").to_pylist() == ["bad_rows-0", "bad_rows-4"]
    assert prompts.column("gold_answer").to_pylist() == ["4", "10"]
    details = skips.column("detail").to_pylist()
    assert [d.split(", ")[0] for d in details] == [f"{f}: line 2", f"{f}: line 3", f"{f}: line 4"]
    assert "missing field" in details[0] and "empty question" in details[1] and "invalid JSON" in details[2]
    assert skips.column("prompt_id").to_pylist() == ["bad_rows-1", "bad_rows-2", "bad_rows-3"]
    # nothing dropped silently: every row is a prompt or a skip
    assert prompts.num_rows + skips.num_rows == 5


def test_dup_ids_file():
    prompts, skips = load_prompts(jsonl_cfg(DATA / "dup_ids.jsonl", on_bad_row="skip"), "train")
    assert prompts.column("prompt_id").to_pylist() == ["q1", "q2"]
    assert prompts.column("prompt").to_pylist()[0] == "What is 1+1?"  # the first q1 is kept
    assert "duplicate id 'q1'" in skips.column("detail").to_pylist()[0]


def test_all_rows_bad_raises(tmp_path):
    f = write_lines(tmp_path / "allbad.jsonl", [{"answer": "1"}, {"answer": "2"}])
    with pytest.raises(PromptDataError, match="no usable rows"):
        load_prompts(jsonl_cfg(f, on_bad_row="skip"), "train")


# ------------------------------------------------------------------------------------ Parquet


def parquet_cfg(path, **kw) -> DataConfig:
    return DataConfig(source="parquet", train_path=str(path), **kw)


def test_parquet(tmp_path):
    f = tmp_path / "p.parquet"
    pq.write_table(
        pa.table({"id": [10, 11], "question": ["a?", "b?"], "answer": [1, 2], "extra": [0.1, 0.2]}), f
    )
    prompts, skips = load_prompts(parquet_cfg(f), "train")
    assert prompts.schema == PROMPTS and skips.num_rows == 0
    assert prompts.to_pylist() == [
        {"prompt_id": "10", "prompt": "a?", "gold_answer": "1", "gold_solution": None},
        {"prompt_id": "11", "prompt": "b?", "gold_answer": "2", "gold_solution": None},
    ]
    # no id column: positional ids
    g = tmp_path / "noid.parquet"
    pq.write_table(pa.table({"question": ["a?"], "answer": ["1"]}), g)
    assert load_prompts(parquet_cfg(g), "train")[0].column("prompt_id").to_pylist() == ["noid-0"]


def test_parquet_missing_column_always_raises(tmp_path):
    f = tmp_path / "nocol.parquet"
    pq.write_table(pa.table({"q": ["a?"], "answer": ["1"]}), f)
    for mode in ("error", "skip"):
        with pytest.raises(PromptDataError) as e:
            load_prompts(parquet_cfg(f, on_bad_row=mode), "train")
        msg = str(e.value)
        assert str(f) in msg and "missing column 'question'" in msg and "data.fields.question" in msg


def test_parquet_mistyped_column(tmp_path):
    f = tmp_path / "mistyped.parquet"
    pq.write_table(pa.table({"question": pa.array([1, 2], pa.int64()), "answer": ["1", "2"]}), f)
    for mode in ("error", "skip"):
        with pytest.raises(PromptDataError) as e:
            load_prompts(parquet_cfg(f, on_bad_row=mode), "train")
        msg = str(e.value)
        assert str(f) in msg and "'question'" in msg and "int64" in msg and "expected string" in msg


def test_parquet_null_question_row(tmp_path):
    f = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"question": ["a?", None, "c?"], "answer": ["1", "2", "3"]}), f)
    with pytest.raises(PromptDataError) as e:
        load_prompts(parquet_cfg(f), "train")
    assert_names(str(e.value), f, "row 2", "question")
    prompts, skips = load_prompts(parquet_cfg(f, on_bad_row="skip"), "train")
    assert prompts.column("prompt_id").to_pylist() == ["nulls-0", "nulls-2"]
    assert skips.column("prompt_id").to_pylist() == ["nulls-1"]


def test_parquet_duplicate_ids(tmp_path):
    f = tmp_path / "dups.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "a"], "question": ["a?", "b?", "c?"], "answer": ["1", "2", "3"]}), f)
    with pytest.raises(PromptDataError) as e:
        load_prompts(parquet_cfg(f), "train")
    assert_names(str(e.value), f, "row 3", "id")
    assert "duplicate id 'a' (first at row 1)" in str(e.value)
    prompts, skips = load_prompts(parquet_cfg(f, on_bad_row="skip"), "train")
    assert prompts.column("prompt_id").to_pylist() == ["a", "b"]
    assert prompts.column("prompt").to_pylist()[0] == "a?"  # the first 'a' is kept
    (skip,) = skips.to_pylist()
    assert skip["prompt_id"] == "dups-2" and "duplicate id 'a' (first at row 1)" in skip["detail"]
    # Integer ids that collide once read as strings are duplicates too.
    g = tmp_path / "intdups.parquet"
    pq.write_table(pa.table({"id": [7, 7], "question": ["a?", "b?"], "answer": ["1", "2"]}), g)
    with pytest.raises(PromptDataError, match="duplicate id '7' \\(first at row 1\\)"):
        load_prompts(parquet_cfg(g), "train")


def test_parquet_unreadable_and_empty(tmp_path):
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"this is not parquet")
    with pytest.raises(PromptDataError, match="cannot read as Parquet"):
        load_prompts(parquet_cfg(junk), "train")
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"question": pa.array([], pa.string()), "answer": pa.array([], pa.string())}), empty)
    with pytest.raises(PromptDataError, match="empty file"):
        load_prompts(parquet_cfg(empty), "train")


# ------------------------------------------------------------------------------------ HF dataset on disk


def test_hf_disk_dataset_and_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    single = tmp_path / "single"
    datasets.Dataset.from_dict({"problem": ["p1?", "p2?"], "solution": ["\\boxed{1}", "\\boxed{2}"]}).save_to_disk(str(single))
    cfg = DataConfig(source="hf_disk", train_path=str(single), fields=FieldMap(question="problem", answer="solution"))
    prompts, _ = load_prompts(cfg, "train")
    assert prompts.to_pylist()[1] == {
        "prompt_id": "single-1", "prompt": "p2?", "gold_answer": "\\boxed{2}", "gold_solution": "\\boxed{2}",
    }
    with pytest.raises(PromptDataError, match="test_path|no split"):
        load_prompts(cfg, "test")  # a plain Dataset has no test split to fall back on

    both = tmp_path / "both"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"id": ["t0", "t1"], "question": ["a?", "b?"], "answer": ["1", "2"]}),
            "test": datasets.Dataset.from_dict({"id": ["e0"], "question": ["c?"], "answer": ["3"]}),
        }
    ).save_to_disk(str(both))
    cfg = DataConfig(source="hf_disk", train_path=str(both))  # test_path unset: the dict's test split
    assert load_prompts(cfg, "train")[0].column("prompt_id").to_pylist() == ["t0", "t1"]
    assert load_prompts(cfg, "test")[0].column("prompt_id").to_pylist() == ["e0"]

    missing = DataConfig(source="hf_disk", train_path=str(tmp_path / "absent"))
    with pytest.raises(PromptDataError, match="not found"):
        load_prompts(missing, "train")


def test_round_prompts_are_fresh_windows_and_bad_rows_are_reported_once():
    cfg = jsonl_cfg(GSM8K, on_bad_row="skip")
    prompts, _ = load_prompts(cfg, "train")
    bad = pa.Table.from_pylist([{"prompt_id": "x"}] * 2)
    k = prompts.num_rows // 2
    windowed = cfg.model_copy(update={"prompts_per_round": k})
    ids = prompts.column("prompt_id").to_pylist()
    r1, bad1 = round_prompts(prompts, bad, windowed, 2, 1)
    r2, bad2 = round_prompts(prompts, bad, windowed, 2, 2)
    assert r1.column("prompt_id").to_pylist() == ids[:k] and r2.column("prompt_id").to_pylist() == ids[k : 2 * k]
    assert (bad1.num_rows, bad2.num_rows) == (2, 0)  # each input row is accounted for in one round only
    with pytest.raises(ValueError, match=f"needs {3 * k} train prompts.*has {prompts.num_rows}"):
        round_prompts(prompts, bad, windowed, 3, 1)  # refused in round 1, before any sampling
    # Unset: the whole split and its bad rows in every round, as before.
    again, bad_again = round_prompts(prompts, bad, cfg, 2, 2)
    assert again.column("prompt_id").to_pylist() == ids and bad_again.num_rows == 2


def _char_policy(tmp_path, template=None):
    import string

    from wpo_ray.tiny_model import build_char_tokenizer

    tok = build_char_tokenizer(string.ascii_letters + string.digits + string.punctuation + " \n")
    if template:
        tok.chat_template = template
    tok.save_pretrained(tmp_path / "policy")
    return tok, str(tmp_path / "policy")


def test_prompts_longer_than_the_limit_become_too_long_skips_before_sampling(tmp_path):
    import pyarrow.parquet as pq

    from pipeline.sampling import prompts_stage
    from wpo_ray.config import load_config
    from wpo_ray.rundir import RunDir

    tok, policy = _char_policy(tmp_path)
    cfg = load_config(None, [f"data.source=jsonl", f"data.train_path={GSM8K}", "data.max_prompt_length=90",
                             f"run.dir={tmp_path / 'run'}"])
    all_rows, _ = load_prompts(cfg.data, "train")
    lengths = {r["prompt_id"]: len(tok(r["prompt"])["input_ids"]) for r in all_rows.to_pylist()}
    assert any(n > 90 for n in lengths.values()) and any(n <= 90 for n in lengths.values())
    run = RunDir(cfg)
    kept = prompts_stage(cfg, run, 1, policy)
    prompts = pq.read_table(run.output(1, "prompts") / "prompts.parquet").to_pylist()
    skips = pq.read_table(run.output(1, "prompts") / "bad_rows.parquet").to_pylist()
    assert kept == len(prompts) == sum(n <= 90 for n in lengths.values())
    assert {s["prompt_id"] for s in skips} == {k for k, n in lengths.items() if n > 90}
    assert {s["reason"] for s in skips} == {"too_long"} and all(s["round"] == 1 for s in skips)
    assert run.done(1, "prompts")["bad_rows"] == len(skips)  # in the round's accounting


def test_the_prompt_limit_comes_from_the_engine_length_and_a_template_longer_than_it_is_refused(tmp_path):
    from wpo_ray.config import load_config
    from wpo_ray.prompts import check_template_fits
    from wpo_ray.train_plan import prompt_token_limit

    assert prompt_token_limit(load_config(None, ["sampling.max_tokens=16"])) == 64 - 16  # the tiny model's 64
    assert prompt_token_limit(load_config(None, ["model.path=/m", "sampling.engine.max_model_len=4096",
                                                 "sampling.max_tokens=512"])) == 3584
    assert prompt_token_limit(load_config(None, ["model.path=/m"])) is None  # the engine decides
    assert prompt_token_limit(load_config(None, ["data.max_prompt_length=7"])) == 7
    tok, _ = _char_policy(tmp_path, template="{% for m in messages %}<<{{ m['content'] }}>> SYSTEM PREAMBLE{% endfor %}")
    check_template_fits(tok, 40)
    with pytest.raises(PromptDataError, match=r"data.max_prompt_length: 10 tokens, but the chat template alone takes \d+"):
        check_template_fits(tok, 10)
