"""Tokenising/collating pairs and summed log-probs on a real (random, tiny) Llama; no Ray needed."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest
import torch

from wpo_ray.batching import PairEncodingError, collate, encode_pairs, sequence_logps, split_pair_logps
from wpo_ray.config import LossConfig, TinyModelConfig
from wpo_ray.losses import preference_loss
from wpo_ray.tiny_model import build_char_tokenizer, build_tiny_model

ALPHABET = "0123456789+-*="


@pytest.fixture(scope="module")
def tok_model():
    tok = build_char_tokenizer(ALPHABET)
    model = build_tiny_model(TinyModelConfig(), tok, seed=3).double()
    model.eval()
    return tok, model


def _manual_logp(model, tok, prompt, response):
    """Token-by-token log-prob of the response (+EOS) after the prompt, one sequence, no padding."""
    p = tok(prompt)["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([p + r])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return sum(logp[len(p) - 1 + i, t].item() for i, t in enumerate(r)), len(r)


def test_tokenizer_is_character_level_and_round_trips():
    tok = build_char_tokenizer(ALPHABET)
    ids = tok("12+3=")["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 6
    assert tok.decode(ids, skip_special_tokens=True) == "12+3="


def test_collate_masks_prompt_and_pads_right(tok_model):
    tok, _ = tok_model
    enc = encode_pairs(tok, ["1+1=", "12*3="], ["2", "36"], ["3", "-4"], 64)
    b = collate(enc, tok.pad_token_id)
    assert b["input_ids"].shape == (4, 1 + 5 + 3)  # BOS + "12*3=" + "36"+EOS is the longest
    # Row 0: BOS 1 + 1 = | 2 EOS | pad...
    assert b["response_mask"][0].tolist() == [False] * 5 + [True, True] + [False] * 2
    assert b["attention_mask"][0].sum() == 7 and b["attention_mask"][1].sum() == 9
    # Rejected rows follow chosen rows.
    assert tok.decode(b["input_ids"][3][b["response_mask"][3]].tolist(), skip_special_tokens=True) == "-4"


def test_sequence_logps_match_token_by_token_sum(tok_model):
    tok, model = tok_model
    prompts, chosen, rejected = ["1+1=", "12*3=", "7-9="], ["2", "36", "-2"], ["3", "306", "2"]
    enc = encode_pairs(tok, prompts, chosen, rejected, 64)
    with torch.no_grad():
        logps, lengths = sequence_logps(model, collate(enc, tok.pad_token_id))
    pc, pr, lc, lr = split_pair_logps(logps, lengths)
    for i in range(3):
        want_c, n_c = _manual_logp(model, tok, prompts[i], chosen[i])
        want_r, n_r = _manual_logp(model, tok, prompts[i], rejected[i])
        assert pc[i].item() == pytest.approx(want_c, abs=1e-9) and lc[i].item() == n_c
        assert pr[i].item() == pytest.approx(want_r, abs=1e-9) and lr[i].item() == n_r


def test_a_pair_longer_than_max_length_is_refused_with_its_id_never_truncated(tok_model):
    tok, _ = tok_model
    # <s>1+1= is 5 tokens, 1234567890</s> 11: 16 > 8.
    with pytest.raises(PairEncodingError, match=r"pair q7: 16 tokens \(prompt 5 \+ response 11\) do not fit "
                                                r"train.max_length=8"):
        encode_pairs(tok, ["1+1="], ["2"], ["1234567890"], 8, prompt_ids=["q7"])
    with pytest.raises(PairEncodingError, match="pair #0: 13 tokens"):  # a long prompt is not cut either
        encode_pairs(tok, ["1234567+1="], ["2"], ["3"], 6)
    enc = encode_pairs(tok, ["1+1="], ["2"], ["3"], 7)  # exactly fits: <s>1+1= 2</s>
    assert len(enc["prompt"][0]) + len(enc["chosen"][0]) == 7


def test_length_check_names_why_a_pair_does_not_fit_and_survives_pickling(tok_model, tmp_path):
    import pickle

    from wpo_ray.batching import LengthCheck, pair_length

    tok, _ = tok_model
    tok.save_pretrained(tmp_path / "tok")
    check = LengthCheck(str(tmp_path / "tok"), 7)
    assert pair_length(tok, "1+1=", "2", "33") == 8
    assert check("1+1=", "2", "3") is None and check("1+1=", "2", "33") == "8 tokens > train.max_length=7"
    again = pickle.loads(pickle.dumps(check))  # as Ray Data ships it to a worker: no tokenizer inside
    assert again._tok is None and again("1+1=", "2", "33") == "8 tokens > train.max_length=7"


def test_precomputed_reference_logps_equal_worker_computation(tok_model, tmp_path):
    """RefLogpActor (batched, padded) vs one-pair-at-a-time: equal within 1e-5 (float32 model)."""
    from actors.ref_logp import RefLogpActor
    from wpo_ray.tiny_model import save_policy

    tok, model = tok_model
    save_policy(model.float(), tok, tmp_path / "m")
    model.double()
    prompts = ["1+1=", "12*3=", "7-9=", "45+45=", "3*3*3="]
    table = pa.table({"prompt_id": [f"p{i}" for i in range(5)], "prompt": prompts,
                      "chosen": ["2", "36", "-2", "90", "27"], "rejected": ["3", "306", "2", "9", "9"]})
    out = RefLogpActor(str(tmp_path / "m"), micro_batch_size=4)(table)
    for i, row in enumerate(out.to_pylist()):
        want_c, _ = _manual_logp(model, tok, row["prompt"], row["chosen"])
        want_r, _ = _manual_logp(model, tok, row["prompt"], row["rejected"])
        assert row["ref_chosen_logp"] == pytest.approx(want_c, abs=1e-5)
        assert row["ref_rejected_logp"] == pytest.approx(want_r, abs=1e-5)


def test_a_kept_reference_actor_takes_the_reference_each_call_names(tok_model, tmp_path):
    """The run's RefLogp actor, asked for another reference (run.reference=previous, or after Ray
    restarted it with its first model), gives that model's log-probs, not the one it held."""
    from actors.ref_logp import RefLogpActor
    from wpo_ray.tiny_model import save_policy

    import copy

    tok, shared = tok_model
    model = copy.deepcopy(shared).float()  # the module's model stays as it is
    save_policy(model, tok, tmp_path / "a")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    save_policy(model, tok, tmp_path / "b")
    table = pa.table({"prompt_id": ["p0", "p1"], "prompt": ["1+1=", "12*3="], "chosen": ["2", "36"],
                      "rejected": ["3", "306"]})
    actor = RefLogpActor(str(tmp_path / "a"))
    from_a = actor.logps(table, str(tmp_path / "a")).column("ref_chosen_logp").to_pylist()
    from_b = actor.logps(table, str(tmp_path / "b")).column("ref_chosen_logp").to_pylist()
    assert actor.model_path == str(tmp_path / "b")
    assert from_b == RefLogpActor(str(tmp_path / "b"))(table).column("ref_chosen_logp").to_pylist()
    assert from_a != from_b


@pytest.mark.parametrize("placement", ["margin", "loss"])
def test_one_pairs_weight_scales_its_gradient_as_the_formula_says(tok_model, placement):
    """d loss / d θ through the real model: only the re-weighted pair's contribution changes, by
    w for loss placement and by w·σ(−wΔ)/σ(−Δ) for margin placement (DPO)."""
    tok, model = tok_model
    cfg = LossConfig(base="dpo", beta=0.5, weight_placement=placement)
    prompts, chosen, rejected = ["1+1=", "12*3="], ["2", "36"], ["3", "306"]
    enc = encode_pairs(tok, prompts, chosen, rejected, 64)
    batch = collate(enc, tok.pad_token_id)
    with torch.no_grad():
        ref, _ = sequence_logps(model, batch)
    ref = ref + torch.tensor([0.3, -0.2, 0.1, 0.4], dtype=torch.float64)  # Δ ≠ 0

    def grad_of_pair0(w0: float):
        model.zero_grad()
        logps, lengths = sequence_logps(model, batch)
        pc, pr, lc, lr = split_pair_logps(logps, lengths)
        out = preference_loss(cfg, pc, pr, ref[:2], ref[2:], lc, lr, torch.tensor([w0, 1.0], dtype=torch.float64))
        out.losses[0].backward()
        delta = cfg.beta * ((pc[0] - ref[0]) - (pr[0] - ref[2])).item()
        return torch.cat([p.grad.flatten() for p in model.parameters()]).clone(), delta

    g1, delta = grad_of_pair0(1.0)
    w = 2.5
    gw, _ = grad_of_pair0(w)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = w if placement == "loss" else w * sig(-w * delta) / sig(-delta)
    # Relative to the gradient's norm: BLAS reduction order differs between two forward passes.
    assert (gw - expected * g1).norm() <= 1e-7 * gw.norm()
    assert abs(expected - 1) > 0.1  # the check is not vacuous


def test_epoch_order_is_a_seeded_permutation_new_each_epoch_and_the_same_on_a_restart():
    import pyarrow as pa

    from actors.train_worker import epoch_batches, epoch_order

    orders = [epoch_order(40, seed=0, rank=0, epoch=e) for e in range(3)]
    assert all(sorted(o) == list(range(40)) for o in orders)
    assert orders[0] != orders[1] != orders[2] and orders[0] != list(range(40))
    assert epoch_order(40, 0, 0, 1) == orders[1]  # a restarted worker reads the same order
    assert epoch_order(40, 0, 1, 0) != orders[0] and epoch_order(40, 1, 0, 0) != orders[0]

    class Shard:  # a Ray Data shard iterator, as far as the loop reads it
        def __init__(self, table):
            self.table = table

        def iter_batches(self, batch_size, batch_format):
            return (self.table.slice(i, batch_size) for i in range(0, self.table.num_rows, batch_size))

    shard = Shard(pa.table({"prompt_id": [f"p{i}" for i in range(10)]}))
    batches = [b.column("prompt_id").to_pylist() for b in epoch_batches(shard, 4, 0, 0, 2)]
    want = [f"p{i}" for i in epoch_order(10, 0, 0, 2)]
    assert batches == [want[:4], want[4:8]]  # whole micro-batches only, in the epoch's order
