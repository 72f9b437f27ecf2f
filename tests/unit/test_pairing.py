"""Unit tests of wpo_ray.pairing: Ma et al. weights and the pair / skip choice (docs/DESIGN.md)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from wpo_ray import contracts
from wpo_ray.config import WeightingConfig
from wpo_ray.pairing import (
    GRADED_AND_OUTCOMES,
    PAIRS_AND_SKIPS,
    build_pairs,
    difficulty_weights,
    outcome_pairs,
    pairs_and_skips_batch,
    skip_record,
    split_outcomes,
    split_pairs_and_skips,
    with_outcomes,
    with_ref_logps,
)

DIFF = WeightingConfig()  # scheme=difficulty, alpha=1, eps=1e-6
UNIFORM = WeightingConfig(scheme="uniform")


def row(samples, prompt="What is 6*7?", gold_answer="42", gold_solution="6*7 = 42. Answer: 42", pid="q"):
    """A GRADED row from (text, verdict, extracted, total logp, length) tuples."""
    return {
        "prompt_id": pid,
        "round": 0,
        "prompt": prompt,
        "gold_answer": gold_answer,
        "gold_solution": gold_solution,
        "responses": [s[0] for s in samples],
        "verdicts": [s[1] for s in samples],
        "extracted": [s[2] for s in samples],
        "response_logps": [s[3] for s in samples],
        "response_lengths": [s[4] for s in samples],
        "grade_notes": [None for _ in samples],
    }


def difficulty_weight(n_correct, n_wrong, n, alpha, eps=1e-6) -> float:
    """One question's weight through the vectorised function the pipeline uses."""
    return float(difficulty_weights(np.array([n_correct]), np.array([n_wrong]), np.array([n]), alpha, eps)[0])


def pair_question(r: dict, round: int, weighting: WeightingConfig):
    """One GRADED row through build_pairs: (pair, None) or (None, skip), as dicts."""
    pairs, skips = build_pairs(contracts.from_rows([r], "graded"), round, weighting)
    assert pairs.num_rows + skips.num_rows == 1
    return (pairs.to_pylist() or [None])[0], (skips.to_pylist() or [None])[0]


# ------------------------------------------------------------------------------------------ weight


@pytest.mark.parametrize(
    "pc, pe, n, alpha, expected",
    [
        # P_c = 0: w = 1 + α·P_e/N, no ε involved.
        (0, 8, 8, 1.0, 2.0),
        (0, 8, 8, 0.5, 1.5),
        (0, 4, 4, 2.0, 3.0),
        (0, 5, 8, 1.0, 1.625),  # 1 + 5/8, fewer counted than N is allowed
        (0, 1, 4, 2.0, 1.5),  # 1 + 2·1/4
        # P_c > 0: w = 1 + α·P_e/((P_c + 1e-6)·N).
        (1, 7, 8, 1.0, 1 + 7 / (1.000001 * 8)),  # ≈ 1.875
        (4, 4, 8, 1.0, 1 + 4 / (4.000001 * 8)),  # ≈ 1.125
        (7, 1, 8, 1.0, 1 + 1 / (7.000001 * 8)),  # ≈ 1.017857
        (2, 6, 8, 3.0, 1 + 3 * 6 / (2.000001 * 8)),  # ≈ 2.125
        # P_e = 0: the max(1, ·) leaves exactly 1.
        (8, 0, 8, 1.0, 1.0),
        (3, 0, 3, 5.0, 1.0),
        # α = 0: every question weighs 1.
        (0, 8, 8, 0.0, 1.0),
        (1, 7, 8, 0.0, 1.0),
    ],
)
def test_weight_grid(pc, pe, n, alpha, expected):
    w = difficulty_weight(pc, pe, n, alpha)
    assert isinstance(w, float)
    assert w == pytest.approx(expected, rel=1e-12, abs=0)


def test_weight_hard_question_outweighs_easy_one():
    # All wrong (2.0) > mostly wrong (≈1.875) > half (≈1.125) > mostly right (≈1.018) > all right (1).
    ws = [difficulty_weight(pc, 8 - pc, 8, 1.0) for pc in (0, 1, 4, 7, 8)]
    assert ws == sorted(ws, reverse=True)
    assert ws[0] == 2.0 and ws[-1] == 1.0


def test_weight_eps_effect():
    # P_c=1, P_e=1, N=2, α=1: ε=1 gives 1 + 1/((1+1)·2) = 1.25; tiny ε gives ≈ 1 + 1/2 = 1.5.
    assert difficulty_weight(1, 1, 2, 1.0, eps=1.0) == pytest.approx(1.25, rel=1e-12)
    tiny = difficulty_weight(1, 1, 2, 1.0, eps=1e-6)
    assert tiny == pytest.approx(1.5, abs=1e-6)
    assert tiny < 1.5  # ε is in the denominator, so it lowers the weight
    # ε never enters when P_c = 0.
    assert difficulty_weight(0, 2, 2, 1.0, eps=1.0) == 2.0


@pytest.mark.parametrize(
    "args, name",
    [
        ((0, 0, 0, 1.0), "n must"),
        ((-1, 2, 2, 1.0), "n_correct"),
        ((1, -1, 2, 1.0), "n_wrong"),
        ((2, 1, 2, 1.0), "n_correct \\+ n_wrong"),
        ((1.5, 1, 3, 1.0), "n_correct"),
    ],
)
def test_weight_validation(args, name):
    with pytest.raises(ValueError, match=name):
        difficulty_weight(*args)


@pytest.mark.parametrize("key, value", [("alpha", -0.5), ("alpha", float("nan")), ("eps", 0.0), ("eps", -1.0)])
def test_alpha_and_eps_are_the_config_s_rule(key, value):
    with pytest.raises(ValueError, match=key):
        WeightingConfig(**{key: value})


def test_vectorised_matches_the_formula_on_random_grid():
    rng = np.random.default_rng(0)
    n = rng.integers(1, 33, size=500)
    pc = rng.integers(0, n + 1)
    pe = rng.integers(0, n - pc + 1)
    pc[:50] = 0  # make sure the P_c = 0 branch is well represented
    pe[50:100] = 0  # and the clamp branch
    for alpha, eps in [(1.0, 1e-6), (0.0, 1e-6), (2.5, 0.3), (0.7, 1e-3)]:
        vec = difficulty_weights(pc, pe, n, alpha, eps)
        by_hand = [1 + alpha * b / c if a == 0 else max(1.0, 1 + alpha * b / ((a + eps) * c))
                   for a, b, c in zip(pc.tolist(), pe.tolist(), n.tolist())]
        assert vec.dtype == np.float64 and vec.shape == (500,)
        np.testing.assert_allclose(vec, by_hand, rtol=1e-12, atol=0)


def test_vectorised_broadcasts_scalar_n_and_validates():
    w = difficulty_weights(np.array([0, 4, 8]), np.array([8, 4, 0]), 8, 1.0, 1e-6)
    assert w[0] == 2.0 and w[2] == 1.0
    assert w[1] == pytest.approx(1 + 4 / (4.000001 * 8), rel=1e-12)
    with pytest.raises(ValueError, match="n_correct \\+ n_wrong"):
        difficulty_weights(np.array([1, 5]), np.array([1, 4]), np.array([4, 8]), 1.0)
    with pytest.raises(ValueError, match="n must"):
        difficulty_weights(np.array([0]), np.array([0]), np.array([0]), 1.0)
    with pytest.raises(ValueError, match="n_wrong"):
        difficulty_weights(np.array([0]), np.array([-1]), 4, 1.0)
    with pytest.raises(ValueError, match="n_correct"):
        difficulty_weights(np.array([0.5]), np.array([1]), 4, 1.0)


# ------------------------------------------------------------------------------------------ pairing


def test_pair_basic_choice_uses_mean_logp():
    r = row(
        [
            ("c0", "correct", "42", -2.0, 4),  # mean -0.5 (total -2.0)
            ("c1", "correct", "42", -1.5, 1),  # mean -1.5 (total -1.5: best by total, not by mean)
            ("w2", "wrong", "7", -3.0, 3),  # mean -1.0
            ("w3", "wrong", "7", -1.0, 4),  # mean -0.25: best of group "7"
            ("w4", "wrong", "9", -0.1, 1),  # mean -0.1, but "9" appears once
        ]
    )
    pair, skip = pair_question(r, 3, DIFF)
    assert skip is None
    assert pair["chosen"] == "c0" and pair["chosen_source"] == "sampled"
    assert pair["rejected"] == "w3"
    assert pair["rejected_answer"] == "7" and pair["rejected_count"] == 2
    assert (pair["n_samples"], pair["n_correct"], pair["n_wrong"]) == (5, 2, 3)
    assert pair["round"] == 3 and pair["prompt_id"] == "q" and pair["prompt"] == "What is 6*7?"
    assert pair["weight"] == pytest.approx(1 + 3 / (2.000001 * 5), rel=1e-12)  # ≈ 1.3
    assert set(pair) == set(contracts.PAIRS.names)


def test_chosen_tie_goes_to_lowest_index():
    r = row([("w0", "wrong", "1", -1.0, 1), ("c1", "correct", "42", -2.0, 2), ("c2", "correct", "42", -3.0, 3)])
    pair, _ = pair_question(r, 0, DIFF)
    assert pair["chosen"] == "c1"  # both means are -1.0


def test_more_frequent_wrong_answer_beats_more_confident_one():
    r = row(
        [
            ("c0", "correct", "42", -1.0, 1),
            ("a", "wrong", "7", -9.0, 1),
            ("b", "wrong", "9", -0.1, 1),
            ("c", "wrong", "7", -8.0, 1),
            ("d", "wrong", "7", -7.0, 1),
        ]
    )
    pair, _ = pair_question(r, 0, DIFF)
    assert pair["rejected_answer"] == "7" and pair["rejected_count"] == 3
    assert pair["rejected"] == "d"  # best mean inside group "7"


def test_count_tie_broken_by_best_logp():
    r = row(
        [
            ("c0", "correct", "42", -1.0, 1),
            ("s7a", "wrong", "7", -1.0, 1),  # "7": best mean -1.0, appears first
            ("s9a", "wrong", "9", -0.5, 1),  # "9": best mean -0.5 → wins the tie
            ("s7b", "wrong", "7", -2.0, 1),
            ("s9b", "wrong", "9", -3.0, 1),
        ]
    )
    pair, _ = pair_question(r, 0, DIFF)
    assert pair["rejected_answer"] == "9" and pair["rejected"] == "s9a" and pair["rejected_count"] == 2


def test_count_and_logp_tie_broken_by_first_index():
    # Groups "9" (indices 1, 3) and "7" (indices 2, 4), every mean -1.0. "9" occurs first, so it
    # wins although "7" < "9" as strings; inside it the lowest index, 1, is taken.
    r = row(
        [
            ("c0", "correct", "42", -1.0, 1),
            ("s9a", "wrong", "9", -2.0, 2),
            ("s7a", "wrong", "7", -1.0, 1),
            ("s9b", "wrong", "9", -3.0, 3),
            ("s7b", "wrong", "7", -4.0, 4),
        ]
    )
    pair, _ = pair_question(r, 0, DIFF)
    assert pair["rejected_answer"] == "9" and pair["rejected"] == "s9a"


def test_all_wrong_falls_back_to_gold_solution():
    r = row([(f"w{i}", "wrong", str(i % 2), -1.0, 1) for i in range(4)])
    pair, skip = pair_question(r, 0, DIFF)
    assert skip is None
    assert pair["chosen"] == "6*7 = 42. Answer: 42" and pair["chosen_source"] == "gold"
    assert (pair["n_correct"], pair["n_wrong"]) == (0, 4)
    assert pair["weight"] == 2.0  # 1 + 1·4/4
    # Groups "0" (0, 2) and "1" (1, 3) tie on count and logp; "0" occurs first.
    assert pair["rejected_answer"] == "0" and pair["rejected"] == "w0"


@pytest.mark.parametrize("solution", [None, "", "   "])
def test_gold_solution_falls_back_to_gold_answer(solution):
    r = row([("w0", "wrong", "1", -1.0, 1)], gold_solution=solution, gold_answer="42")
    pair, _ = pair_question(r, 0, DIFF)
    assert pair["chosen"] == "42" and pair["chosen_source"] == "gold"


def test_all_correct_is_skipped():
    r = row([("c0", "correct", "42", -1.0, 1), ("c1", "correct", "42", -2.0, 1)], pid="easy")
    pair, skip = pair_question(r, 2, DIFF)
    assert pair is None
    assert skip["reason"] == "all_correct" and skip["prompt_id"] == "easy" and skip["round"] == 2
    assert set(skip) == set(contracts.SKIPS.names)


def test_invalid_counts_as_wrong_in_weight():
    r = row(
        [
            ("c0", "correct", "42", -1.0, 1),
            ("c1", "correct", "42", -1.0, 1),
            ("w2", "wrong", "7", -1.0, 1),
            ("i3", "invalid", None, -1.0, 1),
        ]
    )
    pair, _ = pair_question(r, 0, DIFF)
    assert (pair["n_samples"], pair["n_correct"], pair["n_wrong"]) == (4, 2, 2)
    assert pair["weight"] == pytest.approx(1 + 2 / (2.000001 * 4), rel=1e-12)  # ≈ 1.25


def test_wrong_group_beats_invalid_group_on_count_tie():
    # One wrong "7" (mean -5) vs one invalid (mean -0.1): the real wrong answer wins despite logp.
    r = row([("c0", "correct", "42", -1.0, 1), ("i1", "invalid", None, -0.1, 1), ("w2", "wrong", "7", -5.0, 1)])
    pair, _ = pair_question(r, 0, DIFF)
    assert pair["rejected"] == "w2" and pair["rejected_answer"] == "7" and pair["rejected_count"] == 1


def test_larger_invalid_group_beats_wrong_group():
    r = row(
        [
            ("c0", "correct", "42", -1.0, 1),
            ("w1", "wrong", "7", -0.1, 1),
            ("i2", "invalid", None, -3.0, 1),
            ("i3", "invalid", None, -2.0, 1),
        ]
    )
    pair, _ = pair_question(r, 0, DIFF)
    assert pair["rejected"] == "i3" and pair["rejected_answer"] is None and pair["rejected_count"] == 2


def test_only_invalid_gives_null_rejected_answer():
    r = row([("i0", "invalid", None, -2.0, 1), ("i1", "invalid", None, -1.0, 1), ("i2", "invalid", None, -1.0, 1)])
    pair, _ = pair_question(r, 0, DIFF)
    assert pair["rejected_answer"] is None and pair["rejected_count"] == 3
    assert pair["rejected"] == "i1"  # best mean -1.0, lower index than i2
    assert pair["chosen_source"] == "gold" and (pair["n_correct"], pair["n_wrong"]) == (0, 3)
    assert pair["weight"] == 2.0


def test_invalid_with_an_extracted_answer_stays_in_the_invalid_group():
    # A grader timeout can leave an extracted "7" on an invalid sample; it was never judged wrong,
    # so it does not join the wrong "7" group (which would then outnumber "9").
    r = row(
        [
            ("c0", "correct", "42", -1.0, 1),
            ("w1", "wrong", "9", -1.0, 1),
            ("i2", "invalid", "7", -0.5, 1),
            ("w3", "wrong", "7", -2.0, 1),
        ]
    )
    pair, _ = pair_question(r, 0, DIFF)
    assert pair["rejected_answer"] == "9" and pair["rejected"] == "w1" and pair["rejected_count"] == 1
    assert pair["n_wrong"] == 3


def test_wrong_without_extracted_answer_joins_the_no_answer_group():
    r = row(
        [
            ("c0", "correct", "42", -1.0, 1),
            ("w1", "wrong", None, -1.0, 1),
            ("i2", "invalid", None, -2.0, 1),
            ("w3", "wrong", "5", -0.1, 1),
        ]
    )
    pair, _ = pair_question(r, 0, DIFF)
    assert pair["rejected_answer"] is None and pair["rejected_count"] == 2 and pair["rejected"] == "w1"


@pytest.mark.parametrize("answer, solution", [(None, None), ("", ""), ("  ", None)])
def test_no_gold_and_none_correct_is_skipped(answer, solution):
    r = row([("w0", "wrong", "1", -1.0, 1)], gold_answer=answer, gold_solution=solution)
    pair, skip = pair_question(r, 0, DIFF)
    assert pair is None and skip["reason"] == "no_gold_and_none_correct"


def test_no_gold_is_fine_when_a_sample_is_correct():
    r = row([("c0", "correct", "42", -1.0, 1), ("w1", "wrong", "1", -1.0, 1)], gold_answer=None, gold_solution=None)
    pair, skip = pair_question(r, 0, DIFF)
    assert skip is None and pair["chosen"] == "c0"


@pytest.mark.parametrize("prompt", ["", "   \n\t", None])
def test_empty_prompt_is_skipped(prompt):
    r = row([("w0", "wrong", "1", -1.0, 1)], prompt=prompt)
    pair, skip = pair_question(r, 0, DIFF)
    assert pair is None and skip["reason"] == "empty_prompt"


def test_no_samples_is_skipped():
    pair, skip = pair_question(row([]), 0, DIFF)
    assert pair is None and skip["reason"] == "no_samples"
    r = row([])
    for c in ("responses", "verdicts", "extracted", "response_logps", "response_lengths"):
        r[c] = None
    pair, skip = pair_question(r, 0, DIFF)
    assert pair is None and skip["reason"] == "no_samples"


@pytest.mark.parametrize("column", ["verdicts", "extracted", "response_logps", "response_lengths"])
def test_mismatched_lengths_raise(column):
    r = row([("c0", "correct", "42", -1.0, 1), ("w1", "wrong", "1", -1.0, 1)], pid="broken-7")
    r[column] = r[column][:1]
    with pytest.raises(ValueError, match="broken-7") as e:
        pair_question(r, 0, DIFF)
    assert column in str(e.value) and "responses" in str(e.value)


def test_unknown_verdict_raises():
    r = row([("c0", "maybe", "42", -1.0, 1)], pid="odd")
    with pytest.raises(ValueError, match="odd"):
        pair_question(r, 0, DIFF)


def test_uniform_scheme_gives_weight_one():
    r = row([(f"w{i}", "wrong", "1", -1.0, 1) for i in range(4)])
    assert pair_question(r, 0, DIFF)[0]["weight"] == 2.0
    assert pair_question(r, 0, UNIFORM)[0]["weight"] == 1.0
    assert pair_question(r, 0, WeightingConfig(alpha=3.0))[0]["weight"] == 4.0  # 1 + 3·4/4


def test_skip_record():
    assert skip_record("p", 1, "bad_row", "missing question") == {
        "prompt_id": "p",
        "round": 1,
        "reason": "bad_row",
        "detail": "missing question",
    }
    assert skip_record("p", 1, "all_correct")["detail"] is None
    with pytest.raises(ValueError, match="reason"):
        skip_record("p", 1, "too_easy")


# ------------------------------------------------------------------------------------------ tables


def small_rows():
    return [
        row([("c", "correct", "42", -1.0, 1), ("w", "wrong", "7", -1.0, 1)], pid="q0"),
        row([("c", "correct", "42", -1.0, 1)], pid="q1"),  # all_correct
        row([("w", "wrong", "7", -1.0, 1), ("x", "invalid", None, -1.0, 1)], pid="q2"),  # gold
        row([("w", "wrong", "7", -1.0, 1)], pid="q3", prompt=" "),  # empty_prompt
        row([("c", "correct", "42", -1.0, 1)] * 3 + [("w", "wrong", "5", -1.0, 1)], pid="q4"),
        row([], pid="q5"),  # no_samples
    ]


def small_table():
    return contracts.from_rows(small_rows(), "graded")


def test_build_pairs_schemas_order_and_accounting():
    graded = small_table()
    pairs, skips = build_pairs(graded, 4, DIFF)
    assert pairs.schema.equals(contracts.PAIRS)
    assert skips.schema.equals(contracts.SKIPS)
    assert len(pairs) + len(skips) == len(graded) == 6
    assert pairs.column("prompt_id").to_pylist() == ["q0", "q2", "q4"]
    assert skips.column("prompt_id").to_pylist() == ["q1", "q3", "q5"]
    assert skips.column("reason").to_pylist() == ["all_correct", "empty_prompt", "no_samples"]
    assert pairs.column("round").to_pylist() == [4, 4, 4] and skips.column("round").to_pylist() == [4, 4, 4]
    assert pairs.column("chosen_source").to_pylist() == ["sampled", "gold", "sampled"]
    w = pairs.column("weight").to_pylist()
    assert w[0] == pytest.approx(1 + 1 / (1.000001 * 2), rel=1e-12)  # ≈ 1.5
    assert w[1] == 2.0  # invalid counts as wrong: 1 + 2/2
    assert w[2] == pytest.approx(1 + 1 / (3.000001 * 4), rel=1e-12)  # ≈ 1.0833
    # Same answers as the row-wise function (vectorised weights included).
    expected = [pair_question(r, 4, DIFF)[0] for r in small_rows()]
    assert pairs.to_pylist() == [p for p in expected if p is not None]
    contracts.validate(pairs, "pairs")
    contracts.validate(skips, "skips")


def test_build_pairs_uniform_and_chunked_input():
    graded = small_table()
    chunked = pa.concat_tables([graded.slice(0, 2), graded.slice(2)])
    assert chunked.column("prompt_id").num_chunks == 2
    pairs, skips = build_pairs(chunked, 0, UNIFORM)
    assert pairs.column("weight").to_pylist() == [1.0, 1.0, 1.0]
    assert len(pairs) + len(skips) == 6


def test_build_pairs_empty_table():
    pairs, skips = build_pairs(contracts.GRADED.empty_table(), 0, DIFF)
    assert len(pairs) == 0 and len(skips) == 0
    assert pairs.schema.equals(contracts.PAIRS) and skips.schema.equals(contracts.SKIPS)


def test_build_pairs_missing_column_names_it():
    graded = small_table().drop_columns(["verdicts"])
    with pytest.raises(contracts.ContractError, match="verdicts"):
        build_pairs(graded, 0, DIFF)


def test_combined_batch_round_trips_to_build_pairs():
    graded = small_table()
    combined = pairs_and_skips_batch(graded, 1, DIFF)
    assert combined.schema.equals(PAIRS_AND_SKIPS)
    assert len(combined) == len(graded)
    assert combined.column("kind").to_pylist() == ["pair", "skip", "pair", "skip", "pair", "skip"]
    assert combined.column("prompt_id").to_pylist() == graded.column("prompt_id").to_pylist()
    # Not-applicable columns are null: no reason on pairs, no chosen on skips.
    assert combined.column("reason").to_pylist()[0] is None
    assert combined.column("chosen").to_pylist()[1] is None
    pairs, skips = split_pairs_and_skips(combined)
    ref_pairs, ref_skips = build_pairs(graded, 1, DIFF)
    assert pairs.equals(ref_pairs) and skips.equals(ref_skips)
    assert pairs.schema.equals(contracts.PAIRS) and skips.schema.equals(contracts.SKIPS)


def test_split_of_concatenated_batches_keeps_order():
    # Ray Data hands batches one by one; the concatenation of their outputs splits like one batch.
    graded = small_table()
    parts = [pairs_and_skips_batch(graded.slice(i, 2), 1, DIFF) for i in (0, 2, 4)]
    pairs, skips = split_pairs_and_skips(pa.concat_tables(parts))
    ref_pairs, ref_skips = build_pairs(graded, 1, DIFF)
    assert pairs.equals(ref_pairs) and skips.equals(ref_skips)


def test_graded_rows_with_their_outcomes_round_trip_through_parquet(tmp_path):
    # One Ray Data execution grades and pairs a round: its rows carry both, and split back into
    # exactly what grading and build_pairs give, also after Parquet and from batches of any size.
    import pyarrow.parquet as pq

    graded = contracts.validate(small_table(), "graded")
    parts = [with_outcomes(graded.slice(i, 3), pairs_and_skips_batch(graded.slice(i, 3), 1, DIFF)) for i in (0, 3)]
    pq.write_table(pa.concat_tables(parts), tmp_path / "x.parquet")
    table = pq.read_table(tmp_path / "x.parquet")
    assert table.schema.names == GRADED_AND_OUTCOMES.names
    back, pairs, skips = split_outcomes(table)
    ref_pairs, ref_skips = build_pairs(graded, 1, DIFF)
    assert back.equals(graded.cast(contracts.GRADED)) and pairs.equals(ref_pairs) and skips.equals(ref_skips)
    assert len(pairs) == 3 and len(skips) == 3
    empty = split_outcomes(GRADED_AND_OUTCOMES.empty_table())
    assert [len(t) for t in empty] == [0, 0, 0] and empty[1].schema.equals(contracts.PAIRS)


def test_reference_log_probs_reach_exactly_their_pairs():
    # The reference model scores the pair rows only; each value comes back on its own pair.
    graded = small_table()
    joined = with_outcomes(graded, pairs_and_skips_batch(graded, 1, DIFF))
    to_score, idx = outcome_pairs(joined)
    ref_pairs, _ = build_pairs(graded, 1, DIFF)
    assert idx.tolist() == [0, 2, 4]
    assert to_score.column("prompt_id").equals(ref_pairs.column("prompt_id"))
    assert to_score.column("chosen").equals(ref_pairs.column("chosen"))
    scored = with_ref_logps(joined, idx, [-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0])
    assert scored.column("ref_chosen_logp").to_pylist() == [-1.0, None, -2.0, None, -3.0, None]
    back, pairs, skips = split_outcomes(scored)
    assert pairs.schema.equals(contracts.PAIRS_WITH_REF) and back.schema.equals(contracts.GRADED)
    assert pairs.select(contracts.PAIRS.names).equals(ref_pairs)
    assert pairs.column("ref_rejected_logp").to_pylist() == [-4.0, -5.0, -6.0]
    with pytest.raises(contracts.ContractError, match="2/3 reference log-probs for 3 pairs"):
        with_ref_logps(joined, idx, [-1.0, -2.0], [-4.0, -5.0, -6.0])


def test_outcomes_must_line_up_with_the_graded_rows():
    graded = small_table()
    outcomes = pairs_and_skips_batch(graded, 1, DIFF)
    with pytest.raises(contracts.ContractError, match="5 outcome rows for 6 graded rows"):
        with_outcomes(graded, outcomes.slice(1))
    with pytest.raises(contracts.ContractError, match="prompt_id order"):
        with_outcomes(graded, outcomes.take([1, 0, 2, 3, 4, 5]))
    joined = with_outcomes(graded, outcomes)
    no_outcome = joined.set_column(joined.schema.get_field_index("outcome"), GRADED_AND_OUTCOMES.field("outcome"),
                                   pa.nulls(len(joined), GRADED_AND_OUTCOMES.field("outcome").type))
    with pytest.raises(contracts.ContractError, match="'outcome' has null values"):
        split_outcomes(no_outcome)


def test_split_rejects_unknown_kind():
    combined = pairs_and_skips_batch(small_table(), 0, DIFF)
    bad = combined.set_column(0, "kind", pa.array(["pair", "skip", "other", "skip", "pair", "skip"]))
    with pytest.raises(contracts.ContractError, match="other"):
        split_pairs_and_skips(bad)


def test_determinism():
    graded = small_table()
    a_pairs, a_skips = build_pairs(graded, 0, DIFF)
    b_pairs, b_skips = build_pairs(small_table(), 0, DIFF)
    assert a_pairs.equals(b_pairs) and a_skips.equals(b_skips)
    assert pairs_and_skips_batch(graded, 0, DIFF).equals(pairs_and_skips_batch(small_table(), 0, DIFF))


def test_accounting_refuses_a_lost_or_duplicated_prompt():
    from wpo_ray.contracts import AccountingError, check_accounting

    check_accounting(1, 10, 7, 3)  # every prompt became one pair or one skip
    with pytest.raises(AccountingError, match="round 2: 10 prompts in but 6 pairs \\+ 3 skips out"):
        check_accounting(2, 10, 6, 3)  # one lost
    with pytest.raises(AccountingError, match="11 prompts in but 9 pairs \\+ 3 skips"):
        check_accounting(1, 11, 9, 3)  # one duplicated


def test_a_pair_too_long_to_train_becomes_a_too_long_skip_and_every_row_is_accounted_for():
    right, wrong = ("42", "correct", "42", -1.0, 2), ("41", "wrong", "41", -1.0, 2)
    long_wrong = ("4" * 30, "wrong", "4" * 30, -2.0, 30)
    graded = contracts.from_rows([row([right, wrong], pid="short"), row([right, long_wrong], pid="long")], "graded")
    too_long = lambda p, c, r: f"{len(p) + max(len(c), len(r))} > 20" if len(p) + max(len(c), len(r)) > 20 else None  # noqa: E731
    pairs, skips = build_pairs(graded, 1, DIFF, too_long)
    assert pairs.column("prompt_id").to_pylist() == ["short"]
    assert skips.to_pylist() == [{"prompt_id": "long", "round": 1, "reason": "too_long", "detail": "42 > 20"}]
    both = split_pairs_and_skips(pairs_and_skips_batch(graded, 1, DIFF, too_long))
    assert both[0].equals(pairs) and both[1].equals(skips)
    # The surviving pair's weight is what it is without the check.
    assert pairs.column("weight").to_pylist() == build_pairs(graded, 1, DIFF)[0].column("weight").to_pylist()[:1]


# ------------------------------------------------------------------------------ where chosen comes from


def _graded_row(verdicts, gold_solution="3+4|7", gold_answer="7"):
    n = len(verdicts)
    return {
        "prompt_id": "q", "round": 1, "prompt": "3+4=", "gold_answer": gold_answer, "gold_solution": gold_solution,
        "responses": [f"r{i}" for i in range(n)], "response_logps": [-1.0 - i for i in range(n)],
        "response_lengths": [2] * n, "verdicts": verdicts, "extracted": ["7" if v == "correct" else "8" for v in verdicts],
    }


@pytest.mark.parametrize("mode, verdicts, expect", [
    # Ma et al.: a correct sample when there is one, else the gold solution.
    ("sampled_or_gold", ["wrong", "correct", "wrong"], ("r1", "sampled")),
    ("sampled_or_gold", ["wrong", "wrong"], ("3+4|7", "gold")),
    # SFT on gold: gold even when the policy got it right.
    ("gold", ["wrong", "correct", "wrong"], ("3+4|7", "gold")),
    ("gold", ["wrong", "wrong"], ("3+4|7", "gold")),
    # RFT: only the policy's own correct samples; none is a skip, never gold.
    ("sampled", ["wrong", "correct", "wrong"], ("r1", "sampled")),
    ("sampled", ["wrong", "wrong"], ("skip", "none_correct")),
    # Every mode needs a wrong sample: the same questions are paired whatever the chosen side.
    ("gold", ["correct", "correct"], ("skip", "all_correct")),
    ("sampled", ["correct", "correct"], ("skip", "all_correct")),
])
def test_chosen_mode(mode, verdicts, expect):
    pair, skip = pair_question(_graded_row(verdicts), 1, WeightingConfig(chosen=mode))
    if expect[0] == "skip":
        assert pair is None and skip["reason"] == expect[1]
    else:
        assert skip is None and (pair["chosen"], pair["chosen_source"]) == expect
        assert pair["rejected"] in ("r0", "r2", "r1")  # a wrong sample, whatever the chosen side
        assert pair["rejected_answer"] == "8"


def test_chosen_gold_without_a_gold_is_a_skip_naming_the_mode():
    pair, skip = pair_question(_graded_row(["correct", "wrong"], gold_solution=None, gold_answer=None), 1,
                               WeightingConfig(chosen="gold"))
    assert pair is None and skip["reason"] == "no_gold" and "weighting.chosen=gold" in skip["detail"]
