"""Policy weights as they travel between processes in memory (trainer rank 0 → Ray's object store →
sampler engines): each tensor as a flat byte array with its dtype and shape.

Ray stores NumPy arrays out of band and hands them back as views of the shared object store,
with no copy and no unpickling of tensor data; torch tensors would be pickled and copied on
every read. Bytes rather than NumPy dtypes, because NumPy has no bfloat16.
"""

from __future__ import annotations

import numpy as np
import torch


def pack_state(state: dict[str, torch.Tensor]) -> dict[str, tuple[np.ndarray, str, tuple[int, ...]]]:
    """{name: (uint8 array of the tensor's bytes, dtype name, shape)}, on the host."""
    packed = {}
    for name, t in state.items():
        t = t.detach().contiguous().cpu()
        packed[name] = (t.reshape(-1).view(torch.uint8).numpy(), str(t.dtype).removeprefix("torch."), tuple(t.shape))
    return packed


def unpack_state(packed: dict) -> dict[str, torch.Tensor]:
    """The tensors back, as views of the arrays (read-only when they come from the object store:
    the engine's loader only copies from them)."""
    import warnings

    state = {}
    with warnings.catch_warnings():  # torch warns once that an object-store array is not writable
        warnings.simplefilter("ignore", UserWarning)
        for name, (data, dtype, shape) in packed.items():
            state[name] = torch.from_numpy(data).view(getattr(torch, dtype)).reshape(shape)
    return state
