"""The Arrow data contracts: schemas as docs/DESIGN.md lists them, and validation errors that name the column."""

import pyarrow as pa
import pytest

from wpo_ray import contracts
from wpo_ray.contracts import ContractError, validate

DESIGN_COLUMNS = {
    "samples": ["prompt_id", "round", "prompt", "gold_answer", "responses", "response_logps", "response_lengths"],
    "graded": ["verdicts", "extracted"],
    "pairs": ["prompt_id", "round", "prompt", "chosen", "rejected", "weight", "n_samples", "n_correct", "n_wrong",
              "chosen_source", "rejected_answer", "rejected_count"],
    "skips": ["prompt_id", "round", "reason"],
}


@pytest.mark.parametrize("stage", DESIGN_COLUMNS)
def test_schemas_have_the_design_columns(stage):
    names = contracts.SCHEMAS[stage].names
    assert all(c in names for c in DESIGN_COLUMNS[stage]), set(DESIGN_COLUMNS[stage]) - set(names)


def test_graded_extends_samples():
    assert contracts.GRADED.names[: len(contracts.SAMPLES.names)] == contracts.SAMPLES.names


def _pair_row(**kw):
    row = dict(prompt_id="p1", round=1, prompt="1+1=", chosen="2", rejected="3", weight=1.5, n_samples=4,
               n_correct=1, n_wrong=3, chosen_source="sampled", rejected_answer="3", rejected_count=2)
    row.update(kw)
    return row


def test_valid_table_is_cast_to_contract_types():
    # int64 round and large_string prompt are accepted and cast to the contract's int32 / string.
    t = pa.table({k: [v] for k, v in _pair_row().items()})
    t = t.set_column(t.schema.get_field_index("prompt"), "prompt", pa.array(["1+1="], pa.large_string()))
    out = validate(t, "pairs", source="x.parquet")
    assert out.schema.field("round").type == pa.int32()
    assert out.schema.field("prompt").type == pa.string()
    assert out.column("weight").to_pylist() == [1.5]


def test_missing_column_is_named_with_source():
    t = pa.table({k: [v] for k, v in _pair_row().items() if k != "weight"})
    with pytest.raises(ContractError, match=r"x\.parquet: missing column 'weight' \(expected double\)"):
        validate(t, "pairs", source="x.parquet")


def test_mistyped_column_is_named():
    t = pa.table({k: [v] for k, v in _pair_row(weight="heavy").items()})
    with pytest.raises(ContractError, match=r"column 'weight' has type string, expected double"):
        validate(t, "pairs", source="p")


def test_nulls_in_required_column_are_refused():
    t = pa.Table.from_pylist([_pair_row(chosen=None)])
    with pytest.raises(ContractError, match=r"column 'chosen' has 1 null"):
        validate(t, "pairs")


def test_enum_values_are_checked():
    with pytest.raises(ContractError, match=r"column 'chosen_source' has values \['model'\]"):
        validate(pa.Table.from_pylist([_pair_row(chosen_source="model")]), "pairs")
    skips = contracts.from_rows([{"prompt_id": "a", "round": 1, "reason": "too_hard"}], "skips")
    with pytest.raises(ContractError, match="too_hard"):
        validate(skips, "skips")


def test_list_enum_values_are_checked():
    row = dict(prompt_id="a", round=1, prompt="q", gold_answer="1", gold_solution=None, responses=["1"],
               response_logps=[-1.0], response_lengths=[2], verdicts=["maybe"], extracted=["1"], grade_notes=[None])
    with pytest.raises(ContractError, match=r"'verdicts' has values \['maybe'\]"):
        validate(pa.Table.from_pylist([row]), "graded")
    row["verdicts"] = ["correct"]
    assert validate(pa.Table.from_pylist([row]), "graded").num_rows == 1


def test_ref_columns_are_optional_but_typed():
    t = pa.Table.from_pylist([_pair_row()])
    assert "ref_chosen_logp" not in validate(t, "pairs").column_names
    t2 = t.append_column("ref_chosen_logp", pa.array(["x"])).append_column("ref_rejected_logp", pa.array([0.1]))
    with pytest.raises(ContractError, match="ref_chosen_logp"):
        validate(t2, "pairs")


def test_trl_format_needs_only_prompt_chosen_rejected_and_keeps_extras():
    t = pa.table({"prompt": ["q"], "chosen": ["a"], "rejected": ["b"], "score": [3]})
    out = validate(t, "trl")
    assert out.column_names == ["prompt", "chosen", "rejected", "score"]
    with pytest.raises(ContractError, match="missing column 'rejected'"):
        validate(pa.table({"prompt": ["q"], "chosen": ["a"]}), "trl", source="prefs.jsonl")


def test_check_trainable_refuses_non_finite_or_negative_values_naming_the_pair():
    import math

    from wpo_ray.contracts import untrainable_error, untrainable_rows

    def check_trainable(batch, source="pairs"):  # as the training stage uses the two
        bad = untrainable_rows(batch)
        if bad.num_rows:
            raise untrainable_error(bad.slice(0, 1).to_pylist()[0], bad.num_rows, source)
        return batch

    def batch(**cols):
        base = {"prompt_id": ["a", "b", "c"], "weight": [1.0, 0.5, 2.0],
                "ref_chosen_logp": [-1.0, -2.0, -3.0], "ref_rejected_logp": [-1.5, -2.5, -3.5]}
        base.update(cols)
        return pa.table(base)

    ok = batch()
    assert check_trainable(ok) is ok
    cases = [
        (dict(weight=[1.0, math.nan, 2.0]), "pair 'b' has weight = nan"),
        (dict(weight=[1.0, 1.0, -0.5]), "pair 'c' has weight = -0.5, expected a finite number >= 0"),
        (dict(weight=[math.inf, 1.0, math.inf]), r"pair 'a' has weight = inf.*\(2 such value"),
        (dict(ref_chosen_logp=[-1.0, -math.inf, -3.0]), "pair 'b' has ref_chosen_logp = -inf"),
        (dict(ref_rejected_logp=[None, -1.0, -1.0]), "pair 'a' has ref_rejected_logp = None"),
    ]
    for cols, message in cases:
        with pytest.raises(ContractError, match=message):
            check_trainable(batch(**cols), source="round-001/pairs")
    # Without reference columns (reference on the workers, or reference-free losses) only weights are checked.
    assert check_trainable(pa.table({"prompt_id": ["a"], "weight": [0.0]})).num_rows == 1
