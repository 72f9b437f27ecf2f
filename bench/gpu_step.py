"""The project's training step on one GPU: tokens/s and MFU of a ~1B random Llama in bf16.

What it measures: `wpo_ray.step.pair_loss` (the step every trainer runs: one forward over chosen
and rejected, the weighted DPO loss against precomputed reference log-probs) + backward + a fused
AdamW step, on a randomly initialised Llama (hidden 2048, 16 layers, 16 heads / 8 KV heads,
intermediate 8192, vocab 32000: 1.1B parameters) in bf16 on one GPU, with synthetic pairs of
`--prompt-len` + `--response-len` tokens. Then the reference forward alone
(`wpo_ray.step.reference_logps`, no graph), as the RefLogp actors run it.

Figures: tokens/s counts every token of the chosen and rejected sequences that the model
processes; MFU = achieved model FLOPs / the GPU's dense bf16 peak, with model FLOPs per token
6·N + 12·L·d·T for the training step (forward + backward, attention included, PaLM's count) and
2·N + 4·L·d·T for the reference forward. The peak is looked up from the device name (H100/H200
989 TFLOP/s, A100 312) or given with --peak-tflops. Pure bf16 (weights, gradients and AdamW state
in bf16; DeepSpeed's fp32 master weights are not modelled). Needs only torch and transformers.

    python bench/gpu_step.py [--pairs 8] [--prompt-len 256] [--response-len 256] [--steps 10]
    python bench/gpu_step.py --device cpu --tiny     # a smoke run of the script itself on CPU
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, on a machine without the install

from wpo_ray.step import pair_loss, reference_logps  # noqa: E402  (imports with torch alone)

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0}


def loss_config(beta: float):
    """The DPO loss config; the project's typed config when pydantic is installed, else the same
    fields as a namespace (a GPU image may lack pydantic)."""
    try:
        from wpo_ray.config import LossConfig

        return LossConfig(base="dpo", beta=beta)
    except ImportError:
        return SimpleNamespace(base="dpo", beta=beta, label_smoothing=0.0, dpop_lambda=50.0, simpo_gamma=0.5,
                               weight_placement="margin", needs_reference=True,
                               focal=SimpleNamespace(gamma=0.0, detach=False),
                               gamma_po=SimpleNamespace(enabled=False, ratio=0.5))


def build_model(tiny: bool, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    if tiny:
        cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024)
    else:
        cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                          num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=4096,
                          tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model, cfg


def synthetic_batch(n_pairs: int, prompt_len: int, response_len: int, vocab: int, device: str) -> dict:
    """[2B, L] input_ids / attention_mask / response_mask, chosen rows then rejected, as
    `wpo_ray.step.encode_batch` builds them (no padding: every row has the full length)."""
    g = torch.Generator().manual_seed(0)
    length = prompt_len + response_len
    ids = torch.randint(4, vocab, (2 * n_pairs, length), generator=g)
    ids[n_pairs:, :prompt_len] = ids[:n_pairs, :prompt_len]  # a pair shares its prompt
    response = torch.zeros_like(ids, dtype=torch.bool)
    response[:, prompt_len:] = True
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "response_mask": response.to(device)}


def flops_per_token(n_params: int, cfg, seq_len: int, train: bool) -> float:
    attn = cfg.num_hidden_layers * cfg.hidden_size * seq_len
    return 6 * n_params + 12 * attn if train else 2 * n_params + 4 * attn


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a 0.3M model: check the script, not the GPU")
    ap.add_argument("--pairs", type=int, default=8, help="pairs per step (2x sequences)")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--response-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak (default: from its name)")
    a = ap.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench/gpu_step.py: no CUDA device here (use --device cpu --tiny for a smoke run)")
    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    name = torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"
    peak = a.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)

    model, cfg = build_model(a.tiny, a.device, dtype)
    ref, _ = build_model(a.tiny, a.device, dtype)
    ref.eval()
    n_params = sum(p.numel() for p in model.parameters())
    batch = synthetic_batch(a.pairs, a.prompt_len, a.response_len, cfg.vocab_size, a.device)
    tokens = batch["attention_mask"].sum().item()
    seq = a.prompt_len + a.response_len
    rc, rr = reference_logps(ref, batch)
    weights = torch.linspace(1.0, 2.0, a.pairs).tolist()
    loss_cfg = loss_config(0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=a.device.startswith("cuda"))
    print(f"device {name}; {n_params / 1e9:.2f}B parameters in {dtype}; {a.pairs} pairs x {seq} tokens "
          f"({tokens} tokens per step)")

    def step():
        out = pair_loss(model, batch, loss_cfg, weights, rc, rr)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    for _ in range(a.warmup):
        step()
    sync(a.device)
    t0 = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    sync(a.device)
    dt = (time.perf_counter() - t0) / a.steps
    train_tps = tokens / dt
    print(f"training step: {dt * 1e3:.1f} ms/step, {train_tps:,.0f} tokens/s, loss {loss.item():.4f}")

    with torch.no_grad():
        for _ in range(a.warmup):
            reference_logps(ref, batch)
        sync(a.device)
        t0 = time.perf_counter()
        for _ in range(a.steps):
            reference_logps(ref, batch)
        sync(a.device)
    rdt = (time.perf_counter() - t0) / a.steps
    ref_tps = tokens / rdt
    print(f"reference forward: {rdt * 1e3:.1f} ms/batch, {ref_tps:,.0f} tokens/s")
    if peak:
        mfu = train_tps * flops_per_token(n_params, cfg, seq, True) / (peak * 1e12)
        rmfu = ref_tps * flops_per_token(n_params, cfg, seq, False) / (peak * 1e12)
        print(f"MFU against {peak:g} TFLOP/s bf16 peak: training step {mfu:.1%} (goal 45%), reference forward "
              f"{rmfu:.1%}")
    else:
        print("MFU: unknown peak for this device (give --peak-tflops)")
    if a.device.startswith("cuda"):
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
