"""Answer graders: extract a response's final answer and check it against the gold answer.

``get_grader(name, timeout_s=5.0)`` returns a grader from :data:`GRADERS`. A grader is called as
``grader(response, gold_answer) -> Grade`` or, batched, ``grader.grade_many(responses, gold)``
where ``gold`` is one gold answer for every response or a list of one per response.

Verdicts: ``correct``, ``wrong``, or ``invalid`` when no answer could be extracted or the check
itself failed or timed out (``note`` says why). One bad answer never fails a batch: any exception
while grading it becomes ``Grade("invalid", None, "grader error: ...")``.

``extracted`` is the answer in a normal form, so that equal answers count as one answer when the
pairing stage looks for the most frequent wrong one: the integer for ``arithmetic`` (``"007"`` →
``"7"``), the number without separators or trailing zeros for ``gsm8k`` (``"$1,000.00"`` →
``"1000"``), the stripped ``\\boxed{}`` content for ``math``.

The ``math`` grader checks equivalence with ``math_verify`` in a persistent child process: its own
timeouts use ``signal.alarm``, which only works in a main thread, and a Ray actor may call from any
thread. The parent waits at most ``timeout_s`` per answer; on expiry it kills the child, grades
that answer ``invalid`` with note ``"timeout after Xs"`` and starts a fresh child for the rest.
The child is started lazily (first call, ~0.5 s) and reused; it uses the ``spawn`` context, so a
plain script that grades math at import time needs the usual ``if __name__ == "__main__":`` guard
(Ray workers and pytest are fine).
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import re
import threading
import time
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Callable, Literal, Optional, Sequence, Union

log = logging.getLogger(__name__)

Verdict = Literal["correct", "wrong", "invalid"]


@dataclass(frozen=True)
class Grade:
    verdict: Verdict
    extracted: Optional[str] = None
    note: Optional[str] = None


def _error_grade(e: BaseException) -> Grade:
    return Grade("invalid", None, f"grader error: {type(e).__name__}: {e}")


class Grader:
    """Base class: subclasses implement ``grade_one`` (or override ``grade_many``)."""

    name = "base"

    def grade_one(self, response: str, gold_answer: str) -> Grade:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, response: str, gold_answer: str) -> Grade:
        return self.grade_many([response], gold_answer)[0]

    def grade_many(self, responses: Sequence[str], gold: Union[str, Sequence[str]]) -> list[Grade]:
        golds = _broadcast_gold(responses, gold)
        out = []
        for r, g in zip(responses, golds):
            try:
                out.append(self.grade_one(r, g))
            except Exception as e:  # noqa: BLE001 - one bad answer must not fail the batch
                out.append(_error_grade(e))
        return out

    def close(self) -> None:
        """Release resources (the math grader's child process); the grader stays usable."""


def _broadcast_gold(responses: Sequence[str], gold: Union[str, Sequence[str], None]) -> list:
    if gold is None or isinstance(gold, str):
        return [gold] * len(responses)
    golds = list(gold)
    if len(golds) != len(responses):
        raise ValueError(f"grade_many: {len(responses)} responses but {len(golds)} gold answers")
    return golds


# ------------------------------------------------------------------------------------ arithmetic

_INT_RE = re.compile(r"-?\d+")


class ArithmeticGrader(Grader):
    """The built-in arithmetic task: the response up to its first whitespace must be an integer.

    ``-?digits`` only (no ``+5``, no ``5.0``); compared as integers, so ``"007"`` equals ``"7"`` and
    ``"-0"`` equals ``"0"``. Anything else (empty, ``"12a"``, ``"1,000"``) is invalid.
    """

    name = "arithmetic"

    def grade_one(self, response: str, gold_answer: str) -> Grade:
        if gold_answer is None or not _INT_RE.fullmatch(str(gold_answer).strip()):
            return Grade("invalid", None, f"gold answer {gold_answer!r} is not an integer")
        parts = (response or "").split(maxsplit=1)
        if not parts:
            return Grade("invalid", None, "empty response")
        token = parts[0]
        if not _INT_RE.fullmatch(token):
            return Grade("invalid", None, f"not an integer: {token[:40]!r}")
        value = int(token)
        extracted = str(value)
        verdict = "correct" if value == int(str(gold_answer).strip()) else "wrong"
        return Grade(verdict, extracted)


# ----------------------------------------------------------------------------------------- gsm8k

# A number: optional sign (dropped again where it is a binary minus, "10-3"), optional currency,
# digits with comma thousands separators or plain digits, optional decimals; or ".5".
_NUM_RE = re.compile(
    r"(?P<sign>[-\u2212])?[$\u20ac\u00a3]?"
    r"(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?(?!\d)|\d+(?:\.\d+)?|\.\d+)"
)


def _numbers(text: str) -> list[Decimal]:
    out = []
    for m in _NUM_RE.finditer(text):
        sign = m.group("sign")
        start = m.start()
        # "10-3": the '-' is an operator, not a sign.
        if sign and start > 0 and (text[start - 1].isalnum() or text[start - 1] in ")]"):
            sign = None
        # "x2", "a1.5": a digit glued to a word is not a number of its own.
        num_start = m.start("num")
        if num_start > 0 and (text[num_start - 1].isalpha() or text[num_start - 1] == "_"):
            continue
        try:
            value = Decimal(m.group("num").replace(",", ""))
        except InvalidOperation:
            continue
        out.append(-value if sign else value)
    return out


def _normal_number(x: Decimal) -> str:
    if x == x.to_integral_value():
        return str(int(x))
    return format(x.normalize(), "f")


def extract_gsm8k_answer(text: str) -> Optional[Decimal]:
    """The number after the last ``####`` when there is one, else the last number in the text."""
    if text is None:
        return None
    if "####" in text:
        nums = _numbers(text.rsplit("####", 1)[1])
        return nums[0] if nums else None
    nums = _numbers(text)
    return nums[-1] if nums else None


class GSM8KGrader(Grader):
    """GSM8K-style numeric answers. ``"$1,000.00"`` = ``"1000"``, ``"12 apples"`` = ``"12"``.

    Numbers are compared with ``math.isclose(rel_tol=1e-6, abs_tol=1e-6)``. The gold answer may be
    a bare number or a full GSM8K solution ending in ``#### 42``; it is extracted the same way.
    """

    name = "gsm8k"

    def grade_one(self, response: str, gold_answer: str) -> Grade:
        gold = extract_gsm8k_answer(gold_answer)
        if gold is None:
            return Grade("invalid", None, f"no number in the gold answer {str(gold_answer)[:60]!r}")
        pred = extract_gsm8k_answer(response or "")
        if pred is None:
            return Grade("invalid", None, "no number in the response")
        ok = math.isclose(float(pred), float(gold), rel_tol=1e-6, abs_tol=1e-6)
        return Grade("correct" if ok else "wrong", _normal_number(pred))


# ------------------------------------------------------------------------------------------ math


def last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (balanced braces) or ``\\boxed 5``."""
    if not text:
        return None
    best = None
    for m in re.finditer(r"\\(?:boxed|fbox)(?![A-Za-z])", text):
        i = m.end()
        j = i
        while j < len(text) and text[j] in " \t":
            j += 1
        if j < len(text) and text[j] == "{":
            depth = 0
            for k in range(j, len(text)):
                if text[k] == "{":
                    depth += 1
                elif text[k] == "}":
                    depth -= 1
                    if depth == 0:
                        best = text[j + 1 : k]
                        break
            # unbalanced braces: not an answer
        elif j > i:  # "\boxed 5": the next token
            tok = re.match(r"[^\s$]+", text[j:])
            if tok:
                best = tok.group(0).rstrip(".,;")
    return best.strip() if best is not None else None


def _math_gold(gold: str) -> str:
    """Gold answer of a MATH row: the last ``\\boxed{}`` of a solution, else the text itself."""
    boxed = last_boxed(gold)
    if boxed is not None:
        return boxed
    s = gold.strip()
    if len(s) >= 2 and s.startswith("$") and s.endswith("$"):
        s = s.strip("$").strip()
    return s


_SEP_RE = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")


def _math_parse_input(s: str) -> str:
    if _SEP_RE.match(s):  # "1,000" is a number, not the tuple (1, 000)
        s = s.replace(",", "")
    return "$" + s + "$"


def math_verify_check(pred: str, gold: str) -> bool:
    """Equivalence of two LaTeX answers with math_verify; runs in the grader's child process."""
    from math_verify import parse, verify

    g = parse(_math_parse_input(gold), parsing_timeout=None)
    p = parse(_math_parse_input(pred), parsing_timeout=None)
    if not g or not p:
        return False
    return bool(verify(g, p, timeout_seconds=None))


def sleepy_check_for_tests(pred: str, gold: str) -> bool:
    """Test hook: sleeps ``float(pred)`` seconds when pred is ``"sleep:<s>"``, raises on ``"raise"``."""
    if pred.startswith("sleep:"):
        time.sleep(float(pred.split(":", 1)[1]))
        return True
    if pred == "raise":
        raise RuntimeError("deliberate failure")
    if pred == "die":
        import os

        os._exit(3)
    return math_verify_check(pred, gold)


def _math_child(conn, check: Callable[[str, str], bool]) -> None:  # pragma: no cover - child
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    try:
        math_verify_check("\\frac{1}{2}", "0.5")  # warm up sympy / the LaTeX parser
    except Exception:  # noqa: BLE001
        pass
    conn.send(("ready", None, None))
    while True:
        try:
            batch = conn.recv()
        except (EOFError, OSError):
            return
        if batch is None:
            return
        for i, pred, gold in batch:
            try:
                conn.send((i, "ok", bool(check(pred, gold))))
            except Exception as e:  # noqa: BLE001
                conn.send((i, "error", f"{type(e).__name__}: {e}"[:500]))


class MathGrader(Grader):
    """MATH-style answers: the last ``\\boxed{}`` compared with math_verify under a time limit.

    ``check`` (a module-level function, it is sent to the child by reference) replaces the
    equivalence test; tests use :func:`sleepy_check_for_tests` to make the limit fire.
    """

    name = "math"

    def __init__(
        self,
        timeout_s: float = 5.0,
        check: Callable[[str, str], bool] = math_verify_check,
        startup_timeout_s: float = 120.0,
        mp_context: str = "spawn",
    ):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = float(timeout_s)
        self.check = check
        self.startup_timeout_s = startup_timeout_s
        self._ctx = mp.get_context(mp_context)
        self._proc = None
        self._conn = None
        self._lock = threading.Lock()
        self.restarts = 0  # children started after the first (timeouts, crashes)

    # -------------------------------------------------------------------------------- child

    def _start(self) -> None:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_math_child, args=(child, self.check), daemon=True,
                                 name="wpo-math-grader")
        proc.start()
        child.close()
        if not parent.poll(self.startup_timeout_s):
            proc.kill()
            proc.join(5)
            raise RuntimeError(f"math grader process did not start within {self.startup_timeout_s}s")
        try:
            parent.recv()
        except EOFError:
            proc.join(5)
            raise RuntimeError(f"math grader process exited at start (exit code {proc.exitcode})") from None
        if self._proc is not None:
            self.restarts += 1
        self._proc, self._conn = proc, parent

    def _kill(self) -> None:
        proc, conn = self._proc, self._conn
        self._conn = None
        if conn is not None:
            try:
                conn.close()
            except OSError:
                pass
        if proc is not None and proc.is_alive():
            proc.kill()
            proc.join(5)

    def __del__(self):  # best effort; the child is a daemon and dies with this process anyway
        try:
            self._kill()
        except Exception:  # noqa: BLE001
            pass

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.send(None)
                except (OSError, BrokenPipeError):
                    pass
            if self._proc is not None:
                self._proc.join(1)
            self._kill()
            self._proc = None

    # -------------------------------------------------------------------------------- grading

    def grade_many(self, responses: Sequence[str], gold: Union[str, Sequence[str]]) -> list[Grade]:
        golds = _broadcast_gold(responses, gold)
        out: list[Optional[Grade]] = [None] * len(responses)
        extracted: list[Optional[str]] = [None] * len(responses)
        work = []
        for i, (r, g) in enumerate(zip(responses, golds)):
            try:
                if g is None or not str(g).strip():
                    out[i] = Grade("invalid", None, "no gold answer")
                    continue
                box = last_boxed(r or "")
                if box is None:
                    out[i] = Grade("invalid", None, "no \\boxed{} answer")
                    continue
                extracted[i] = box
                if not box:
                    out[i] = Grade("invalid", box, "empty \\boxed{}")
                    continue
                work.append((i, box, _math_gold(str(g))))
            except Exception as e:  # noqa: BLE001
                out[i] = _error_grade(e)
        if work:
            with self._lock:
                self._run(work, out, extracted)
        return [g if g is not None else Grade("invalid", None, "not graded") for g in out]

    def _run(self, work: list, out: list, extracted: list) -> None:
        pending = work
        while pending:
            if self._conn is None or self._proc is None or not self._proc.is_alive():
                self._kill()
                try:
                    self._start()
                except Exception as e:  # noqa: BLE001
                    for i, _, _ in pending:
                        out[i] = Grade("invalid", extracted[i], f"grader error: {e}")
                    return
            try:
                self._conn.send(pending)
            except (OSError, BrokenPipeError) as e:
                self._kill()
                for i, _, _ in pending:
                    out[i] = Grade("invalid", extracted[i], f"grader error: {e}")
                return
            rest: list = []
            for k, (i, _, _) in enumerate(pending):
                failure = None
                try:
                    if self._conn.poll(self.timeout_s):
                        j, status, value = self._conn.recv()
                        if j != i:  # cannot happen: the child answers in order
                            raise RuntimeError(f"math grader answered item {j}, expected {i}")
                        if status == "ok":
                            out[i] = Grade("correct" if value else "wrong", extracted[i])
                        else:
                            out[i] = Grade("invalid", extracted[i], f"grader error: {value}")
                        continue
                    failure = f"timeout after {self.timeout_s:g}s"
                except (EOFError, OSError, RuntimeError) as e:
                    code = self._proc.exitcode if self._proc is not None else None
                    failure = f"grader error: math grader process died ({type(e).__name__}, exit code {code})"
                log.warning("math grader: %s on answer %r; restarting the checker", failure,
                            (extracted[i] or "")[:80])
                out[i] = Grade("invalid", extracted[i], failure)
                self._kill()
                rest = pending[k + 1 :]
                break
            pending = rest


# -------------------------------------------------------------------------------------- registry

GRADERS: dict[str, type[Grader]] = {
    "arithmetic": ArithmeticGrader,
    "gsm8k": GSM8KGrader,
    "math": MathGrader,
}


def get_grader(name: str, timeout_s: float = 5.0, **kwargs) -> Grader:
    """A new grader by registry name; ``timeout_s`` is the per-answer limit (GradingConfig.timeout_s)."""
    try:
        cls = GRADERS[name]
    except KeyError:
        raise ValueError(f"unknown grader {name!r}; known: {sorted(GRADERS)}") from None
    if cls is MathGrader:
        return cls(timeout_s=timeout_s, **kwargs)
    return cls(**kwargs)
