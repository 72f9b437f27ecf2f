"""TRL's four preference layouts become explicit prompt/chosen/rejected strings."""

from __future__ import annotations

import string

import pytest

from wpo_ray.trl_format import TRLFormatError, layout_of, split_common_prefix, to_explicit_strings

TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    from wpo_ray.tiny_model import build_char_tokenizer

    tok = build_char_tokenizer(string.ascii_letters + string.digits + string.punctuation + " \n")
    tok.chat_template = TEMPLATE
    return tok


def test_layouts_are_told_apart():
    assert layout_of({"prompt": "q", "chosen": "a", "rejected": "b"}) == "standard explicit"
    assert layout_of({"chosen": "qa", "rejected": "qb"}) == "standard implicit"
    assert layout_of({"prompt": [{"role": "user", "content": "q"}], "chosen": [], "rejected": []}) == \
        "conversational explicit"
    assert layout_of({"chosen": [{"role": "user", "content": "q"}], "rejected": []}) == "conversational implicit"


def test_standard_implicit_prompt_is_the_common_prefix_and_extras_are_kept():
    rows = to_explicit_strings([{"chosen": "2+2= 4", "rejected": "2+2= 5", "weight": 1.5}])
    assert rows == [{"chosen": " 4", "rejected": " 5", "prompt": "2+2=", "weight": 1.5}]
    assert split_common_prefix("37*48=1776", "37*48=1766") == ("37*48=17", "76", "66")


def test_conversational_explicit_and_implicit_render_with_the_chat_template(tokenizer):
    user = [{"role": "user", "content": "2+2?"}]
    good, bad = [{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "5"}]
    explicit = to_explicit_strings([{"prompt": user, "chosen": good, "rejected": bad}], tokenizer)
    implicit = to_explicit_strings([{"chosen": user + good, "rejected": user + bad}], tokenizer)
    want = {"prompt": "[user] 2+2?\n[assistant] ", "chosen": "4\n", "rejected": "5\n"}
    assert [{k: r[k] for k in want} for r in explicit] == [want]
    assert [{k: r[k] for k in want} for r in implicit] == [want]


@pytest.mark.parametrize("rows, message", [
    ([{"chosen": "abc", "rejected": "xyz"}], "row 1: no prompt given and chosen and rejected share no prefix"),
    ([{"chosen": "q a", "rejected": "q a"}], "row 1: chosen and rejected are the same after their common prompt"),
    ([{"prompt": "q", "chosen": "a", "rejected": "b"}, {"chosen": "qa", "rejected": "qb"}],
     "row 2: layout 'standard implicit', but row 1 is 'standard explicit'"),
    ([{"prompt": "q", "chosen": "a", "rejected": 3}], "row 1: prompt, chosen and rejected must be strings"),
])
def test_bad_rows_are_refused_naming_the_source_and_row(rows, message):
    with pytest.raises(TRLFormatError, match=f"^prefs.jsonl: {message}"):
        to_explicit_strings(rows, source="prefs.jsonl")


def test_conversations_need_a_chat_template_and_well_formed_messages(tokenizer):
    from wpo_ray.tiny_model import build_char_tokenizer

    conv = [{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
             "rejected": [{"role": "assistant", "content": "b"}]}]
    with pytest.raises(TRLFormatError, match="needs the policy's chat template"):
        to_explicit_strings(conv, build_char_tokenizer("abcq"), source="prefs.jsonl")
    broken = [{**conv[0], "chosen": [{"text": "a"}]}]
    with pytest.raises(TRLFormatError, match="row 1 'chosen': expected a list of messages"):
        to_explicit_strings(broken, tokenizer, source="prefs.jsonl")
