"""Graders on hand-written tricky cases, and every grader's time limit and crash recovery."""

from __future__ import annotations

import dataclasses
import functools
import multiprocessing as mp
import threading
import time

import pyarrow as pa
import pytest

from actors.grader import GraderActor
from wpo_ray import contracts
from wpo_ray.graders import (
    GRADERS,
    ArithmeticGrader,
    Grade,
    MathGrader,
    arithmetic_check,
    extract_gsm8k_answer,
    get_grader,
    gsm8k_check,
    math_check,
    sleepy_check_for_tests,
)


def test_registry():
    assert set(GRADERS) == {"arithmetic", "gsm8k", "math"}
    assert get_grader("arithmetic").name == "arithmetic"
    assert get_grader("gsm8k").name == "gsm8k"
    assert isinstance(get_grader("math"), MathGrader)
    for name in GRADERS:  # every grader gets the per-answer limit (grading.timeout_s)
        assert get_grader(name, timeout_s=1.5).timeout_s == 1.5
    with pytest.raises(ValueError, match="unknown grader 'mmlu'"):
        get_grader("mmlu")


def test_grade_is_frozen():
    g = Grade("correct", "4")
    assert g.note is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.verdict = "wrong"


# Each grader starts its worker process on first use: share one per module for the plain cases.
@pytest.fixture(scope="module")
def arithmetic_grader():
    g = get_grader("arithmetic")
    yield g
    g.close()


@pytest.fixture(scope="module")
def gsm8k_grader():
    g = get_grader("gsm8k")
    yield g
    g.close()


# ------------------------------------------------------------------------------------ arithmetic


@pytest.mark.parametrize(
    "response, gold, verdict, extracted",
    [
        ("522", "522", "correct", "522"),
        ("521", "522", "wrong", "521"),
        ("-12", "-12", "correct", "-12"),
        ("12", "-12", "wrong", "12"),
        ("007", "7", "correct", "7"),  # integer equality; extracted normalised
        ("-0", "0", "correct", "0"),
        ("  42\n43", "42", "correct", "42"),  # up to the first whitespace
        ("42 is it", "42", "correct", "42"),
        ("", "3", "invalid", None),
        ("   \n", "3", "invalid", None),
        ("4a", "4", "invalid", None),
        ("+4", "4", "invalid", None),
        ("4.0", "4", "invalid", None),
        ("1,000", "1000", "invalid", None),
        ("=4", "4", "invalid", None),
        # Worked solutions: only the final field is checked; a malformed one is invalid.
        ("37*8|296|37*4|148|296+1480|1776", "1776", "correct", "1776"),
        ("37*8|296|37*4|148|296+1480|1766", "1776", "wrong", "1766"),
        ("1*1|9|1776", "1776", "correct", "1776"),  # steps are not graded
        ("7+8|15|-52 tail", "-52", "correct", "-52"),
        ("7+8||15", "15", "invalid", None),  # an empty step
        ("7+8|", "15", "invalid", None),  # no final answer
        ("|15", "15", "invalid", None),
        ("7+a|15", "15", "invalid", None),  # a step outside the task's alphabet
        ("7+8|1a", "15", "invalid", None),
    ],
)
def test_arithmetic_grader(arithmetic_grader, response, gold, verdict, extracted):
    g = arithmetic_grader(response, gold)
    assert (g.verdict, g.extracted) == (verdict, extracted)
    if verdict == "invalid":
        assert g.note


def test_arithmetic_grade_many_broadcast_and_list(arithmetic_grader):
    g = arithmetic_grader
    assert [x.verdict for x in g.grade_many(["8", "9", "x"], "8")] == ["correct", "wrong", "invalid"]
    assert [x.verdict for x in g.grade_many(["8", "9"], ["8", "9"])] == ["correct", "correct"]
    with pytest.raises(ValueError, match="2 responses but 3 gold"):
        g.grade_many(["8", "9"], ["8", "9", "10"])


# ----------------------------------------------------------------------------------------- gsm8k


@pytest.mark.parametrize(
    "response, gold, verdict, extracted",
    [
        ("The answer is 1,000.", "1000", "correct", "1000"),
        ("1000", "1,000", "correct", "1000"),
        ("It costs $1,000.00 in total.", "1000", "correct", "1000"),
        ("She has 12 apples.", "12", "correct", "12"),
        ("5 + 7 = 12 apples, then 3 more", "12", "wrong", "3"),  # last number
        ("Reasoning 3 + 4 = 7\n#### 7", "7", "correct", "7"),
        ("#### 7\nthen I rambled 99", "7", "correct", "7"),  # after #### wins over the last number
        ("10-3 = 7", "7", "correct", "7"),  # binary minus is not a sign
        ("The temperature is -5 degrees", "-5", "correct", "-5"),
        ("#### -5", "5", "wrong", "-5"),
        ("#### $1,234", "1234", "correct", "1234"),
        ("3.50", "3.5", "correct", "3.5"),
        ("0.30000000001", "0.3", "correct", "0.30000000001"),  # float noise within 1e-6
        ("0.3334", "0.3333", "wrong", "0.3334"),  # but not a different decimal
        ("I do not know", "3", "invalid", None),
        ("", "3", "invalid", None),
        ("There are 48/2 = 24 clips\n#### 72", "Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72", "correct", "72"),
        ("#### 72", "He sold 48 + 24 = 72 in all.\n#### 72", "correct", "72"),
    ],
)
def test_gsm8k_grader(gsm8k_grader, response, gold, verdict, extracted):
    g = gsm8k_grader(response, gold)
    assert (g.verdict, g.extracted) == (verdict, extracted), g


def test_gsm8k_extract():
    assert str(extract_gsm8k_answer("#### 1,000")) == "1000"
    assert extract_gsm8k_answer("no digits") is None
    assert extract_gsm8k_answer("#### none") is None  # "####" without a number: no fallback to earlier text


def test_gsm8k_gold_without_number_is_invalid(gsm8k_grader):
    g = gsm8k_grader("12", "twelve")
    assert g.verdict == "invalid" and "gold" in g.note


def test_one_bad_answer_never_fails_the_batch(gsm8k_grader):
    g = gsm8k_grader
    out = g.grade_many(["#### 4", 1234, "#### 5"], "4")  # 1234 is not a string: the grader errs
    assert [x.verdict for x in out] == ["correct", "invalid", "wrong"]
    assert out[1].note.startswith("grader error: ")


# ------------------------------------------------------------------------------------------ math


@pytest.mark.parametrize(
    "text, extracted",
    [
        ("so \\boxed{5}.", "5"),
        # the last box, when the one before is far from it
        ("\\boxed{1}, but checking it again from the start the count comes out different: \\boxed{2}", "2"),
        ("x = \\boxed{1} or x = \\boxed{2}", "1,2"),  # boxes close together: one answer, the set {1, 2}
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
        ("\\boxed{\\dfrac12}", "\\frac{1}{2}"),  # math_verify's normal form...
        ("\\boxed{1/2}", "\\frac{1}{2}"),
        ("\\boxed{0.5}", "\\frac{1}{2}"),  # ...so equal answers group as one
        ("$\\fbox{ 7 }$", "7"),
        ("\\fbox{10}", "10"),
        ("\\boxed {x=3}", "x=3"),
        ("The final answer is $5$", "5"),  # an explicit final answer without a box
        ("\\boxed 5.", None),  # math_verify reads braced boxes only
        ("\\boxed{\\frac{1}{2}", None),  # unbalanced (a truncated response)
        ("\\boxed{\\quad}", None),  # a box with no math in it
        ("\\boxed{}", None),
        ("\\boxedx{3}", None),
        ("We get $x = 3$, so the answer is 3", None),  # bare LaTeX or numbers are not the answer
        ("", None),
    ],
)
def test_math_answer_extraction(text, extracted):
    g = math_check(text, "5")  # in-process: the check itself, without the worker
    assert g.extracted == extracted, g
    if extracted is None:
        assert g.verdict == "invalid" and g.note


@pytest.fixture(scope="module")
def math_grader():
    g = get_grader("math", timeout_s=20.0)  # generous: only the timeout test needs a short limit
    yield g
    g.close()


MATH_CASES = [
    ("so the answer is \\boxed{0.5}", "\\frac{1}{2}", "correct"),
    ("\\boxed{\\frac{1}{2}}", "0.5", "correct"),
    ("\\boxed{\\dfrac{1}{2}}", "\\frac12", "correct"),
    ("\\boxed{1,000}", "1000", "correct"),
    ("\\boxed{1000}", "1{,}000", "correct"),
    ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}", "correct"),
    ("\\boxed{x=3}", "3", "correct"),
    ("\\boxed{-3}", "-3", "correct"),
    ("\\boxed{3}", "-3", "wrong"),
    ("\\boxed{\\{2, 1\\}}", "\\{1,2\\}", "correct"),  # sets
    ("\\boxed{[0, 1)}", "[0,1)", "correct"),  # intervals
    ("\\boxed{(0, 1)}", "[0,1)", "wrong"),
    ("\\boxed{\\frac{1}{3}}", "0.5", "wrong"),
    ("\\fbox{10}", "The count is $\\binom{5}{2} = \\boxed{10}$.", "correct"),  # gold = a MATH solution
    ("I think it is 0.5", "\\frac{1}{2}", "invalid"),  # no \boxed
    ("\\boxed{}", "1", "invalid"),
]


def test_math_grader_cases(math_grader):
    responses = [r for r, _, _ in MATH_CASES]
    golds = [g for _, g, _ in MATH_CASES]
    out = math_grader.grade_many(responses, golds)
    assert [g.verdict for g in out] == [v for _, _, v in MATH_CASES], out
    assert out[0].extracted == "\\frac{1}{2}"  # math_verify's normal form of 0.5
    assert out[-2].extracted is None and "boxed" in out[-2].note


def test_math_equal_wrong_answers_share_one_extracted_answer(math_grader):
    out = math_grader.grade_many(["\\boxed{0.5}", "\\boxed{\\dfrac12}", "so $\\fbox{1/2}$", "\\boxed{3}"], "3")
    assert [g.verdict for g in out] == ["wrong", "wrong", "wrong", "correct"]
    assert len({g.extracted for g in out[:3]}) == 1


def test_math_grader_from_another_thread(math_grader):
    # math_verify's own signal.alarm timeouts fail off the main thread; ours must not.
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("g", math_grader("\\boxed{\\frac{2}{4}}", "0.5")))
    t.start()
    t.join(60)
    assert result["g"] == Grade("correct", "\\frac{2}{4}")


def test_math_timeout_kills_and_recovers():
    # One answer per task (max_chunk=1): every failure costs exactly one worker.
    g = MathGrader(timeout_s=0.5, check=sleepy_check_for_tests, max_chunk=1)
    try:
        start = time.monotonic()
        out = g.grade_many(["\\boxed{1}", "sleep:60", "\\boxed{2}", "raise", "die", "\\boxed{2.0}"], "2")
        elapsed = time.monotonic() - start
        assert [x.verdict for x in out] == ["wrong", "invalid", "correct", "invalid", "invalid", "correct"]
        assert out[1] == Grade("invalid", None, "timeout after 0.5s")  # extraction ran in the killed worker
        assert out[3].note == "grader error: RuntimeError: deliberate failure"
        assert "process died" in out[4].note
        assert g.restarts == 2  # after the timeout and after the crash
        assert elapsed < 30  # the 60 s sleep was cut short
        # a following normal call still works (same grader, fresh worker)
        assert g("\\boxed{\\frac{4}{2}}", "2").verdict == "correct"
    finally:
        g.close()


# ------------------------------------------------------------------- hangs and crashes, any grader


def _misbehaving(name: str, check, timeout_s: float = 0.5, **kwargs) -> dict:
    """get_grader kwargs for a grader whose check sleeps on "sleep:<s>", raises, or dies on "die"."""
    return dict(timeout_s=timeout_s, check=functools.partial(sleepy_check_for_tests, check=check), **kwargs)


@pytest.mark.parametrize(
    "max_chunk, restarts",
    [
        (1, 2),  # one answer per task: one worker lost to the hang, one to the crash
        # chunks (the first answer alone, to measure the check, then the other 5 in one task): the
        # chunk's timeout costs a worker, then its answers are graded one per task as above
        (None, 3),
    ],
    ids=["per-answer", "chunked"],
)
@pytest.mark.parametrize(
    "name, check, responses",
    [
        ("arithmetic", arithmetic_check, ["8", "sleep:60", "9", "raise", "die", "008"]),
        ("gsm8k", gsm8k_check, ["#### 8", "sleep:60", "It is 9.", "raise", "die", "$8.00"]),
    ],
    ids=["arithmetic", "gsm8k"],
)
def test_hang_or_crash_on_one_answer_is_invalid_and_the_batch_goes_on(name, check, responses, max_chunk, restarts):
    kwargs = {"max_chunk": max_chunk} if max_chunk else {}
    g = get_grader(name, **_misbehaving(name, check, **kwargs))
    try:
        start = time.monotonic()
        out = g.grade_many(responses, "8")
        assert time.monotonic() - start < 30  # the 60 s sleep was cut short
        assert [x.verdict for x in out] == ["correct", "invalid", "wrong", "invalid", "invalid", "correct"], out
        assert [x.extracted for x in out] == ["8", None, "9", None, None, "8"]
        assert out[1] == Grade("invalid", None, "timeout after 0.5s")
        assert out[3].note == "grader error: RuntimeError: deliberate failure"
        assert out[4].note.startswith(f"grader error: {name} grader process died"), out[4].note
        assert "exit code 3" in out[4].note
        assert g.restarts == restarts
        assert g("8", "8").verdict == "correct"  # the same grader goes on grading
    finally:
        g.close()


def test_a_crash_inside_a_big_chunk_is_put_on_the_right_answer():
    g = get_grader("arithmetic", **_misbehaving("arithmetic", arithmetic_check))
    try:
        responses = [str(i) for i in range(300)]
        responses[150] = "die"
        responses[250] = "raise"
        out = g.grade_many(responses, "7")
        assert [i for i, x in enumerate(out) if x.verdict == "invalid"] == [150, 250]
        assert "process died" in out[150].note and "deliberate failure" in out[250].note
        assert out[7] == Grade("correct", "7") and out[299] == Grade("wrong", "299")
        assert g.restarts == 2  # the chunk's crash, then the answer's own when graded alone
    finally:
        g.close()


class _NeverStarts(ArithmeticGrader):
    warmup = staticmethod(functools.partial(time.sleep, 60))  # run in each new worker before any answer


def test_a_worker_that_cannot_start_makes_the_batch_invalid_not_the_caller_fail():
    g = _NeverStarts(startup_timeout_s=1.0)
    try:
        start = time.monotonic()
        out = g.grade_many(["1", "2"], "1")
        assert time.monotonic() - start < 30
        note = "grader error: arithmetic grader process did not start within 1s"
        assert out == [Grade("invalid", None, note)] * 2
    finally:
        g.close()


def test_a_broken_pool_is_replaced_and_only_the_running_answer_is_blamed(monkeypatch):
    # pebble breaks its pool (every pending task fails with BrokenProcessPool) when the worker dies
    # before the parent has seen its task start; that race is hard to provoke, so fake that pool.
    from concurrent.futures import Future
    from concurrent.futures.process import BrokenProcessPool

    class BrokenPool:
        def schedule(self, *args, **kwargs):
            f = Future()
            f.set_exception(BrokenProcessPool("All workers expired"))
            return f

        def stop(self):
            pass

        def join(self):
            pass

    g = get_grader("arithmetic", max_chunk=1)
    try:
        real_get_pool = g._get_pool
        pools = iter([BrokenPool()])
        monkeypatch.setattr(g, "_get_pool", lambda: next(pools, None) or real_get_pool())
        out = g.grade_many(["1", "2", "3"], "2")
        assert out[0].verdict == "invalid" and "process died" in out[0].note, out[0]
        assert out[1:] == [Grade("correct", "2"), Grade("wrong", "3")]
        assert g.restarts == 1
    finally:
        g.close()


def _grader_workers() -> set:
    return {p.pid for p in mp.active_children() if p.name == "pebble_pool_worker"}


def test_worker_starts_lazily_and_close_releases_it():
    before = _grader_workers()
    g = get_grader("arithmetic")
    try:
        assert _grader_workers() == before  # nothing started yet
        assert g("3", "3").verdict == "correct"
        started = _grader_workers() - before
        assert len(started) == 1
        g.close()
        assert not started & _grader_workers()  # the worker is gone
        assert g("4", "3").verdict == "wrong"  # the next call starts a new one
    finally:
        g.close()


def test_grader_called_from_several_threads_at_once(arithmetic_grader):
    results = {}

    def grade(k):
        results[k] = arithmetic_grader.grade_many([str(k + i) for i in range(50)], str(k))

    threads = [threading.Thread(target=grade, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for k in range(4):
        assert [x.verdict for x in results[k]] == ["correct"] + ["wrong"] * 49
        assert [x.extracted for x in results[k]] == [str(k + i) for i in range(50)]


def test_grader_actor_puts_a_timeout_note_into_grade_notes():
    # GraderActor is a plain class (Ray hosts it in GraderPool), so no Ray is needed here.
    samples = pa.Table.from_pylist(
        [
            dict(prompt_id="p1", round=1, prompt="3+5=", gold_answer="8", gold_solution=None,
                 responses=["8", "sleep:60", "9"], response_logps=[-1.0, -2.0, -3.0], response_lengths=[1, 1, 1]),
            dict(prompt_id="p2", round=1, prompt="2+3=", gold_answer="5", gold_solution=None,
                 responses=["5", "x"], response_logps=[-1.0, -2.0], response_lengths=[1, 1]),
        ],
        schema=contracts.SAMPLES,
    )
    actor = GraderActor("arithmetic", **_misbehaving("arithmetic", arithmetic_check))
    try:
        graded = actor(samples)
    finally:
        actor.grader.close()
    assert graded.column_names == contracts.GRADED.names
    assert graded.select(contracts.SAMPLES.names).to_pylist() == samples.to_pylist()  # passed through
    assert graded.column("verdicts").to_pylist() == [["correct", "invalid", "wrong"], ["correct", "invalid"]]
    assert graded.column("extracted").to_pylist() == [["8", None, "9"], ["5", None]]
    assert graded.column("grade_notes").to_pylist() == [
        [None, "timeout after 0.5s", None],
        [None, "not an integer: 'x'"],
    ]
