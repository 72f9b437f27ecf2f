"""TRL's four preference layouts, turned into the one this project trains on.

TRL writes preference data as

- **standard, explicit prompt**: ``prompt``, ``chosen``, ``rejected`` strings (what we train on);
- **standard, implicit prompt**: ``chosen`` and ``rejected`` full texts that start with the same
  prompt; the prompt is their common prefix;
- **conversational, explicit prompt**: ``prompt`` a list of messages (``{"role", "content"}``),
  ``chosen`` and ``rejected`` lists of the assistant's messages;
- **conversational, implicit prompt**: ``chosen`` and ``rejected`` whole conversations; the prompt is
  their common leading messages.

Conversations are rendered with the policy's chat template: the prompt with the generation
prompt appended, each completion as what the template adds after it. Other columns (``weight``,
``prompt_id``, ...) are kept. Every error names the source and the row.
"""

from __future__ import annotations

from typing import Any, Optional

LAYOUTS = ("standard explicit", "standard implicit", "conversational explicit", "conversational implicit")


class TRLFormatError(ValueError):
    pass


def layout_of(row: dict) -> str:
    conversational = isinstance(row.get("chosen"), list)
    explicit = row.get("prompt") is not None
    return f"{'conversational' if conversational else 'standard'} {'explicit' if explicit else 'implicit'}"


def split_common_prefix(chosen, rejected):
    """(prompt, chosen rest, rejected rest) where prompt is the longest common prefix (characters of a
    string, messages of a conversation). A text prefix that ends in a space gives the space to the
    completions, as TRL does."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if isinstance(chosen, str) and n and chosen[n - 1] == " ":
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def _messages(x: Any, where: str) -> list[dict]:
    if not isinstance(x, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in x):
        raise TRLFormatError(f"{where}: expected a list of messages with 'role' and 'content'")
    return x


def _render(prompt: list[dict], completion: list[dict], tokenizer, where: str) -> tuple[str, str]:
    head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    if not full.startswith(head):
        raise TRLFormatError(f"{where}: the chat template renders the conversation without its prompt as a "
                             "prefix; cannot split it into prompt and completion")
    return head, full[len(head):]


def to_explicit_strings(rows: list[dict], tokenizer=None, source: str = "pairs") -> list[dict]:
    """`rows` of any TRL layout (one layout per source) as standard explicit-prompt rows."""
    if not rows:
        return rows
    layout = layout_of(rows[0])
    if layout.startswith("conversational") and (tokenizer is None or not getattr(tokenizer, "chat_template", None)):
        raise TRLFormatError(f"{source}: conversational preference data needs the policy's chat template, and "
                             "the policy's tokenizer has none")
    out = []
    for i, row in enumerate(rows, 1):
        where = f"{source}: row {i}"
        if layout_of(row) != layout:
            raise TRLFormatError(f"{where}: layout {layout_of(row)!r}, but row 1 is {layout!r}; one layout per dataset")
        if "chosen" not in row or "rejected" not in row or row["chosen"] is None or row["rejected"] is None:
            raise TRLFormatError(f"{where}: missing 'chosen' or 'rejected'")
        chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
        if layout.endswith("implicit"):
            prompt, chosen, rejected = split_common_prefix(chosen, rejected)
            if not prompt:
                raise TRLFormatError(f"{where}: no prompt given and chosen and rejected share no prefix to take as one")
            if not chosen or not rejected:
                raise TRLFormatError(f"{where}: chosen and rejected are the same after their common prompt")
        if layout.startswith("conversational"):
            prompt = _messages(prompt, f"{where} 'prompt'")
            p_text, chosen = _render(prompt, _messages(chosen, f"{where} 'chosen'"), tokenizer, where)
            _, rejected = _render(prompt, _messages(rejected, f"{where} 'rejected'"), tokenizer, where)
            prompt = p_text
        elif not all(isinstance(x, str) for x in (prompt, chosen, rejected)):
            raise TRLFormatError(f"{where}: prompt, chosen and rejected must be strings in the standard layout")
        out.append({**row, "prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


def needs_conversion(first_row: Optional[dict]) -> bool:
    return first_row is not None and layout_of(first_row) != "standard explicit"
