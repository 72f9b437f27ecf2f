"""Answer graders: extract a response's final answer and check it against the gold answer.

``get_grader(name, timeout_s=5.0)`` returns a grader from :data:`GRADERS`. A grader is called as
``grader(response, gold_answer) -> Grade`` or, batched, ``grader.grade_many(responses, gold)``
where ``gold`` is one gold answer for every response or a list of one per response.

Verdicts: ``correct``, ``wrong``, or ``invalid`` when no answer could be extracted or the check
itself failed or timed out (``note`` says why). One bad answer never fails a batch.

``extracted`` is the answer in a normal form, so that equal answers count as one answer when the
pairing stage looks for the most frequent wrong one: the integer for ``arithmetic`` (``"007"`` →
``"7"``), the number without separators or trailing zeros for ``gsm8k`` (``"$1,000.00"`` →
``"1000"``), and for ``math`` the answer as math_verify extracts and normalises it (``\\dfrac12``,
``1/2`` and ``0.5`` → ``"\\frac{1}{2}"``; ``1{,}000`` → ``"1,000"``).

Every grader runs its whole check (extraction included) in the worker process of a one-worker
``pebble.ProcessPool``, so that no answer can hang or crash the caller (a Ray Data stage, the
evaluator), and so that the check runs in a main thread whatever thread the caller (a Ray actor)
is on: math_verify's own timeouts use ``signal.alarm``, which works only there (:func:`math_check`
leaves them off and relies on ``timeout_s``). Each task gets ``timeout_s``; pebble kills a worker
whose task runs past it and starts a new one, and reports a worker that died. An answer whose
check times out, raises or kills the worker is graded ``invalid`` with the note
``"timeout after Xs"``, ``"grader error: <type>: <msg>"`` or
``"grader error: <name> grader process died (exit code N)"``, and the rest of the batch is graded.

A pebble task costs ~0.1 ms, far more than a fast check (a few µs for ``arithmetic``), so a batch
is sent as chunks of answers (:func:`_check_chunk`), sized from the measured cost of the check so
that a chunk takes about a tenth of ``timeout_s`` (at most :data:`MAX_CHUNK` answers;
``max_chunk=1`` sends one answer per task). A chunk must finish within ``timeout_s`` in all; one
that times out or kills its worker is graded again one answer per task, so that a time limit or a
crash is put on the answer that caused it and every other answer still gets its own full
``timeout_s``. A hang thus costs up to twice ``timeout_s``, and :attr:`Grader.restarts` counts the
chunk's lost worker too.

The worker is started lazily on the first call (under a second; ``math`` also warms up sympy) and
reused until :meth:`Grader.close`. It uses the ``spawn`` context, so a plain script that grades at
import time needs the usual ``if __name__ == "__main__":`` guard (Ray workers and pytest are fine).
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
import re
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeoutError
from concurrent.futures import wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Literal, Optional, Sequence, Union

from pebble import ProcessExpired, ProcessPool

log = logging.getLogger(__name__)

Verdict = Literal["correct", "wrong", "invalid"]

MAX_CHUNK = 256  # answers per pebble task at most
CHUNK_BUDGET = 0.1  # a chunk is sized to take about this fraction of timeout_s
_SLACK_S = 10.0  # how much longer than pebble's own limits we wait before giving up on the pool


@dataclass(frozen=True)
class Grade:
    verdict: Verdict
    extracted: Optional[str] = None
    note: Optional[str] = None


def _broadcast_gold(responses: Sequence[str], gold: Union[str, Sequence[str], None]) -> list:
    if gold is None or isinstance(gold, str):
        return [gold] * len(responses)
    golds = list(gold)
    if len(golds) != len(responses):
        raise ValueError(f"grade_many: {len(responses)} responses but {len(golds)} gold answers")
    return golds


# ------------------------------------------------------------------------ worker-side functions


def _init_worker(warmup: Optional[Callable[[], None]]) -> None:  # pragma: no cover - runs in the worker
    """pebble initializer. It must not raise: pebble would count the worker as broken."""
    if warmup is not None:
        try:
            warmup()
        except Exception:  # noqa: BLE001 - a failed warm-up only makes the first answer slower
            pass


def _ready() -> int:  # pragma: no cover - runs in the worker
    return os.getpid()


def _check_chunk(check: Callable, items: Sequence[tuple]) -> tuple[list[tuple[bool, Any]], float]:
    """Worker side: ``(True, check(*args))`` or ``(False, note)`` per item, and the seconds it took."""
    t0 = time.perf_counter()
    out: list[tuple[bool, Any]] = []
    for args in items:
        try:
            out.append((True, check(*args)))
        except Exception as e:  # noqa: BLE001 - one bad answer must not fail the chunk
            out.append((False, f"grader error: {type(e).__name__}: {e}"[:500]))
    return out, time.perf_counter() - t0


# ------------------------------------------------------------------------------------- graders


class Grader:
    """Base class: runs ``check(response, gold) -> Grade`` for each answer in a pebble worker.

    A subclass sets ``default_check`` (a module-level function; ``check=`` replaces it, which is how
    tests inject :func:`sleepy_check_for_tests`) and optionally ``warmup`` (run once in each new
    worker). ``check`` and ``warmup`` are sent to the worker by reference: module-level functions
    or ``functools.partial``s of them.
    """

    name = "base"
    default_check: Optional[Callable] = None
    warmup: Optional[Callable[[], None]] = None

    def __init__(
        self,
        timeout_s: float = 5.0,
        check: Optional[Callable] = None,
        startup_timeout_s: float = 120.0,
        mp_context: str = "spawn",
        max_chunk: int = MAX_CHUNK,
    ):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if max_chunk < 1:
            raise ValueError(f"max_chunk must be >= 1, got {max_chunk}")
        check = check if check is not None else self.default_check
        if check is None:
            raise TypeError(f"{type(self).__name__} has no check")
        self.check = check
        self.timeout_s = float(timeout_s)
        self.startup_timeout_s = float(startup_timeout_s)
        self.max_chunk = int(max_chunk)
        self._mp_context = mp_context
        self._pool: Optional[ProcessPool] = None
        self._lock = threading.Lock()  # one batch at a time: Ray actors may call from several threads
        self._cost_s: Optional[float] = None  # measured seconds per answer of the check
        self.restarts = 0  # worker processes replaced: killed after a time limit, or died

    # ------------------------------------------------------------------------ the worker pool

    def _get_pool(self) -> ProcessPool:
        if self._pool is None:
            pool = ProcessPool(max_workers=1, initializer=_init_worker, initargs=(self.warmup,),
                               context=mp.get_context(self._mp_context))
            try:  # start the worker now, so that a worker that cannot start fails the batch at once
                pool.schedule(_ready).result(timeout=self.startup_timeout_s)
            except BaseException as e:
                self._stop(pool)
                if isinstance(e, FutureTimeoutError):
                    raise RuntimeError(f"{self.name} grader process did not start within "
                                       f"{self.startup_timeout_s:g}s") from None
                raise RuntimeError(f"{self.name} grader process did not start "
                                   f"({type(e).__name__}: {e})") from None
            self._pool = pool
        return self._pool

    @staticmethod
    def _stop(pool: ProcessPool) -> None:
        pool.stop()
        pool.join()

    def _drop_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                self._stop(pool)
            except Exception:  # noqa: BLE001 - it is being thrown away anyway
                log.debug("%s grader: stopping a broken pool failed", self.name, exc_info=True)

    def close(self) -> None:
        """Stop the worker; the grader stays usable (the next call starts a new one)."""
        with self._lock:
            self._drop_pool()

    def __del__(self):  # best effort; pebble also stops its workers when the interpreter exits
        try:
            self._drop_pool()
        except Exception:  # noqa: BLE001
            pass

    # ------------------------------------------------------------------------------ grading

    def __call__(self, response: str, gold_answer: str) -> Grade:
        return self.grade_many([response], gold_answer)[0]

    def grade_many(self, responses: Sequence[str], gold: Union[str, Sequence[str]]) -> list[Grade]:
        items = list(zip(responses, _broadcast_gold(responses, gold)))
        out: list[Grade] = []
        for ok, value in self._run(items):
            if not ok:
                out.append(Grade("invalid", None, value))
            elif isinstance(value, Grade):
                out.append(value)
            else:
                out.append(Grade("invalid", None, f"grader error: {self.name} check returned "
                                                  f"{type(value).__name__}, expected Grade"))
        return out

    def _chunk_size(self) -> int:
        if self._cost_s is None:
            return 1
        return max(1, min(self.max_chunk, int(CHUNK_BUDGET * self.timeout_s / max(self._cost_s, 1e-7))))

    def _run(self, items: list[tuple]) -> list[tuple[bool, Any]]:
        """``(True, check result)`` or ``(False, note)`` per item, in order."""
        results: list[Optional[tuple[bool, Any]]] = [None] * len(items)
        with self._lock:
            pending = list(range(len(items)))
            if self._cost_s is None and len(pending) > 1 and self.max_chunk > 1:
                self._run_chunks([pending[:1]], items, results)  # measures the check's cost first
                pending = pending[1:]
            size = self._chunk_size()
            retry = self._run_chunks([pending[k : k + size] for k in range(0, len(pending), size)], items, results)
            if retry:  # answers of chunks that timed out or died: one per task, to blame the right one
                self._run_chunks([[i] for i in retry], items, results)
        return [r if r is not None else (False, "grader error: not graded") for r in results]

    def _run_chunks(self, chunks: list[list[int]], items: list[tuple], results: list) -> list[int]:
        """Grade ``chunks`` (lists of item indexes) into ``results``; returns the indexes of chunks
        of several answers that timed out or killed the worker, to be graded again one by one."""
        retry: list[int] = []
        queue = [c for c in chunks if c]
        while queue:
            try:
                pool = self._get_pool()
                futures = [pool.schedule(_check_chunk, args=(self.check, [items[i] for i in c]),
                                         timeout=self.timeout_s) for c in queue]
            except Exception as e:  # noqa: BLE001 - no worker: every answer left is invalid
                self._drop_pool()
                note = f"grader error: {e}"
                for c in queue:
                    for i in c:
                        results[i] = (False, note)
                return retry
            # One worker runs the tasks in order, so each one ends at most about startup + timeout_s
            # after the one before it; waiting longer than that means the pool itself is stuck.
            patience = self.startup_timeout_s + self.timeout_s + _SLACK_S
            rest: list[list[int]] = []
            for k, (chunk, future) in enumerate(zip(queue, futures)):
                failure, broken = self._outcome(chunk, future, patience, results)
                if failure is None:
                    continue
                if len(chunk) > 1:
                    retry.extend(chunk)
                else:
                    log.warning("%s grader: %s on answer %r", self.name, failure, str(items[chunk[0]][0])[:80])
                    results[chunk[0]] = (False, failure)
                if broken:  # the pool's other tasks are lost: a new pool grades the chunks after this one
                    self._drop_pool()
                    rest = queue[k + 1 :]
                    break
            queue = rest
        return retry

    def _outcome(self, chunk: list[int], future, patience: float, results: list) -> tuple[Optional[str], bool]:
        """Wait for one chunk's task: ``(None, False)`` once its results are in ``results``, else
        ``(note, pool is broken)``."""
        if not wait([future], timeout=patience).done:
            self.restarts += 1
            return f"grader error: {self.name} grader process gave no answer within {patience:g}s", True
        e = future.exception()
        if e is None:
            values, seconds = future.result()
            for i, value in zip(chunk, values):
                results[i] = value
            cost = seconds / len(chunk)  # follow a slower check at once, a faster one slowly
            self._cost_s = cost if self._cost_s is None or cost > self._cost_s else 0.9 * self._cost_s + 0.1 * cost
            return None, False
        if isinstance(e, FutureTimeoutError):  # pebble killed the worker; it starts a new one itself
            self.restarts += 1  # (its answers, graded again one by one, measure how slow they are)
            return f"timeout after {self.timeout_s:g}s", False
        if isinstance(e, ProcessExpired):  # the worker died under this task; pebble starts a new one
            self.restarts += 1
            return f"grader error: {self.name} grader process died (exit code {e.exitcode})", False
        if isinstance(e, BrokenProcessPool):
            # pebble breaks the pool when its worker dies before the task is seen to start (a crash
            # right at the start of the check, or a new worker that cannot start).
            self.restarts += 1
            return f"grader error: {self.name} grader process died ({e})", True
        return f"grader error: {type(e).__name__}: {e}"[:500], False  # e.g. an answer that cannot be pickled


# ------------------------------------------------------------------------------------ arithmetic

_INT_RE = re.compile(r"-?\d+")


_STEP_RE = re.compile(r"[0-9+\-*=]+")


def arithmetic_check(response: str, gold_answer: str) -> Grade:
    """The built-in arithmetic task: the response up to its first whitespace, bare or worked.

    A bare answer is ``-?digits``; a worked solution is ``step|step|...|answer`` (wpo_ray/arithmetic.py)
    and only its last field, the answer, is checked: steps are not graded, but each must be a
    non-empty run of ``0-9 + - * =``. Compared as integers, so ``"007"`` equals ``"7"`` and ``"-0"``
    equals ``"0"``. Anything else (empty, ``"12a"``, ``"1,000"``, ``"7+8||15"``, ``"7+8|"``) is invalid.
    """
    if gold_answer is None or not _INT_RE.fullmatch(str(gold_answer).strip()):
        return Grade("invalid", None, f"gold answer {gold_answer!r} is not an integer")
    parts = (response or "").split(maxsplit=1)
    if not parts:
        return Grade("invalid", None, "empty response")
    *steps, token = parts[0].split("|")
    for i, step in enumerate(steps):
        if not _STEP_RE.fullmatch(step):
            return Grade("invalid", None, f"malformed step {i + 1}: {step[:40]!r}")
    if not _INT_RE.fullmatch(token):
        what = "no final answer after the last '|'" if steps and not token else f"not an integer: {token[:40]!r}"
        return Grade("invalid", None, what)
    value = int(token)
    verdict = "correct" if value == int(str(gold_answer).strip()) else "wrong"
    return Grade(verdict, str(value))


class ArithmeticGrader(Grader):
    """:func:`arithmetic_check`, run in the worker process."""

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
    """:func:`gsm8k_check` (number extraction included), run in the worker process."""

    name = "gsm8k"
    default_check = staticmethod(gsm8k_check)


# ------------------------------------------------------------------------------------------ math

# math_verify anchors its \boxed{} patterns on the literal "\boxed{"; \fbox{} and "\boxed {" are the
# same answer (its normalisation already reads \fbox), so spell them that way first.
_BOX_ALIAS_RE = re.compile(r"\\fbox(?![A-Za-z])\s*\{|\\boxed\s+\{")


def _unify_boxes(text: str) -> str:
    return _BOX_ALIAS_RE.sub(r"\\boxed{", text)


def _math_extraction():
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    # The response: a \boxed{} answer first (several boxes close together, "\boxed{1}, \boxed{2}", are
    # one answer, the set {1, 2}); failing that, LaTeX after an explicit "final answer is" / "answer:".
    # Bare LaTeX or numbers elsewhere in the text are not taken for the answer.
    response = [LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=False)]
    # The gold answer: the last \boxed{} of a MATH solution, or the whole text as an answer.
    gold = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    return response, gold


def _math_gold_text(gold: str) -> str:
    """A bare gold answer (``\\frac12``, ``[0,1)``) as math_verify wants it: in ``$...$``."""
    s = _unify_boxes(gold.strip())
    if "\\boxed{" in s or "$" in s:
        return s
    return "$" + s + "$"


def _answer(parsed: list) -> tuple[Any, Optional[str]]:
    """``math_verify.parse`` output → (the parsed object or None, its normalised string)."""
    objs = [x for x in parsed if not isinstance(x, str)]
    strs = [x for x in parsed if isinstance(x, str)]
    return (objs[0] if objs else None), (strs[0] if strs else None)


def math_check(response: str, gold_answer: str) -> Grade:
    """MATH-style answers, extracted with ``math_verify.parse`` and compared with ``math_verify.verify``.

    Runs in the grader's worker process, whose time limit is the only one: math_verify's own
    ``signal.alarm`` timeouts are off, because a timeout there turns into a silent ``wrong`` or
    "no answer" instead of an ``invalid`` answer with a note.
    """
    from math_verify import parse, verify

    if gold_answer is None or not str(gold_answer).strip():
        return Grade("invalid", None, "no gold answer")
    response_cfg, gold_cfg = _math_extraction()
    gold = parse(_math_gold_text(str(gold_answer)), gold_cfg, parsing_timeout=None)
    if not gold:
        return Grade("invalid", None, f"no answer in the gold answer {str(gold_answer)[:60]!r}")
    pred = parse(_unify_boxes(response or ""), response_cfg, parsing_timeout=None)
    if not pred:
        return Grade("invalid", None, "no \\boxed{} answer")
    obj, text = _answer(pred)
    ok = bool(verify(gold, pred, timeout_seconds=None))
    if obj is None and not ok:  # math_verify found a box but could not read it as math ("\boxed{\quad}")
        return Grade("invalid", None, f"unreadable answer {str(text)[:40]!r}")
    return Grade("correct" if ok else "wrong", text)


def _math_warmup() -> None:
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # e.g. "Timeout is disabled" on every worker
    math_check("\\boxed{\\frac{1}{2}}", "0.5")  # import sympy / the LaTeX parser before the first answer


def sleepy_check_for_tests(response: str, gold: str, check: Callable = math_check) -> Any:
    """Test hook: a check that misbehaves on demand, else ``check(response, gold)``.

    A response ``"sleep:<s>"`` sleeps ``s`` seconds first, ``"raise"`` raises, ``"die"`` kills its
    process. The default wraps the math check; bind another grader's check with
    ``functools.partial(sleepy_check_for_tests, check=arithmetic_check)``.
    """
    if response.startswith("sleep:"):
        time.sleep(float(response.split(":", 1)[1]))
    elif response == "raise":
        raise RuntimeError("deliberate failure")
    elif response == "die":
        os._exit(3)
    return check(response, gold)


class MathGrader(Grader):
    """:func:`math_check` (math_verify's extraction and equivalence), run in the worker process."""

    name = "math"
    default_check = staticmethod(math_check)
    warmup = staticmethod(_math_warmup)


# -------------------------------------------------------------------------------------- registry

GRADERS: dict[str, type[Grader]] = {
    "arithmetic": ArithmeticGrader,
    "gsm8k": GSM8KGrader,
    "math": MathGrader,
}


def get_grader(name: str, timeout_s: float = 5.0, **kwargs) -> Grader:
    """A new grader by registry name; ``timeout_s`` is the per-answer limit (GradingConfig.timeout_s).

    ``kwargs`` go to the grader's constructor (``check=``, ``startup_timeout_s=``, ``mp_context=``,
    ``max_chunk=``).
    """
    try:
        cls = GRADERS[name]
    except KeyError:
        raise ValueError(f"unknown grader {name!r}; known: {sorted(GRADERS)}") from None
    return cls(timeout_s=timeout_s, **kwargs)
