"""The built-in arithmetic task: gold answers, difficulty buckets, splits, alphabet."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest

from wpo_ray import arithmetic as ar
from wpo_ray.config import ArithmeticTaskConfig
from wpo_ray.contracts import PROMPTS, validate


@pytest.fixture(scope="module")
def cfg() -> ArithmeticTaskConfig:
    # Wider than the tiny default (2 digits, 1 step) so the generator's whole range is exercised.
    return ArithmeticTaskConfig(max_digits=3, max_steps=2)


@pytest.fixture(scope="module")
def train(cfg):
    return ar.make_split(cfg, "train", n=1500)


@pytest.fixture(scope="module")
def test_rows(cfg):
    return ar.make_split(cfg, "test")


# ------------------------------------------------------------------------------------ evaluation


@pytest.mark.parametrize(
    "expr, value",
    [
        ("3+5=", 8),
        ("37+485=", 522),
        ("3-8=", -5),
        ("3+5*2=", 13),  # * before +
        ("12*7-9=", 75),
        ("9-12*7=", -75),
        ("2-3-4=", -5),  # left to right, not 2-(3-4)
        ("10-2*3*4=", -14),
        ("100-7*3+4=", 83),
        ("0*5+3=", 3),
        ("99*5*60=", 29700),
        ("7", 7),
    ],
)
def test_evaluate_by_hand(expr, value):
    assert ar.evaluate(expr) == value


@pytest.mark.parametrize("bad", ["3++4=", "+3=", "3+=", "3/4=", "3 + 4=", ""])
def test_evaluate_rejects_malformed(bad):
    with pytest.raises(ValueError):
        ar.evaluate(bad)


def test_gold_answers_match_python_eval(train, test_rows):
    for r in train + test_rows:
        assert r["prompt"].endswith("=")
        assert int(r["gold_answer"]) == eval(r["prompt"][:-1])  # noqa: S307 - test oracle
        assert r["gold_answer"] == str(int(r["gold_answer"]))  # canonical: no "+", no leading 0
        assert r["gold_solution"] == r["gold_answer"]


# ------------------------------------------------------------------------------------ difficulty


@pytest.mark.parametrize(
    "expr, bucket",
    [
        ("3+5=", "easy"),
        ("7*8=", "easy"),
        ("37+48=", "easy"),
        ("3-5=", "easy"),
        ("123+456=", "medium"),
        ("33-85=", "medium"),  # negative result costs one more
        ("37*8=", "medium"),
        ("3+5*2=", "medium"),
        ("37*48=", "hard"),
        ("123*45=", "hard"),
        ("12*7-9=", "hard"),
    ],
)
def test_difficulty_buckets_by_hand(expr, bucket):
    assert ar.difficulty(expr) == bucket


def test_difficulty_score_by_hand():
    # 12*7: 2*2*1 = 4; 84-9: max(2, 1) = 2; one extra step: 1  ->  7
    assert ar.difficulty_score([12, 7, 9], ["*", "-"]) == 7.0
    # 3-5: 1 digit column + 1 for the negative result
    assert ar.difficulty_score([3, 5], ["-"]) == 2.0
    # 99*5*60: 2*2*1 + 2*3*2 (495 has 3 digits) + 1 step  ->  17
    assert ar.difficulty_score([99, 5, 60], ["*", "*"]) == 17.0


def test_buckets_balanced_and_consistent(train, test_rows):
    for rows in (train, test_rows):
        counts = Counter(r["difficulty"] for r in rows)
        assert set(counts) == set(ar.BUCKETS)
        # blocks of three hold one of each bucket: counts differ by at most one
        assert max(counts.values()) - min(counts.values()) <= 1
        for r in rows:
            assert ar.difficulty(r["prompt"]) == r["difficulty"]


def test_difficulty_spans_trivial_to_hard(train):
    prompts = [r["prompt"] for r in train]
    assert any(re.fullmatch(r"\d[+]\d=", p) for p in prompts)  # 1-digit + 1-digit
    assert any(re.search(r"\d{3}\*\d{2}|\d{2}\*\d{3}", p) for p in prompts)  # 3-digit multiplication
    assert any(len(re.findall(r"[-+*]", p)) == 2 for p in prompts)  # 2-step expressions


def test_config_knobs_respected():
    cfg = ArithmeticTaskConfig(max_digits=2, max_steps=3, n_train=300, n_test=50)
    rows = ar.make_split(cfg, "train")
    assert len(rows) == 300
    steps = Counter()
    for r in rows:
        operands, ops = ar.tokenize(r["prompt"])
        assert 1 <= len(ops) <= 3
        steps[len(ops)] += 1
        assert all(len(str(x)) <= 2 for x in operands)
    assert set(steps) == {1, 2, 3}


def test_multiplication_chains_stay_small():
    cfg = ArithmeticTaskConfig(max_digits=6, max_steps=4, n_train=600)
    for r in ar.make_split(cfg, "train"):
        operands, ops = ar.tokenize(r["prompt"])
        chain = [len(str(operands[0]))]
        for op, x in zip(ops, operands[1:]):
            if op == "*":
                chain.append(len(str(x)))
            else:
                assert sum(chain) <= ar.MUL_MAX_TOTAL_DIGITS or len(chain) == 1
                chain = [len(str(x))]
        assert sum(chain) <= ar.MUL_MAX_TOTAL_DIGITS or len(chain) == 1


# ------------------------------------------------------------------------------------ splits


def test_deterministic_and_seeded(cfg):
    a = ar.make_split(cfg, "train", n=100)
    assert a == ar.make_split(cfg, "train", n=100)
    other = ar.make_split(cfg.model_copy(update={"seed": cfg.seed + 1}), "train", n=100)
    assert [r["prompt"] for r in a] != [r["prompt"] for r in other]


def test_prefix_stable(cfg):
    assert ar.make_split(cfg, "train", n=40) == ar.make_split(cfg, "train", n=300)[:40]


def test_defaults_and_ids(cfg, test_rows):
    assert len(ar.make_split(cfg, "train")) == cfg.n_train == 256
    assert len(test_rows) == cfg.n_test == 200
    assert test_rows[0]["prompt_id"] == "arith-test-000000"
    assert test_rows[42]["prompt_id"] == "arith-test-000042"
    assert len({r["prompt_id"] for r in test_rows}) == len(test_rows)


def test_train_and_test_disjoint(train, test_rows):
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test_rows}
    assert len({r["prompt"] for r in test_rows}) == len(test_rows)  # unique within test


def test_disjoint_even_in_a_tiny_question_space():
    # 1-digit, 1 step: only 300 distinct questions; the test split takes 200 of them.
    cfg = ArithmeticTaskConfig(max_digits=1, max_steps=1, n_train=256, n_test=200)
    test = {r["prompt"] for r in ar.make_split(cfg, "test")}
    train = ar.make_split(cfg, "train")
    assert len(train) == 256
    assert not {r["prompt"] for r in train} & test
    assert {r["difficulty"] for r in train} == {"easy"}  # the only bucket this config can produce


def test_exhausted_space_raises():
    cfg = ArithmeticTaskConfig(max_digits=1, max_steps=1, n_test=3000)
    with pytest.raises(ValueError, match="no train questions left"):
        ar.make_split(cfg, "train", n=5)


def test_bad_split_name(cfg):
    with pytest.raises(ValueError, match="split"):
        ar.make_split(cfg, "validation")


# ------------------------------------------------------------------------------------ alphabet


def test_alphabet_closure_and_minimal(train, test_rows):
    assert len(set(ar.ALPHABET)) == len(ar.ALPHABET)
    worked = ar.make_split(ArithmeticTaskConfig(format="worked"), "train", n=300)
    used = set()
    for r in train + test_rows + worked:
        text = r["prompt"] + r["gold_answer"] + r["gold_solution"]
        assert set(text) <= set(ar.ALPHABET), text
        used |= set(text)
    assert used == set(ar.ALPHABET)  # minimal: every character is needed


# ------------------------------------------------------------------------------------ table


def test_to_prompts_table(test_rows):
    table = ar.to_prompts_table(test_rows)
    assert table.schema.names == PROMPTS.names + ["difficulty"]
    assert table.schema.field("difficulty").type == pa.string()
    validate(table, "prompts", source="arithmetic")
    assert table.num_rows == len(test_rows)
    assert table.column("prompt").to_pylist() == [r["prompt"] for r in test_rows]
    assert table.column("difficulty").to_pylist() == [r["difficulty"] for r in test_rows]


def test_default_task_has_every_bucket_with_single_operations():
    rows = ar.make_split(ArithmeticTaskConfig(), "test")
    assert Counter(r["difficulty"] for r in rows).keys() == set(ar.BUCKETS)
    assert all(len(re.findall(r"(?<=\d)[-+*]", r["prompt"])) == 1 for r in rows)
    assert any(re.fullmatch(r"\d{2}\*\d{2}=", r["prompt"]) for r in rows if r["difficulty"] == "hard")


# ------------------------------------------------------------------------------------ worked solutions


@pytest.mark.parametrize(
    "expr, solution",
    [
        ("7*8=", "56"),  # a table fact is just its value
        ("3+5=", "8"),
        ("5-2=", "3"),
        ("37+48=", "7+8|15|3+4+1|8|85"),  # column sums with the carry
        ("8+37=", "8+7|15|3+1|4|45"),
        ("85+37=", "5+7|12|8+3+1|12|122"),
        ("82-37=", "12-7|5|7-3|4|45"),  # column differences after borrowing
        ("33-85=", "85-33|5-3|2|8-3|5|52|-52"),  # the other way round, then the sign
        ("3-5=", "5-3|2|-2"),
        ("37*8=", "7*8|56|3*8+5|29|296"),  # digit by digit with the carry
        ("8*37=", "7*8|56|3*8+5|29|296"),
        ("37*48=", "37*8|296|37*4|148|296+1480|1776"),  # partial products, then their sum
        ("37*40=", "37*0|0|37*4|148|0+1480|1480"),
        ("12*7-9=", "12*7|84|84-9|75"),  # longer expressions: one operation at a time
        ("3-5*2+1=", "5*2|10|3-10|-7|-7+1|-6"),
    ],
)
def test_worked_solution_by_hand(expr, solution):
    assert ar.worked_solution(*ar.tokenize(expr)) == solution


@pytest.mark.parametrize("expr, solution", [("7*8=", "7*8|56"), ("3+5=", "3+5|8"), ("5-2=", "5-2|3"),
                                            ("3-5=", "5-3|2|-2"), ("37*8=", "7*8|56|3*8+5|29|296")])
def test_fact_steps_write_one_digit_facts_as_column_steps(expr, solution):
    assert ar.worked_solution(*ar.tokenize(expr), fact_steps=True) == solution


def test_fact_steps_reach_the_gold_solutions_of_a_split():
    rows = ar.make_split(ArithmeticTaskConfig(format="worked", fact_steps=True), "train", n=300)
    facts = [r for r in rows if re.fullmatch(r"\d[+*-]\d=", r["prompt"]) and not r["gold_answer"].startswith("-")]
    assert facts and all(r["gold_solution"] == f"{r['prompt'][:-1]}|{r['gold_answer']}" for r in facts)


def test_worked_solutions_end_in_the_answer_and_grade_correct():
    from wpo_ray.graders import arithmetic_check

    cfg = ArithmeticTaskConfig(format="worked", max_digits=3, max_steps=3)
    rows = ar.make_split(cfg, "train", n=600)
    for r in rows:
        assert r["gold_solution"].split("|")[-1] == r["gold_answer"] == str(ar.evaluate(r["prompt"]))
        assert arithmetic_check(r["gold_solution"], r["gold_answer"]).verdict == "correct", r
    # Multi-digit questions are worked in steps; the bare format keeps the answer as the solution.
    assert sum("|" in r["gold_solution"] for r in rows) > len(rows) / 2
    bare = ar.make_split(cfg.model_copy(update={"format": "answer"}), "train", n=600)
    assert [r["prompt"] for r in bare] == [r["prompt"] for r in rows]  # the format changes no question
    assert all(r["gold_solution"] == r["gold_answer"] for r in bare)


def test_a_change_of_worked_format_is_a_new_bootstrap_cache_entry(monkeypatch):
    from wpo_ray.bootstrap import bootstrap_key
    from wpo_ray.config import load_config

    root = Path(__file__).resolve().parents[2]
    worked = load_config(root / "configs" / "tiny-cpu.yaml")
    bare = load_config(root / "configs" / "tiny-cpu.yaml", ["data.arithmetic.format=answer"])
    before = bootstrap_key(worked), bootstrap_key(bare)
    assert ar.format_fingerprint().startswith("8;3;") and ar.format_fingerprint(True).startswith("3+5|8;5-2|3;")
    monkeypatch.setattr(ar, "format_fingerprint", lambda fact_steps=False: "another format")
    assert bootstrap_key(worked) != before[0]
    assert bootstrap_key(bare) == before[1]  # the bare format has no worked solutions to change
