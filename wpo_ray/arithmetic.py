"""The built-in arithmetic task (docs/DESIGN.md): exactly checkable questions of graded difficulty.

A question is an integer expression over non-negative operands with ``+``, ``-`` and ``*``, written
without spaces and followed by ``=``: ``"37+485="``, ``"12*7-9="``. The answer is the integer value
under standard precedence (``*`` before ``+``/``-``, left to right), i.e. Python's ``eval``
semantics, written as a decimal string (``"-12"`` when negative). Every character of a prompt or
answer is in :data:`ALPHABET`, which is what the character-level tokenizer is built from.

Difficulty. Each question gets a score from what a left-to-right character model finds hard:

* an addition/subtraction costs the digit count of its larger term (column additions to get right),
* a multiplication costs ``2 · d1 · d2`` (1×1 is a table fact, 3-digit × 2-digit is long
  multiplication),
* a running result that goes negative adds 1 (``33-85``: compute 85-33, then the sign),
* every operation after the first adds 1 (intermediate results must be held).

The score is bucketed into ``easy`` (≤ 2: ``3+5``, ``37+48``, ``3-5``, ``7*8``), ``medium``
(3–5: ``123+456``, ``33-85``, ``37*8``, ``3+5*2``) and ``hard`` (≥ 6: ``37*48``, ``123*45``,
``12*7-9``). Rows are drawn so the three buckets are balanced: each block of three rows holds one
question of every bucket the config can produce (in a seeded order), found by rejection sampling
from a uniform structure sampler (steps uniform in 1..max_steps, operations uniform over
``+ - *``, operand digit counts uniform in 1..max_digits). Multiplication chains are capped at
:data:`MUL_MAX_TOTAL_DIGITS` operand digits in total, so products stay below 10^5 and answers stay
≤ ~6 digits (7 with max_digits=6).

Responses. With ``format: answer`` the response is the bare answer (``"37*48="`` → ``"1776"``); with
``format: worked`` it is a one-line worked solution whose last ``|``-separated field is the answer
(``"37*48="`` → ``"37*8|296|37*4|148|296+1480|1776"``, :func:`worked_solution`). Either way the
grader checks the final answer only. The worked steps give samples of a question something to
differ in, wrong answers cluster around typical slips (a dropped carry), and hard questions become
solvable step by step for a small model.

Splits are deterministic given ``cfg.seed``; the train split never contains a prompt of the test
split; prompts are unique within a split while the question space allows it. A split of ``n`` rows
is a prefix of the same split with more rows (the bootstrap SFT set of 20 000 rows starts with the
preference-training prompts).
"""

from __future__ import annotations

import random
from typing import Literal, Optional

import pyarrow as pa

from wpo_ray.config import ArithmeticTaskConfig
from wpo_ray.contracts import PROMPTS

#: Every character a prompt or a response can contain, in a fixed order (tokenizer vocabulary);
#: ``|`` separates the fields of a worked solution.
ALPHABET = "0123456789+-*=|"

OPS = ("+", "-", "*")
BUCKETS = ("easy", "medium", "hard")
#: Upper score bounds of the buckets: easy ≤ 2 < medium ≤ 5 < hard.
BUCKET_BOUNDS = {"easy": 2.0, "medium": 5.0}
#: Sum of the operand digit counts of one multiplication chain (a*b*c) is at most this.
MUL_MAX_TOTAL_DIGITS = 5

_MAX_TRIES_PER_BUCKET = 2000
_MAX_TRIES_UNIQUE = 50


class ArithmeticTaskError(ValueError):
    """Malformed expression or an impossible task configuration."""


# ------------------------------------------------------------------------------------ evaluation


def tokenize(expr: str) -> tuple[list[int], list[str]]:
    """Split ``"12*7-9"`` (optionally ending in ``=``) into operands ``[12, 7, 9]`` and ops ``['*', '-']``."""
    s = expr[:-1] if expr.endswith("=") else expr
    operands: list[int] = []
    ops: list[str] = []
    cur = ""
    for ch in s:
        if ch.isdigit():
            cur += ch
        elif ch in OPS:
            if not cur:
                raise ArithmeticTaskError(f"expression {expr!r}: operator {ch!r} without a left operand")
            operands.append(int(cur))
            ops.append(ch)
            cur = ""
        else:
            raise ArithmeticTaskError(f"expression {expr!r}: unexpected character {ch!r}")
    if not cur:
        raise ArithmeticTaskError(f"expression {expr!r}: missing final operand")
    operands.append(int(cur))
    return operands, ops


def _terms(operands: list[int], ops: list[str]) -> tuple[list[int], list[str]]:
    """Collapse multiplication chains: returns the additive terms and the +/- signs between them."""
    terms = [operands[0]]
    signs: list[str] = []
    for op, x in zip(ops, operands[1:]):
        if op == "*":
            terms[-1] *= x
        else:
            signs.append(op)
            terms.append(x)
    return terms, signs


def evaluate_parts(operands: list[int], ops: list[str]) -> int:
    terms, signs = _terms(operands, ops)
    total = terms[0]
    for sign, t in zip(signs, terms[1:]):
        total = total + t if sign == "+" else total - t
    return total


def evaluate(expr: str) -> int:
    """Value of an expression such as ``"3+5*2"`` (= 13) under Python precedence, without eval."""
    return evaluate_parts(*tokenize(expr))


# ------------------------------------------------------------------------------------ difficulty


def _ndigits(x: int) -> int:
    return len(str(abs(x)))


def difficulty_score(operands: list[int], ops: list[str]) -> float:
    """The score described in the module docstring (higher is harder)."""
    score = float(max(len(ops) - 1, 0))
    # Multiplications, left to right within each chain (a*b*c costs a*b, then (a*b)*c).
    acc = operands[0]
    for op, x in zip(ops, operands[1:]):
        if op == "*":
            score += 2.0 * _ndigits(acc) * _ndigits(x)
            acc *= x
        else:
            acc = x
    # Additions/subtractions between the (multiplied-out) terms, left to right.
    terms, signs = _terms(operands, ops)
    acc = terms[0]
    for sign, t in zip(signs, terms[1:]):
        score += max(_ndigits(acc), _ndigits(t))
        acc = acc + t if sign == "+" else acc - t
        if acc < 0:
            score += 1.0  # a negative running result: subtract the other way round, then the sign
    return score


def bucket_of(score: float) -> str:
    if score <= BUCKET_BOUNDS["easy"]:
        return "easy"
    if score <= BUCKET_BOUNDS["medium"]:
        return "medium"
    return "hard"


def difficulty(expr: str) -> str:
    """Bucket label (``easy``/``medium``/``hard``) of an expression string."""
    return bucket_of(difficulty_score(*tokenize(expr)))


# ------------------------------------------------------------------------------------ worked solutions


def _digits(x: int) -> list[int]:
    """Decimal digits of a non-negative integer, least significant first."""
    return [int(c) for c in reversed(str(x))]


def _column_add(a: int, b: int) -> list[str]:
    """``37+48`` → ``7+8 | 15 | 3+4+1 | 8 | 85``: each column's sum (with the carry), then the result."""
    da, db = _digits(a), _digits(b)
    fields, carry = [], 0
    for i in range(max(len(da), len(db))):
        terms = [str(d[i]) for d in (da, db) if i < len(d)] + ([str(carry)] if carry else [])
        total = sum(int(t) for t in terms)
        fields += ["+".join(terms), str(total)]
        carry = total // 10
    return fields + [str(a + b)]


def _column_sub(a: int, b: int) -> list[str]:
    """``82-37`` (a ≥ b) → ``12-7 | 5 | 7-3 | 4 | 45``: each column's top digit after borrowing."""
    da, db = _digits(a), _digits(b)
    fields, borrow = [], 0
    for i in range(len(da)):
        top, low = da[i] - borrow, db[i] if i < len(db) else 0
        borrow = int(top < low)
        top += 10 * borrow
        fields += [f"{top}-{low}", str(top - low)]
    return fields + [str(a - b)]


def _times_digit(a: int, d: int) -> list[str]:
    """``37*8`` → ``7*8 | 56 | 3*8+5 | 29 | 296``: digit by digit with the carry."""
    fields, carry = [], 0
    for x in _digits(a):
        expr = f"{x}*{d}" + (f"+{carry}" if carry else "")
        total = x * d + carry
        fields += [expr, str(total)]
        carry = total // 10
    return fields + [str(a * d)]


def _long_mul(a: int, b: int) -> list[str]:
    """``37*48`` → ``37*8 | 296 | 37*4 | 148 | 296+1480 | 1776``: partial products, then their sum."""
    fields, shifted = [], []
    for i, d in enumerate(_digits(b)):
        fields += [f"{a}*{d}", str(a * d)]
        shifted.append(str(a * d * 10**i))
    return fields + ["+".join(shifted), str(a * b)]


def _work_one(a: int, op: str, b: int, fact_steps: bool = False) -> list[str]:
    """The fields of one binary operation on non-negative operands, ending in its value. A 1-digit
    fact is its bare value, or with `fact_steps` the fact written as a column step (``7*8|56``)."""
    fact = [f"{a}{op}{b}"] if fact_steps else []
    if op == "+":
        return [*fact, str(a + b)] if a < 10 and b < 10 else _column_add(a, b)
    if op == "-":
        if a < b:  # the other way round, then the sign
            inner = [str(b - a)] if b < 10 else _column_sub(b, a)
            return [f"{b}-{a}", *inner, str(a - b)]
        return [*fact, str(a - b)] if a < 10 else _column_sub(a, b)
    if a < 10 and b < 10:
        return [*fact, str(a * b)]  # a table fact
    if b < 10 or a < 10:  # one multi-digit operand: digit by digit
        big, small = (a, b) if b < 10 else (b, a)
        return _times_digit(big, small)
    return _long_mul(a, b)


def worked_solution(operands: list[int], ops: list[str], fact_steps: bool = False) -> str:
    """A one-line worked solution whose last ``|``-separated field is the answer.

    A single operation is worked column by column (see the helpers above); a 1-digit fact is just
    its value, or with `fact_steps` (``data.arithmetic.fact_steps``) written as a column step
    writes it (``7*8|56``): the bootstrapped tiny policy then gets most 1-digit facts right,
    whereas as bare values it got 15% of 1-digit sums (docs/RESULTS.md). A longer expression is
    worked one operation at a time in evaluation order (multiplications first), each as
    ``x op y | value``, so ``12*7-9`` → ``12*7|84|84-9|75``.
    """
    if len(ops) == 1:
        return "|".join(_work_one(operands[0], ops[0], operands[1], fact_steps))
    fields: list[str] = []
    values, rest_ops = list(operands), list(ops)
    for wanted in ("*", "+-"):  # precedence: multiplication chains, then +/- left to right
        i = 0
        while i < len(rest_ops):
            if rest_ops[i] in wanted:
                x, op, y = values[i], rest_ops[i], values[i + 1]
                v = x * y if op == "*" else x + y if op == "+" else x - y
                fields += [f"{x}{op}{y}", str(v)]
                values[i : i + 2], rest_ops[i : i + 1] = [v], []
            else:
                i += 1
    return "|".join(fields)


def format_fingerprint(fact_steps: bool = False) -> str:
    """The worked solutions of one question per branch of :func:`_work_one` (and a longer one):
    it changes whenever the code's format does, so a policy cached for another is not reused."""
    probes = ("3+5=", "5-2=", "3-5=", "7*8=", "37+48=", "82-37=", "33-85=", "37*8=", "37*48=", "12*7-9=")
    return ";".join(worked_solution(*tokenize(p), fact_steps) for p in probes)


# ------------------------------------------------------------------------------------ sampling


def _operand(rng: random.Random, digits: int) -> int:
    if digits == 1:
        return rng.randint(0, 9)
    return rng.randint(10 ** (digits - 1), 10**digits - 1)


def _sample_structure(rng: random.Random, cfg: ArithmeticTaskConfig) -> tuple[list[int], list[str]]:
    steps = rng.randint(1, cfg.max_steps)
    ops = [rng.choice(OPS) for _ in range(steps)]
    digits = [rng.randint(1, cfg.max_digits) for _ in range(steps + 1)]
    # Cap every multiplication chain's total operand digits (shrink its widest operand).
    i = 0
    while i <= steps:
        j = i
        while j < steps and ops[j] == "*":
            j += 1
        chain = list(range(i, j + 1))
        if len(chain) > 1:
            while sum(digits[k] for k in chain) > MUL_MAX_TOTAL_DIGITS:
                widest = max(chain, key=lambda k: digits[k])
                if digits[widest] == 1:
                    break
                digits[widest] -= 1
        i = j + 1
    return [_operand(rng, d) for d in digits], ops


def _render(operands: list[int], ops: list[str]) -> str:
    out = str(operands[0])
    for op, x in zip(ops, operands[1:]):
        out += op + str(x)
    return out + "="


def _sample_in_bucket(
    rng: random.Random, cfg: ArithmeticTaskConfig, bucket: str
) -> Optional[tuple[str, int, str]]:
    for _ in range(_MAX_TRIES_PER_BUCKET):
        operands, ops = _sample_structure(rng, cfg)
        if bucket_of(difficulty_score(operands, ops)) == bucket:
            return _render(operands, ops), evaluate_parts(operands, ops), bucket
    return None


def _generate(cfg: ArithmeticTaskConfig, split: str, n: int, exclude: frozenset[str]) -> list[dict]:
    rng = random.Random(f"wpo-ray-arithmetic/{cfg.seed}/{split}")
    feasible = list(BUCKETS)
    rows: list[dict] = []
    seen: set[str] = set()
    block: list[str] = []
    while len(rows) < n:
        if not block:
            block = list(feasible)
            rng.shuffle(block)
        bucket = block.pop()
        chosen = None
        for attempt in range(_MAX_TRIES_UNIQUE):
            got = _sample_in_bucket(rng, cfg, bucket)
            if got is None:
                break
            if got[0] in exclude:
                continue
            chosen = got
            if got[0] not in seen:
                break
            # A duplicate within the split: keep looking, accept it if the space is exhausted.
        if chosen is None:
            if bucket in feasible:
                feasible.remove(bucket)
            block = [b for b in block if b in feasible]
            if not feasible:
                raise ArithmeticTaskError(
                    f"arithmetic task (max_digits={cfg.max_digits}, max_steps={cfg.max_steps}) has "
                    f"no {split} questions left outside the test split; raise max_digits or max_steps"
                )
            continue
        prompt, value, bucket = chosen
        seen.add(prompt)
        answer = str(value)
        rows.append(
            {
                "prompt_id": f"arith-{split}-{len(rows):06d}",
                "prompt": prompt,
                "gold_answer": answer,
                "gold_solution": worked_solution(*tokenize(prompt), cfg.fact_steps) if cfg.format == "worked" else answer,
                "difficulty": bucket,
            }
        )
    return rows


def make_split(
    cfg: ArithmeticTaskConfig, split: Literal["train", "test"], n: Optional[int] = None
) -> list[dict]:
    """Rows ``{prompt_id, prompt, gold_answer, gold_solution, difficulty}`` of one split.

    ``n`` defaults to ``cfg.n_train`` / ``cfg.n_test``. The test split is generated on its own; the
    train split excludes every prompt of the test split (of ``cfg.n_test`` rows).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if n is None:
        n = cfg.n_train if split == "train" else cfg.n_test
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if split == "test":
        return _generate(cfg, "test", n, frozenset())
    test_prompts = frozenset(r["prompt"] for r in _generate(cfg, "test", cfg.n_test, frozenset()))
    return _generate(cfg, "train", n, test_prompts)


def to_prompts_table(rows: list[dict]) -> pa.Table:
    """The rows as a table of the PROMPTS contract, plus a trailing ``difficulty`` column."""
    schema = pa.schema(list(PROMPTS) + [pa.field("difficulty", pa.string())])
    return pa.Table.from_pylist(
        [{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema
    )
