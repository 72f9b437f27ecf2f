"""Policy weights as they travel between processes in memory (trainer rank 0 → Ray's object store →
sampler engines): each tensor as a flat byte array with its dtype and shape.

Ray stores NumPy arrays out of band and hands them back as views of the shared object store,
with no copy and no unpickling of tensor data; torch tensors would be pickled and copied on
every read. Bytes rather than NumPy dtypes, because NumPy has no bfloat16.

`checkpoint_tensors` checks the weights against the checkpoint they stand for before an engine
loads them.
"""

from __future__ import annotations

from pathlib import Path

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


def checkpoint_tensors(state: dict, path: str) -> dict:
    """The tensors of `state` that the checkpoint at `path` holds, checked against its safetensors
    headers (names and shapes; no tensor data is read): exactly what a load from the checkpoint
    would give the engine (a tied lm_head, which HF does not save, is left out). A tensor missing
    or of another shape raises before anything reaches the engine: a load refused halfway can
    leave vLLM's in-place reload unusable."""
    from safetensors import safe_open

    shapes = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            shapes.update({k: list(st.get_slice(k).get_shape()) for k in st.keys()})
    if not shapes:
        raise ValueError(f"{path}: no safetensors to check the handed-over weights against")
    wrong = [k for k in shapes if k not in state or list(state[k].shape) != shapes[k]]
    if wrong:
        k = wrong[0]
        got = "missing" if k not in state else f"shape {list(state[k].shape)}"
        raise ValueError(f"{len(wrong)} tensor(s) differ from {path}, e.g. {k}: {got}, the checkpoint has {shapes[k]}")
    return {k: state[k] for k in shapes}


def load_into(model, state: dict) -> None:
    """Copy `state` (what `checkpoint_tensors` returns) into a transformers model of the same
    architecture, in place: a tied lm_head, which the checkpoint leaves out, is tied again; a name
    the model does not have raises. load_state_dict casts to the model's dtype and device."""
    unexpected = model.load_state_dict(state, strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"weights the model does not have: {unexpected[:3]}")
    model.tie_weights()
