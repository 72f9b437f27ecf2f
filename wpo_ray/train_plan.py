"""Planning arithmetic of a training run, pure: optimizer steps, ZeRO stage, the DeepSpeed config,
sequence lengths. The driver sizes the schedule with it before any worker starts; the workers
build their engines from it.
"""

from __future__ import annotations

from .config import Config

# Training sequences of a model that is not the built-in tiny one: prompt + response tokens.
DEFAULT_MAX_LENGTH = 2048


def model_max_length(cfg: Config) -> int | None:
    """The longest sequence the policy takes, where the config knows it (the built-in tiny model's
    position table); None lets the engine read it from the model."""
    return cfg.bootstrap.model.max_position_embeddings if cfg.model.path == "builtin:tiny" else None


def train_max_length(cfg: Config) -> int:
    """The longest pair (prompt + response tokens) the trainer and the reference stage encode:
    `train.max_length`, else the model's own limit where known, else DEFAULT_MAX_LENGTH."""
    return cfg.train.max_length or model_max_length(cfg) or DEFAULT_MAX_LENGTH


def prompt_token_limit(cfg: Config) -> int | None:
    """The longest prompt a round samples: `data.max_prompt_length`, else what the engine's max
    length leaves for `sampling.max_tokens` of answer (where the config knows it), else None."""
    if cfg.data.max_prompt_length is not None:
        return cfg.data.max_prompt_length
    engine = cfg.sampling.engine.max_model_len or model_max_length(cfg)
    return None if engine is None else max(1, engine - cfg.sampling.max_tokens)


def zero_stage(cfg: Config) -> int:
    """The ZeRO stage the workers run: the configured one, or 0 for a single worker.

    ZeRO partitions optimizer state, gradients and parameters across ranks; one rank has nothing
    to partition, and stages 1-3 then only add copies into and out of flat buffers (a quarter of a
    CPU training step: docs/BENCHMARKS.md).
    """
    return cfg.train.deepspeed.zero_stage if cfg.train.num_workers > 1 else 0


def deepspeed_config(cfg: Config, total_steps: int) -> dict:
    t, ds = cfg.train, cfg.train.deepspeed
    zero: dict = {"stage": zero_stage(cfg)}
    if zero["stage"] == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # lets rank 0 write full HF weights
    if ds.offload_optimizer and zero["stage"] >= 1:  # (a single worker runs stage 0: nothing to offload)
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": t.use_gpu}
    if ds.offload_params and zero["stage"] == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": t.use_gpu}
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": ds.grad_clip,
        "zero_optimization": zero,
        # The schedule is ours (`lr_scheduler`), not DeepSpeed's WarmupDecayLR, which starts at
        # warmup_min_lr: with warm-up its first step had lr 0 and trained nothing.
        # On CPU, torch's own Adam(W): DeepSpeed's FusedAdam is JIT-compiled into a shared cache on
        # first use, and a build that is killed leaves a lock every later worker waits on forever
        # (docs/ENVIRONMENT.md). On GPU the fused kernel is the fast one.
        "optimizer": {"type": ds.optimizer, "params": {"lr": t.lr, "weight_decay": ds.weight_decay,
                                                       "torch_adam": not t.use_gpu}},
        "bf16": {"enabled": t.use_gpu and cfg.model.dtype == "bfloat16"},
        "steps_per_print": 10**9,  # our own progress line replaces DeepSpeed's
        "wall_clock_breakdown": False,
    }


def lr_factor(step: int, warmup: int, total: int) -> float:
    """lr / peak lr of optimizer step `step` (1-based): linear warm-up over `warmup` steps (step 1
    has lr/warmup), then linear decay that reaches lr/(total - warmup) at the last step. No step
    has lr 0."""
    if step <= warmup:
        return step / warmup
    return max(0.0, (total - step + 1) / max(1, total - warmup))


def lr_scheduler(cfg: Config, total_steps: int):
    """The callable DeepSpeed builds the LR schedule with (stepped after each optimizer step)."""
    import torch

    warmup = cfg.train.warmup_steps
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: lr_factor(i + 1, warmup, total_steps))


def optimizer_steps(n_pairs: int, cfg: Config) -> int:
    """Optimizer steps the run will take: equal shards, whole micro-batches, whole accumulations."""
    t = cfg.train
    per_rank = n_pairs // t.num_workers
    steps = (per_rank // t.micro_batch_size) // t.grad_accum * t.epochs
    return min(steps, t.max_steps) if t.max_steps else steps


def expected_total_steps(n_pairs: int, cfg: Config) -> int:
    steps = optimizer_steps(n_pairs, cfg)
    if steps < 1:
        need = cfg.train.num_workers * cfg.train.micro_batch_size * cfg.train.grad_accum
        raise ValueError(f"{n_pairs} pairs make no optimizer step: one step needs num_workers x micro_batch_size "
                         f"x grad_accum = {need} pairs (lower train.micro_batch_size or train.grad_accum)")
    return steps

