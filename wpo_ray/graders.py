"""Answer graders: extract a response's final answer and check it against the gold answer.

``get_grader(name, timeout_s=5.0)`` returns a grader from :data:`GRADERS`. A grader is called as
``grader(response, gold_answer) -> Grade`` or, batched, ``grader.grade_many(responses, gold)``
where ``gold`` is one gold answer for every response or a list of one per response.

Verdicts: ``correct``, ``wrong``, or ``invalid`` when no answer could be extracted or the check
itself failed or timed out (``note`` says why). One bad answer never fails a batch.

``extracted`` is the answer in a normal form, so that equal answers count as one answer when the
pairing stage looks for the most frequent wrong one: the integer for ``arithmetic`` (``"007"`` →
``"7"``), the number without separators or trailing zeros for ``gsm8k`` (``"$1,000.00"`` →
``"1000"``), the stripped ``\\boxed{}`` content for ``math``.

Every grader runs its per-answer check in a persistent child process (:class:`IsolatedRunner`), so
that no answer can hang or crash the caller (a Ray Data stage, the evaluator). ``arithmetic`` and
``gsm8k`` run their whole grading there; ``math`` extracts the ``\\boxed{}`` answer in the parent
and runs only the ``math_verify`` equivalence in the child (math_verify's own timeouts use
``signal.alarm``, which works only in a main thread, and a Ray actor may call from any thread).
The parent sends a batch of answers and waits at most ``timeout_s`` per answer. An answer whose
check times out, raises or kills the child is graded ``invalid`` with the note
``"timeout after Xs"``, ``"grader error: <type>: <msg>"`` or
``"grader error: <name> grader process died (...)"``; the child is killed if need be, a fresh one
is started and it grades the rest of the batch.

The child is started lazily on the first call (under a second; ``math`` also warms up sympy) and
reused until :meth:`Grader.close`; each answer then costs a pipe round trip (~0.1 ms). It uses the
``spawn`` context, so a plain script that grades at import time needs the usual
``if __name__ == "__main__":`` guard (Ray workers and pytest are fine).
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
from typing import Any, Callable, Literal, Optional, Sequence, Union

log = logging.getLogger(__name__)

Verdict = Literal["correct", "wrong", "invalid"]


@dataclass(frozen=True)
class Grade:
    verdict: Verdict
    extracted: Optional[str] = None
    note: Optional[str] = None


def _error_grade(e: BaseException) -> Grade:
    return Grade("invalid", None, f"grader error: {type(e).__name__}: {e}")


def _broadcast_gold(responses: Sequence[str], gold: Union[str, Sequence[str], None]) -> list:
    if gold is None or isinstance(gold, str):
        return [gold] * len(responses)
    golds = list(gold)
    if len(golds) != len(responses):
        raise ValueError(f"grade_many: {len(responses)} responses but {len(golds)} gold answers")
    return golds


# ---------------------------------------------------------------------------- isolated checks


def _runner_child(conn, check: Callable, warmup: Optional[Callable[[], None]]) -> None:  # pragma: no cover - child
    """Child loop: for each batch of argument tuples, send back ``("ok", check(*args))`` or ``("error", msg)``."""
    if warmup is not None:
        try:
            warmup()
        except Exception:  # noqa: BLE001 - a failed warm-up only makes the first answer slower
            pass
    conn.send("ready")
    while True:
        try:
            batch = conn.recv()
        except (EOFError, OSError):
            return
        if batch is None:
            return
        for args in batch:
            try:
                conn.send(("ok", check(*args)))
            except Exception as e:  # noqa: BLE001 - one bad answer must not end the child
                conn.send(("error", f"{type(e).__name__}: {e}"[:500]))


class IsolatedRunner:
    """Runs ``check(*args)`` for batches of argument tuples in one persistent child process.

    ``run(items)`` returns one ``(True, result)`` or ``(False, note)`` per item, in order. The parent
    waits at most ``timeout_s`` per item; on a timeout or a dead child it kills the child, notes the
    item and starts a fresh child for the rest. ``check`` and ``warmup`` must be module-level
    functions (or ``functools.partial``s of them): they are sent to the child by reference.
    """

    def __init__(
        self,
        check: Callable,
        timeout_s: float,
        name: str,
        warmup: Optional[Callable[[], None]] = None,
        startup_timeout_s: float = 120.0,
        mp_context: str = "spawn",
    ):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.check = check
        self.timeout_s = float(timeout_s)
        self.name = name
        self.warmup = warmup
        self.startup_timeout_s = startup_timeout_s
        self._ctx = mp.get_context(mp_context)
        self._proc = None
        self._conn = None
        self._lock = threading.Lock()  # one batch at a time: Ray actors may call from several threads
        self.restarts = 0  # children started after the first (timeouts, crashes)

    def _start(self) -> None:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_runner_child, args=(child, self.check, self.warmup), daemon=True,
                                 name=f"wpo-{self.name}-grader")
        proc.start()
        child.close()
        if not parent.poll(self.startup_timeout_s):
            proc.kill()
            proc.join(5)
            raise RuntimeError(f"{self.name} grader process did not start within {self.startup_timeout_s}s")
        try:
            parent.recv()
        except EOFError:
            proc.join(5)
            raise RuntimeError(f"{self.name} grader process exited at start (exit code {proc.exitcode})") from None
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
        """Stop the child; a later ``run`` starts a new one."""
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.send(None)
                except OSError:
                    pass
            if self._proc is not None:
                self._proc.join(1)
            self._kill()
            self._proc = None

    def run(self, items: Sequence[tuple]) -> list[tuple[bool, Any]]:
        results: list[tuple[bool, Any]] = []
        with self._lock:
            while len(results) < len(items):
                pending = list(items[len(results) :])
                if self._conn is None or self._proc is None or not self._proc.is_alive():
                    self._kill()
                    try:
                        self._start()
                    except Exception as e:  # noqa: BLE001 - no checker: every pending answer is invalid
                        return results + [(False, f"grader error: {e}")] * len(pending)
                try:
                    self._conn.send(pending)
                except Exception as e:  # noqa: BLE001 - broken pipe, or an argument that cannot be sent
                    self._kill()
                    return results + [(False, f"grader error: {type(e).__name__}: {e}")] * len(pending)
                for args in pending:
                    try:
                        if self._conn.poll(self.timeout_s):
                            status, value = self._conn.recv()
                            results.append((True, value) if status == "ok" else (False, f"grader error: {value}"))
                            continue
                        failure = f"timeout after {self.timeout_s:g}s"
                    except (EOFError, OSError) as e:
                        self._proc.join(1)  # reap it, so that the exit code is known
                        failure = (f"grader error: {self.name} grader process died "
                                   f"({type(e).__name__}, exit code {self._proc.exitcode})")
                    log.warning("%s grader: %s on answer %r; restarting its process", self.name, failure,
                                str(args[0])[:80])
                    results.append((False, failure))
                    self._kill()  # the next pass of the while loop starts a fresh child for the rest
                    break
        return results


# ------------------------------------------------------------------------------------- graders


class Grader:
    """Base class: ``check`` runs per answer in the child; ``_prepare``/``_finish`` run in the parent.

    A subclass sets ``default_check`` (a module-level function; ``check=`` replaces it, which is how
    tests inject :func:`sleepy_check_for_tests`) and, if part of the work is cheap and safe, overrides
    ``_prepare`` (answers decided without the check) and ``_finish`` (the check's result → Grade).
    """

    name = "base"
    default_check: Optional[Callable] = None
    warmup: Optional[Callable[[], None]] = None  # run once in each new child

    def __init__(
        self,
        timeout_s: float = 5.0,
        check: Optional[Callable] = None,
        startup_timeout_s: float = 120.0,
        mp_context: str = "spawn",
    ):
        check = check if check is not None else self.default_check
        if check is None:
            raise TypeError(f"{type(self).__name__} has no check")
        self.check = check
        self._runner = IsolatedRunner(check, timeout_s, self.name, warmup=self.warmup,
                                      startup_timeout_s=startup_timeout_s, mp_context=mp_context)
        self.timeout_s = self._runner.timeout_s

    @property
    def restarts(self) -> int:
        """Child processes started after the first one (after timeouts and crashes)."""
        return self._runner.restarts

    def _prepare(self, response: str, gold_answer: str) -> Union[Grade, tuple[tuple, Optional[str]]]:
        """A final Grade, or ``(args for check, extracted answer)``. Default: the check does it all."""
        return (response, gold_answer), None

    def _finish(self, result: Any, extracted: Optional[str]) -> Grade:
        """The check's result as a Grade. Default: the check returns the Grade itself."""
        if not isinstance(result, Grade):
            raise TypeError(f"{self.name} check returned {type(result).__name__}, expected Grade")
        return result

    def __call__(self, response: str, gold_answer: str) -> Grade:
        return self.grade_many([response], gold_answer)[0]

    def grade_many(self, responses: Sequence[str], gold: Union[str, Sequence[str]]) -> list[Grade]:
        golds = _broadcast_gold(responses, gold)
        out: list[Optional[Grade]] = [None] * len(responses)
        work = []  # (index, args for the check, extracted answer)
        for i, (r, g) in enumerate(zip(responses, golds)):
            try:
                prepared = self._prepare(r, g)
            except Exception as e:  # noqa: BLE001 - one bad answer must not fail the batch
                out[i] = _error_grade(e)
                continue
            if isinstance(prepared, Grade):
                out[i] = prepared
            else:
                work.append((i, *prepared))
        results = self._runner.run([args for _, args, _ in work]) if work else []
        for (i, _, extracted), (ok, value) in zip(work, results):
            try:
                out[i] = self._finish(value, extracted) if ok else Grade("invalid", extracted, value)
            except Exception as e:  # noqa: BLE001
                out[i] = _error_grade(e)
        return [g if g is not None else Grade("invalid", None, "not graded") for g in out]

    def close(self) -> None:
        """Stop the child process; the grader stays usable (the next call starts a new one)."""
        self._runner.close()


# ------------------------------------------------------------------------------------ arithmetic

_INT_RE = re.compile(r"-?\d+")


def arithmetic_check(response: str, gold_answer: str) -> Grade:
    """The built-in arithmetic task: the response up to its first whitespace must be an integer.

    ``-?digits`` only (no ``+5``, no ``5.0``); compared as integers, so ``"007"`` equals ``"7"`` and
    ``"-0"`` equals ``"0"``. Anything else (empty, ``"12a"``, ``"1,000"``) is invalid.
    """
    if gold_answer is None or not _INT_RE.fullmatch(str(gold_answer).strip()):
        return Grade("invalid", None, f"gold answer {gold_answer!r} is not an integer")
    parts = (response or "").split(maxsplit=1)
    if not parts:
        return Grade("invalid", None, "empty response")
    token = parts[0]
    if not _INT_RE.fullmatch(token):
        return Grade("invalid", None, f"not an integer: {token[:40]!r}")
    value = int(token)
    verdict = "correct" if value == int(str(gold_answer).strip()) else "wrong"
    return Grade(verdict, str(value))


class ArithmeticGrader(Grader):
    """:func:`arithmetic_check`, run in the child process."""

    name = "arithmetic"
    default_check = staticmethod(arithmetic_check)


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


def gsm8k_check(response: str, gold_answer: str) -> Grade:
    """GSM8K-style numeric answers. ``"$1,000.00"`` = ``"1000"``, ``"12 apples"`` = ``"12"``.

    Numbers are compared with ``math.isclose(rel_tol=1e-6, abs_tol=1e-6)``. The gold answer may be
    a bare number or a full GSM8K solution ending in ``#### 42``; it is extracted the same way.
    """
    gold = extract_gsm8k_answer(gold_answer)
    if gold is None:
        return Grade("invalid", None, f"no number in the gold answer {str(gold_answer)[:60]!r}")
    pred = extract_gsm8k_answer(response or "")
    if pred is None:
        return Grade("invalid", None, "no number in the response")
    ok = math.isclose(float(pred), float(gold), rel_tol=1e-6, abs_tol=1e-6)
    return Grade("correct" if ok else "wrong", _normal_number(pred))


class GSM8KGrader(Grader):
    """:func:`gsm8k_check` (number extraction included), run in the child process."""

    name = "gsm8k"
    default_check = staticmethod(gsm8k_check)


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


def _math_warmup() -> None:
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    math_verify_check("\\frac{1}{2}", "0.5")  # import sympy / the LaTeX parser before the first answer


def sleepy_check_for_tests(pred: str, gold: str, check: Callable = math_verify_check) -> Any:
    """Test hook: a check that misbehaves on demand, else ``check(pred, gold)``.

    ``"sleep:<s>"`` sleeps ``s`` seconds first, ``"raise"`` raises, ``"die"`` kills its process. The
    default wraps the math check; bind another grader's check with
    ``functools.partial(sleepy_check_for_tests, check=arithmetic_check)``.
    """
    if pred.startswith("sleep:"):
        time.sleep(float(pred.split(":", 1)[1]))
    elif pred == "raise":
        raise RuntimeError("deliberate failure")
    elif pred == "die":
        import os

        os._exit(3)
    return check(pred, gold)


class MathGrader(Grader):
    """MATH-style answers: the last ``\\boxed{}`` compared with math_verify under a time limit.

    The boxed answer is extracted in the parent; the child runs ``check(pred, gold) -> bool``.
    """

    name = "math"
    default_check = staticmethod(math_verify_check)
    warmup = staticmethod(_math_warmup)

    def _prepare(self, response: str, gold_answer: str) -> Union[Grade, tuple[tuple, Optional[str]]]:
        if gold_answer is None or not str(gold_answer).strip():
            return Grade("invalid", None, "no gold answer")
        box = last_boxed(response or "")
        if box is None:
            return Grade("invalid", None, "no \\boxed{} answer")
        if not box:
            return Grade("invalid", box, "empty \\boxed{}")
        return (box, _math_gold(str(gold_answer))), box

    def _finish(self, result: Any, extracted: Optional[str]) -> Grade:
        return Grade("correct" if result else "wrong", extracted)


# -------------------------------------------------------------------------------------- registry

GRADERS: dict[str, type[Grader]] = {
    "arithmetic": ArithmeticGrader,
    "gsm8k": GSM8KGrader,
    "math": MathGrader,
}


def get_grader(name: str, timeout_s: float = 5.0, **kwargs) -> Grader:
    """A new grader by registry name; ``timeout_s`` is the per-answer limit (GradingConfig.timeout_s).

    ``kwargs`` go to the grader's constructor (``check=``, ``startup_timeout_s=``, ``mp_context=``).
    """
    try:
        cls = GRADERS[name]
    except KeyError:
        raise ValueError(f"unknown grader {name!r}; known: {sorted(GRADERS)}") from None
    return cls(timeout_s=timeout_s, **kwargs)
