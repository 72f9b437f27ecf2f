"""The Ray-free training step on CUDA against the same step on CPU (marked `gpu`: `make test-gpu`
on a machine with a CUDA GPU; `make test` deselects these).

The tiny model is built once with a fixed seed and copied to each device, so the CPU and CUDA
steps see identical weights and identical pairs: float32 on CUDA must give the CPU loss and
gradients to rounding, bf16 the same loss to bf16's precision, and the reference forward the same
log-probs.
"""

from __future__ import annotations

import copy

import pytest
import torch

from wpo_ray.arithmetic import ALPHABET
from wpo_ray.config import LossConfig, TinyModelConfig
from wpo_ray.step import encode_batch, model_device, pair_loss, reference_logps
from wpo_ray.tiny_model import build_char_tokenizer, build_tiny_model

pytestmark = pytest.mark.gpu

PAIRS = (["1+1=", "12*3=", "7*8=", "40+2="], ["2", "36", "56", "42"], ["3", "306", "54", "24"])
WEIGHTS = [1.0, 0.5, 2.0, 1.5]


@pytest.fixture(scope="module")
def tok():
    if not torch.cuda.is_available():
        pytest.fail("tests marked gpu need a CUDA GPU (make test deselects them)")
    return build_char_tokenizer(ALPHABET)


def _step(model, tok, loss_cfg, ref=None):
    batch = encode_batch(tok, *PAIRS, 64, device=model_device(model))
    out = pair_loss(model, batch, loss_cfg, WEIGHTS, ref_model=ref)
    out.loss.backward()
    grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach().float().cpu(), grads


@pytest.mark.parametrize("base", ["dpo", "simpo"])
def test_the_step_on_cuda_matches_the_step_on_cpu(tok, base):
    loss_cfg = LossConfig(base=base)
    cpu = build_tiny_model(TinyModelConfig(), tok, seed=0)
    cuda = copy.deepcopy(cpu).to("cuda")
    ref_cpu, ref_cuda = copy.deepcopy(cpu).eval(), copy.deepcopy(cpu).to("cuda").eval()
    loss_c, grads_c = _step(cpu, tok, loss_cfg, ref_cpu)
    loss_g, grads_g = _step(cuda, tok, loss_cfg, ref_cuda)
    assert torch.allclose(loss_c, loss_g, rtol=1e-4, atol=1e-5), (loss_c, loss_g)
    assert grads_c.keys() == grads_g.keys() and grads_c
    for name in grads_c:
        assert torch.allclose(grads_c[name], grads_g[name], rtol=1e-3, atol=1e-5), name


def test_bf16_on_cuda_gives_the_cpu_loss_to_bf16_precision(tok):
    loss_cfg = LossConfig(base="dpo")
    cpu = build_tiny_model(TinyModelConfig(), tok, seed=0)
    bf16 = copy.deepcopy(cpu).to("cuda", dtype=torch.bfloat16)
    ref = copy.deepcopy(cpu).to("cuda", dtype=torch.bfloat16).eval()
    loss_c, _ = _step(cpu, tok, loss_cfg, copy.deepcopy(cpu).eval())
    loss_b, grads_b = _step(bf16, tok, loss_cfg, ref)
    assert torch.isfinite(loss_b) and all(torch.isfinite(g).all() for g in grads_b.values())
    assert abs(loss_c.item() - loss_b.item()) < 2e-2, (loss_c, loss_b)


def test_reference_log_probs_on_cuda_match_cpu(tok):
    cpu = build_tiny_model(TinyModelConfig(), tok, seed=0).eval()
    cuda = copy.deepcopy(cpu).to("cuda")
    batch = encode_batch(tok, *PAIRS, 64)  # built on CPU: the step moves it to the model's device
    c, g = reference_logps(cpu, batch), reference_logps(cuda, batch)
    assert g[0].device.type == "cuda"
    for a, b in zip(c, g):
        assert torch.allclose(a, b.cpu(), rtol=1e-4, atol=1e-4)
