"""Evaluation metrics as pure functions: majority vote and per-bucket accuracy."""

from wpo_ray.evaluation import accuracy_by_bucket, majority_answer
from wpo_ray.generation import prompt_seed


def test_majority_vote_ignores_missing_answers_and_breaks_ties_by_first_seen():
    assert majority_answer(["3", None, "4", "4", None, None]) == "4"
    assert majority_answer(["7", "5", "5", "7"]) == "7"  # tie: the answer seen first
    assert majority_answer([None, None]) is None


def test_accuracy_by_bucket():
    acc = accuracy_by_bucket([True, False, True, True], ["easy", "hard", "easy", None])
    assert acc == {"all": 1.0, "easy": 1.0, "hard": 0.0}


def test_prompt_seeds_depend_on_run_seed_round_and_prompt():
    s = prompt_seed(0, 1, "p1")
    assert s == prompt_seed(0, 1, "p1")
    assert len({s, prompt_seed(1, 1, "p1"), prompt_seed(0, 2, "p1"), prompt_seed(0, 1, "p2")}) == 4
    assert 0 <= s < 2**30  # room for vLLM's seed + sample index
