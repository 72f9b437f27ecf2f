"""Weights packed for the in-memory hand-over come back bit-identical, in every dtype the
trainers use, including from a read-only buffer (what Ray's object store returns)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wpo_ray.weights import pack_state, unpack_state


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
