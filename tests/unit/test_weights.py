"""The in-memory weight hand-over, Ray-free: packed weights come back bit-identical in every dtype
the trainers use, including from a read-only buffer (what Ray's object store returns), and the
engine side checks them against the checkpoint before loading them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wpo_ray.weights import checkpoint_tensors, pack_state, unpack_state


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pack_then_unpack_gives_the_same_tensors(dtype):
    g = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(3, 5, generator=g).to(dtype), "b": torch.randn(7, generator=g).to(dtype),
             "t": torch.randn(4, 6, generator=g).to(dtype).t()}  # not contiguous
    packed = pack_state(state)
    for data, _, _ in packed.values():
        assert data.dtype == np.uint8
        data.setflags(write=False)  # as the object store hands it back
    out = unpack_state(packed)
    assert out.keys() == state.keys()
    for k in state:
        assert out[k].dtype == dtype and out[k].shape == state[k].shape
        assert torch.equal(out[k], state[k]), k


def test_handed_over_weights_are_checked_against_the_checkpoint_and_load_like_it(tmp_path):
    """The engine side of the hand-over without Ray: the handed-over state keeps only what the
    checkpoint's safetensors hold (names and shapes from the headers), refuses a tensor of another
    shape or a missing one, and the transformers backend then holds exactly those weights."""
    from wpo_ray.config import TinyModelConfig
    from wpo_ray.generation import HFSampler
    from wpo_ray.tiny_model import build_char_tokenizer, build_tiny_model, save_policy

    tok = build_char_tokenizer("0123456789+-*=")
    new = build_tiny_model(TinyModelConfig(), tok, seed=1)
    save_policy(new, tok, tmp_path / "new")
    save_policy(build_tiny_model(TinyModelConfig(), tok, seed=0), tok, tmp_path / "old")
    handed = unpack_state(pack_state(new.state_dict()))
    handed["extra.weight"] = torch.zeros(2)  # a name the checkpoint does not hold: not passed on
    kept = checkpoint_tensors(handed, str(tmp_path / "new"))
    assert "extra.weight" not in kept and kept.keys() == new.state_dict().keys()

    sampler = HFSampler.from_path(str(tmp_path / "old"))
    assert sampler.load_state(kept) == "in_memory"
    for k, v in new.state_dict().items():
        assert torch.equal(sampler.model.state_dict()[k], v), k

    wrong = dict(kept, **{"model.norm.weight": kept["model.norm.weight"][:-1]})
    with pytest.raises(ValueError, match=r"model\.norm\.weight: shape \[\d+\], the checkpoint has \[\d+\]"):
        checkpoint_tensors(wrong, str(tmp_path / "new"))
    missing = {k: v for k, v in kept.items() if k != "lm_head.weight"}
    with pytest.raises(ValueError, match="lm_head.weight: missing"):
        checkpoint_tensors(missing, str(tmp_path / "new"))
    with pytest.raises(ValueError, match="weights the model does not have"):
        sampler.load_state({"nope": torch.zeros(1)})
