"""Sampling throughput: vLLM (`VLLMSampler`) vs transformers `generate` (`HFSampler`), same everything.

Same model (the tiny Llama, built in code with a fixed seed and saved to a temp dir), same prompts
(the arithmetic test split), same per-prompt seeds, n samples per prompt, temperature 1, top_p 1,
max_tokens 8. Three samplers, all loaded at once:

  transformers  wpo_ray.generation.HFSampler (the project's fallback: transformers generate with
                per-sample seeded Gumbel noise, so samples do not depend on batching)
  hf-plain      transformers' own do_sample with num_return_sequences=n (textbook baseline)
  vllm          wpo_ray.generation.VLLMSampler (vLLM-CPU engine, enforce_eager, float32 by default
                like the others and like configs/tiny-cpu.yaml)
  vllm-unseeded the same engine without per-request seeds: what our per-prompt seeds (samples that
                do not depend on batching, engine failover or retries) cost in vLLM

Each gets one untimed warm-up call, then `--repeats` rounds of timed calls over all prompts,
interleaved (A B C A B C ...) so drifting load from other jobs hits all three alike; the figure is
the median. vLLM's engine process busy-polls for ~2 s after a request, so every vLLM call is
followed by a 3 s pause, and the script checks that the idle engine takes no CPU.

    .venv/bin/python bench/sampler_throughput.py [--prompts 256 --n 8 --hidden 128 --layers 2]
    .venv/bin/python bench/sampler_throughput.py --hidden 256 --layers 4

Prints samples/s of both and the ratio vLLM / transformers.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from _common import build_model, header, median, n_params


# vLLM's engine process busy-polls for ~2 s after its last request (measured: ~45% of a core),
# then sleeps; wait that long after each vLLM call so it does not steal CPU from the next sampler.
VLLM_SETTLE_S = 3.0


class PlainGenerate:
    """transformers' own sampling (do_sample, num_return_sequences=n, one global seed): the textbook
    baseline, without HFSampler's per-sample seeded Gumbel noise. Same batching as HFSampler."""

    def __init__(self, hf, batch_size: int, seed: int):
        self.model, self.tok, self.batch_size, self.seed = hf.model, hf.tokenizer, batch_size, seed

    def generate(self, prompts, seeds, n, temperature, top_p, max_tokens):
        import torch

        from wpo_ray.generation import Completion

        torch.manual_seed(self.seed)
        per = max(1, self.batch_size // n)
        eos, out = self.tok.eos_token_id, []
        for i in range(0, len(prompts), per):
            enc = self.tok(prompts[i : i + per], return_tensors="pt", padding=True)
            with torch.no_grad():
                res = self.model.generate(**enc, do_sample=True, temperature=temperature, top_p=top_p, top_k=None,
                                          num_return_sequences=n, max_new_tokens=max_tokens,
                                          pad_token_id=self.tok.pad_token_id, eos_token_id=eos)
            new = res[:, enc["input_ids"].shape[1] :].tolist()
            comps = []
            for toks in new:
                length = toks.index(eos) + 1 if eos in toks else len(toks)
                comps.append(Completion(self.tok.decode(toks[:length], skip_special_tokens=True), 0.0, length))
            out += [comps[k * n : (k + 1) * n] for k in range(len(comps) // n)]
        return out


class UnseededVLLM:
    """The same vLLM engine, sampling without per-request seeds."""

    def __init__(self, vllm_sampler):
        self.vllm = vllm_sampler

    def generate(self, prompts, seeds, n, temperature, top_p, max_tokens):
        return self.vllm.generate(prompts, [None] * len(prompts), n, temperature, top_p, max_tokens)


def idle_child_cpu(seconds: float = 2.0) -> float:
    """CPU share used by this process's children (vLLM's engine core) over `seconds` of idling."""
    import psutil

    kids = psutil.Process().children(recursive=True)

    def cpu():
        total = 0.0
        for k in kids:
            try:
                t = k.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    c0 = cpu()
    time.sleep(seconds)
    return (cpu() - c0) / seconds


def timed(sampler, prompts, seeds, args, repeats):
    out, times = None, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = sampler.generate(prompts, seeds, n=args.n, temperature=args.temperature, top_p=1.0,
                               max_tokens=args.max_tokens)
        times.append(time.perf_counter() - t0)
    return out, times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--n", type=int, default=8, help="samples per prompt")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per sampler (median reported)")
    ap.add_argument("--warmup-prompts", type=int, default=32, help="prompts in the untimed warm-up call")
    ap.add_argument("--hf-batch-size", type=int, default=256, help="HFSampler rows per generate call (its default)")
    ap.add_argument("--vllm-dtype", default="float32", choices=["float32", "auto", "bfloat16"],
                    help="vLLM engine dtype; float32 = the same precision as the transformers samplers (vLLM's "
                         "'auto' runs a float32 checkpoint in bf16 on CPU)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from wpo_ray.arithmetic import make_split
    from wpo_ray.config import ArithmeticTaskConfig, EngineConfig
    from wpo_ray.generation import HFSampler, VLLMSampler, prompt_seed
    from wpo_ray.tiny_model import save_policy

    header("sampler throughput: vLLM vs transformers generate", vars(args))
    rows = make_split(ArithmeticTaskConfig(n_test=args.prompts), "test", args.prompts)
    prompts = [r["prompt"] for r in rows]
    seeds = [prompt_seed(args.seed, 0, r["prompt_id"]) for r in rows]
    warm = min(args.warmup_prompts, len(prompts))

    with tempfile.TemporaryDirectory(prefix="bench-sampler-") as tmp:
        model, tok = build_model(args.hidden, args.layers, seed=args.seed)
        print(f"model: tiny Llama hidden={args.hidden} layers={args.layers} params={n_params(model)/1e6:.2f}M -> {tmp}")
        save_policy(model, tok, tmp)
        del model

        loads, samplers = {}, {}
        t0 = time.perf_counter()
        samplers["transformers"] = HFSampler.from_path(tmp, batch_size=args.hf_batch_size)
        loads["transformers"] = time.perf_counter() - t0
        samplers["hf-plain"] = PlainGenerate(samplers["transformers"], args.hf_batch_size, args.seed)
        loads["hf-plain"] = 0.0
        t0 = time.perf_counter()
        samplers["vllm"] = VLLMSampler(tmp, EngineConfig(dtype=args.vllm_dtype), seed=args.seed, max_model_len=64)
        loads["vllm"] = time.perf_counter() - t0
        samplers["vllm-unseeded"] = UnseededVLLM(samplers["vllm"])
        loads["vllm-unseeded"] = 0.0

        for s in samplers.values():  # one untimed warm-up call each
            s.generate(prompts[:warm], seeds[:warm], n=args.n, temperature=args.temperature, top_p=1.0,
                       max_tokens=args.max_tokens)
        time.sleep(VLLM_SETTLE_S)
        print(f"vLLM engine processes' CPU while idle: {idle_child_cpu():.1%} of one core "
              "(must be ~0 for the interleaved transformers timings to be fair)")
        # Interleaved timed calls (A B C A B C ...): load from other jobs drifts over minutes on a
        # shared machine and would otherwise land on one sampler only.
        outs, times = {}, {k: [] for k in samplers}
        for _ in range(args.repeats):
            for k, s in samplers.items():
                outs[k], t = timed(s, prompts, seeds, args, 1)
                times[k] += t
                if k.startswith("vllm"):
                    time.sleep(VLLM_SETTLE_S)

    samples = len(prompts) * args.n
    res = {}
    for name in samplers:
        out, load = outs[name], loads[name]
        tokens = sum(c.length for comps in out for c in comps)
        got = sum(len(comps) for comps in out)
        assert got == samples, f"{name}: {got} samples, expected {samples}"
        t = median(times[name])
        res[name] = samples / t
        print(f"{name:13s} load {load:6.1f}s  timed calls {', '.join(f'{x:.2f}s' for x in times[name])}  "
              f"median {t:.3f}s  {samples / t:9.1f} samples/s  {tokens / t:9.1f} generated tokens/s  "
              f"(mean length {tokens / samples:.2f})")
    what = f"({len(prompts)} prompts x n={args.n}, max_tokens {args.max_tokens}, temperature {args.temperature})"
    print(f"\nRATIO vllm/transformers samples/s = {res['vllm'] / res['transformers']:.2f}x {what}")
    print(f"      vllm/hf-plain      samples/s = {res['vllm'] / res['hf-plain']:.2f}x "
          "(hf-plain: transformers' own do_sample, no per-sample seeds)")
    print(f"      vllm-unseeded/vllm samples/s = {res['vllm-unseeded'] / res['vllm']:.2f}x "
          "(the cost of per-prompt seeds in vLLM)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
