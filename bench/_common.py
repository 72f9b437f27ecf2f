"""Shared helpers of the benchmark scripts: the machine header, the tiny model, arithmetic pairs.

Nothing here is downloaded: the model is the project's tiny Llama with the character tokenizer,
built in code with a fixed seed and saved as a plain HF directory (config.json + safetensors).
"""

from __future__ import annotations

import os
import platform
import random
import resource
from pathlib import Path
from statistics import median  # noqa: F401 - the benchmarks' summary statistic

ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def header(title: str, params: dict, torch_threads: int | None = None) -> str:
    """The machine and the parameters, printed first by every benchmark.

    With `torch_threads` given, torch is not imported here (a parent process that must stay small,
    e.g. one whose children measure their peak RSS, passes what a child reported)."""
    if torch_threads is None:
        import torch

        version, torch_threads = torch.__version__, torch.get_num_threads()
    else:
        from importlib.metadata import version as _v

        version = _v("torch")
    lines = [
        f"== {title} ==",
        f"machine: nproc={os.cpu_count()} cpu={cpu_model()!r} torch={version} "
        f"torch_threads={torch_threads} python={platform.python_version()}",
        f"load average at start (1/5/15 min): {load_average()}  "
        "(other jobs on the machine skew every figure; compare ratios, not absolutes)",
        "params: " + " ".join(f"{k}={v}" for k, v in params.items()),
    ]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def tiny_model_config(hidden: int, layers: int, heads: int | None = None, max_positions: int = 64):
    """TinyModelConfig for the given width/depth: head size 32 unless `heads` is given (vLLM's CPU
    attention accepts 32, 64, ...), MLP 2x hidden as in the default 128/256."""
    from wpo_ray.config import TinyModelConfig

    heads = heads or max(1, hidden // 32)
    return TinyModelConfig(hidden_size=hidden, num_layers=layers, num_heads=heads,
                           intermediate_size=2 * hidden, max_position_embeddings=max_positions)


def build_model(hidden: int, layers: int, seed: int = 0, heads: int | None = None):
    """(model, tokenizer): a random tiny Llama over the arithmetic alphabet, fp32, eval mode."""
    from wpo_ray.arithmetic import ALPHABET
    from wpo_ray.tiny_model import build_char_tokenizer, build_tiny_model

    tok = build_char_tokenizer(ALPHABET)
    model = build_tiny_model(tiny_model_config(hidden, layers, heads), tok, seed=seed)
    return model.eval(), tok


def save_model(path: str | Path, hidden: int, layers: int, seed: int = 0, heads: int | None = None) -> str:
    from wpo_ray.tiny_model import save_policy

    model, tok = build_model(hidden, layers, seed, heads)
    save_policy(model, tok, path)
    return str(path)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def arithmetic_pairs(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """n pairs of the arithmetic task: chosen = gold answer, rejected = gold + 1, a seeded weight
    in [1, 2] (the range of Ma et al.'s weights with alpha = 1)."""
    from wpo_ray.arithmetic import make_split
    from wpo_ray.config import ArithmeticTaskConfig

    rows = make_split(ArithmeticTaskConfig(), split, n)
    rng = random.Random(seed)
    return [dict(prompt_id=r["prompt_id"], prompt=r["prompt"], chosen=r["gold_answer"],
                 rejected=str(int(r["gold_answer"]) + 1), weight=round(1.0 + rng.random(), 4))
            for r in rows]


def peak_rss_mib() -> float:
    """This process's high-water RSS (ru_maxrss is KiB on Linux). Linux carries it across execve:
    a child forked from a big parent starts with the parent's high-water mark."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def vm_hwm_mib() -> float:
    """High-water RSS of this address space (/proc/self/status VmHWM): not inherited across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reference_batches(model, tok, n_batches: int, batch: int, seed: int = 0) -> list[dict]:
    """Pre-collated batches of arithmetic pairs as the training worker builds them, with the model's
    own log-probs as the reference: coll, rc, rr (float64) and the pairs' weights w."""
    import torch

    from wpo_ray.step import encode_batch, reference_logps

    pairs = arithmetic_pairs(n_batches * batch, seed=seed)
    out = []
    for i in range(n_batches):
        part = pairs[i * batch : (i + 1) * batch]
        coll = encode_batch(tok, [p["prompt"] for p in part], [p["chosen"] for p in part],
                            [p["rejected"] for p in part], 64)
        rc, rr = reference_logps(model, coll)
        out.append(dict(coll=coll, rc=rc, rr=rr, w=torch.tensor([p["weight"] for p in part], dtype=torch.float64)))
    return out
