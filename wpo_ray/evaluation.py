"""Evaluation: greedy accuracy and maj@N on a split, through the same samplers the pipeline uses."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Optional, Sequence

from .generation import Sampler, prompt_seed


def majority_answer(extracted: Sequence[Optional[str]]) -> Optional[str]:
    """Most frequent extracted answer (None = no answer is never a vote); ties → first seen."""
    votes = Counter(a for a in extracted if a is not None)
    if not votes:
        return None
    best = max(votes.values())
    return next(a for a in extracted if a is not None and votes[a] == best)


def accuracy_by_bucket(correct: Sequence[bool], buckets: Sequence[Optional[str]]) -> dict[str, float]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for c, b in zip(correct, buckets):
        groups[b or "all"].append(c)
    return {b: sum(v) / len(v) for b, v in sorted(groups.items())}


def evaluate(sampler: Sampler, rows: list[dict], grader, maj_n: int = 0, max_tokens: int = 16,
             seed: int = 0, temperature: float = 1.0) -> dict:
    """Greedy accuracy (and maj@maj_n from sampled answers when maj_n > 0) of `sampler` on `rows`
    (dicts with prompt_id, prompt, gold_answer and optionally difficulty), graded by `grader`
    (its `grade_many(responses, golds)`: wpo_ray/graders.py)."""
    if not rows:
        raise ValueError("evaluate: no rows to evaluate")
    prompts = [r["prompt"] for r in rows]
    seeds = [prompt_seed(seed, -1, r["prompt_id"]) for r in rows]
    golds = [r["gold_answer"] for r in rows]
    greedy = sampler.generate(prompts, seeds, n=1, temperature=0.0, top_p=1.0, max_tokens=max_tokens)
    # All answers in one grade_many call: the grader's process then checks them in chunks, not
    # one round trip per answer (1,800 of them for maj@8 on 200 questions).
    greedy_ok = [g.verdict == "correct" for g in grader.grade_many([g[0].text for g in greedy], golds)]
    buckets = [r.get("difficulty") for r in rows]
    out = {
        "n_prompts": len(rows),
        "greedy_accuracy": sum(greedy_ok) / len(rows),
        "greedy_by_bucket": accuracy_by_bucket(greedy_ok, buckets),
    }
    if maj_n > 0:
        sampled = sampler.generate(prompts, seeds, n=maj_n, temperature=temperature, top_p=1.0, max_tokens=max_tokens)
        flat = grader.grade_many([c.text for comps in sampled for c in comps],
                                 [gold for comps, gold in zip(sampled, golds) for _ in comps])
        maj_ok, at = [], 0
        for comps in sampled:
            grades, at = flat[at : at + len(comps)], at + len(comps)
            answer = majority_answer([g.extracted for g in grades])
            maj_ok.append(any(g.verdict == "correct" and g.extracted == answer for g in grades))
        out[f"maj@{maj_n}_accuracy"] = sum(maj_ok) / len(rows)
        out["maj_by_bucket"] = accuracy_by_bucket(maj_ok, buckets)
    return out
