"""Device-correct by construction, proven without a GPU: every input reaches the model on the
model's device, and collectives get tensors where their backend needs them.

The model is built on PyTorch's `meta` device. A forward pre-hook checks every tensor argument
against the parameters' device and then stops the forward with a sentinel (a meta model cannot
run transformers' mask code). An input left on the CPU trips the check, as it would crash a CUDA
forward.
"""

from __future__ import annotations

import pytest
import torch

from wpo_ray.arithmetic import ALPHABET
from wpo_ray.config import LossConfig, TinyModelConfig
from wpo_ray.tiny_model import build_char_tokenizer, build_tiny_model, save_policy


class _ReachedTheModel(Exception):
    pass


def _guard(model) -> list[str]:
    """Every tensor handed to `model.forward` must be on its parameters' device."""
    seen = []
    want = next(model.parameters()).device

    def hook(module, args, kwargs):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        tensors += [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
        assert tensors, "the forward got no tensor"
        for t in tensors:
            assert t.device == want, f"an input is on {t.device}, the model on {want}"
        seen.extend(sorted(k for k, v in kwargs.items() if isinstance(v, torch.Tensor)))
        raise _ReachedTheModel

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer(ALPHABET)


def _meta_model(tok):
    with torch.device("meta"):
        return build_tiny_model(TinyModelConfig(), tok, seed=0)


PAIRS = (["1+1=", "12*3="], ["2", "36"], ["3", "306"])


def test_the_training_step_hands_the_model_its_inputs_on_the_model_s_device(tok):
    from wpo_ray.step import encode_batch, model_device, pair_loss

    model = _meta_model(tok)
    seen = _guard(model)
    batch = encode_batch(tok, *PAIRS, 64, device=model_device(model))
    with pytest.raises(_ReachedTheModel):
        pair_loss(model, batch, LossConfig(base="dpo"), [1.0, 2.0], [-1.0, -2.0], [-1.5, -2.5])
    assert seen == ["attention_mask", "input_ids"]


def test_the_guard_catches_an_input_left_on_the_cpu(tok):
    """The check itself: CPU inputs straight into the raw forward (below the step) trip it."""
    from wpo_ray.batching import sequence_logps
    from wpo_ray.step import encode_batch

    model = _meta_model(tok)
    _guard(model)
    with pytest.raises(AssertionError, match="an input is on cpu, the model on meta"):
        sequence_logps(model, encode_batch(tok, *PAIRS, 64))  # device not given: the CPU


def test_the_reference_forward_on_the_worker_gets_its_inputs_on_its_device(tok):
    """`train.reference_logps=worker`: the reference model's forward inside the step."""
    from wpo_ray.step import encode_batch, pair_loss

    policy, reference = build_tiny_model(TinyModelConfig(), tok, seed=0), _meta_model(tok)
    seen = _guard(reference)
    with pytest.raises(_ReachedTheModel):
        pair_loss(policy, encode_batch(tok, *PAIRS, 64), LossConfig(base="dpo"), [1.0, 1.0], ref_model=reference)
    assert seen == ["attention_mask", "input_ids"]


def test_the_ref_logp_actor_encodes_onto_its_model_s_device(tok, tmp_path):
    import pyarrow as pa

    from actors.ref_logp import RefLogpActor

    save_policy(build_tiny_model(TinyModelConfig(), tok, seed=0), tok, tmp_path / "m")
    actor = RefLogpActor(str(tmp_path / "m"))
    actor.model = _meta_model(tok)  # as if loaded onto an accelerator
    seen = _guard(actor.model)
    table = pa.table({"prompt_id": ["a", "b"], "prompt": PAIRS[0], "chosen": PAIRS[1], "rejected": PAIRS[2]})
    with pytest.raises(_ReachedTheModel):
        actor(table)
    assert seen == ["attention_mask", "input_ids"]


def test_loss_inputs_follow_the_policy_log_probs_device():
    """Weights and precomputed reference log-probs from Arrow (Python lists) are placed next to
    the policy's log-probs, whatever device that is."""
    from wpo_ray.step import as_tensor

    like = torch.zeros(2, device="meta")
    assert as_tensor([1.0, 2.0], like).device.type == "meta" and as_tensor([1.0], like).dtype == torch.float64


def test_collectives_get_tensors_on_the_device_their_backend_needs(monkeypatch):
    from actors.train_worker import collective_device

    assert collective_device("gloo") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert collective_device("nccl") == torch.device("cuda", 3)


def test_metrics_all_reduce_uses_the_collective_device(monkeypatch):
    import torch.distributed as dist

    from actors import train_worker

    got = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(dist, "get_backend", lambda *a: "gloo-for-the-test")
    monkeypatch.setattr(train_worker, "collective_device", lambda backend: (got.append(backend), torch.device("cpu"))[1])
    monkeypatch.setattr(dist, "all_reduce", lambda t: (got.append(t.device), t.mul_(2))[1])
    out = train_worker._mean_across_ranks({"loss": 1.5, "acc": 0.5})
    assert got == ["gloo-for-the-test", torch.device("cpu")] and out == {"acc": 0.5, "loss": 1.5}
