"""Tokenising and collating preference pairs, and summed response log-probs.

Chosen and rejected go through the model in one forward pass ([chosen; rejected] stacked on the
batch axis), padded only to the longest sequence of the batch. Prompt tokens are masked out: only
response tokens (EOS included) count in the log-probs and lengths.
"""

from __future__ import annotations

from typing import Sequence

import torch


class PairEncodingError(ValueError):
    pass


def encode_response(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def encode_pairs(tokenizer, prompts: Sequence[str], chosen: Sequence[str], rejected: Sequence[str],
                 max_length: int, prompt_ids: Sequence[str] | None = None) -> dict[str, list[list[int]]]:
    """Token ids of prompts (with the tokenizer's special tokens) and responses (+ EOS).

    A pair longer than `max_length` (prompt + its longer response) is an error naming the pair:
    nothing is truncated, since a cut prompt or response changes what is preferred. A round's
    pairs are filtered beforehand (:class:`LengthCheck`: skip reason `too_long`).
    """
    p_ids = [tokenizer(p)["input_ids"] for p in prompts]
    c_ids = [encode_response(tokenizer, c) for c in chosen]
    r_ids = [encode_response(tokenizer, r) for r in rejected]
    for i, (p, c, r) in enumerate(zip(p_ids, c_ids, r_ids)):
        total = len(p) + max(len(c), len(r))
        if total > max_length:
            who = prompt_ids[i] if prompt_ids is not None else f"#{i}"
            raise PairEncodingError(
                f"pair {who}: {total} tokens (prompt {len(p)} + response {max(len(c), len(r))}) do not fit "
                f"train.max_length={max_length}"
            )
    return {"prompt": p_ids, "chosen": c_ids, "rejected": r_ids}


def pair_length(tokenizer, prompt: str, chosen: str, rejected: str) -> int:
    """Tokens of the longer of the pair's two sequences, as `encode_pairs` builds them."""
    return len(tokenizer(prompt)["input_ids"]) + max(len(encode_response(tokenizer, c)) for c in (chosen, rejected))


class LengthCheck:
    """`too_long(prompt, chosen, rejected)` for the pairing stage: None when the pair fits
    `max_length` with the policy's tokenizer, else why not. Picklable for Ray Data: the
    tokenizer is loaded on first use in the process that runs it."""

    def __init__(self, tokenizer_path: str, max_length: int, trust_remote_code: bool = False):
        self.tokenizer_path, self.max_length, self.trust_remote_code = tokenizer_path, max_length, trust_remote_code
        self._tok = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tok": None}

    def key(self) -> tuple:
        """Two checks with the same key give the same answers (a holder keeps the loaded one)."""
        return self.tokenizer_path, self.max_length, self.trust_remote_code

    def __call__(self, prompt: str, chosen: str, rejected: str):
        if self._tok is None:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(self.tokenizer_path, trust_remote_code=self.trust_remote_code)
        n = pair_length(self._tok, prompt, chosen, rejected)
        return None if n <= self.max_length else f"{n} tokens > train.max_length={self.max_length}"


def collate(enc: dict[str, list[list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded [2B, L] input_ids / attention_mask / response_mask: chosen rows then rejected."""
    seqs, resp_start = [], []
    for key in ("chosen", "rejected"):
        for p, r in zip(enc["prompt"], enc[key]):
            seqs.append(p + r)
            resp_start.append(len(p))
    width = max(len(s) for s in seqs)
    n = len(seqs)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    response = torch.zeros((n, width), dtype=torch.bool)
    for i, (s, start) in enumerate(zip(seqs, resp_start)):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention[i, : len(s)] = 1
        response[i, start : len(s)] = True
    return {"input_ids": input_ids, "attention_mask": attention, "response_mask": response}


def sequence_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of response tokens and response lengths, per row of the batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # log-softmax in half precision loses too much
    targets = batch["input_ids"][:, 1:]
    mask = batch["response_mask"][:, 1:]
    # gather − logsumexp: the log-softmax of the target without materialising the full log-softmax.
    token_logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
    token_logp = token_logp.masked_fill(~mask, 0.0)
    return token_logp.sum(-1), mask.sum(-1)


def split_pair_logps(logps: torch.Tensor, lengths: torch.Tensor):
    """(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths) from a collated batch."""
    b = logps.shape[0] // 2
    return logps[:b], logps[b:], lengths[:b], lengths[b:]
