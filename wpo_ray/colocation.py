"""Colocated placement: sampler engines and trainers on the same GPUs, taking turns.

`run.placement=colocated` gives each GPU one sampler engine and one trainer. Ray sees them as
fractional GPU requests that only fit one of each per GPU (an engine 0.6, a trainer 0.4: two
engines or an engine and two trainers exceed one GPU). They take turns: before a round's
training the engines sleep (vLLM sleep mode level 1: weights offloaded to host memory, KV cache
freed); when the engines are next needed they wake their weights, load the new policy in place,
then allocate their KV cache (so new weights and a full KV cache are never on the GPU at once).
Trainers hold their GPU memory only while they train (each round's trainer group exits after it).

An engine that cannot sleep (vLLM's CPU build has no sleep mode) falls back to separate placement
when there are no GPUs to share; on GPUs that would double-book every GPU, so it is an error.

Pure: what to ask Ray for and which engine calls to make, as functions of the config and the
engines' state. The pipeline (pipeline/round.py) makes the calls.
"""

from __future__ import annotations

from typing import Optional

from .config import Config

ENGINE_GPU_SHARE = 0.6
TRAINER_GPU_SHARE = 0.4
SLEEP_LEVEL = 1  # weights kept in host memory: an engine can wake with the old policy if it must


def shares_gpus(cfg: Config) -> bool:
    """Colocated on GPUs (on CPUs there is nothing to share: the placement falls back)."""
    return cfg.run.placement == "colocated" and cfg.train.use_gpu and cfg.sampling.num_gpus_per_actor > 0


def engine_gpus(cfg: Config) -> float:
    """GPUs one sampler engine asks Ray for."""
    return ENGINE_GPU_SHARE if shares_gpus(cfg) else float(cfg.sampling.num_gpus_per_actor)


def trainer_gpus(cfg: Config) -> float:
    """GPUs one trainer (Ray Train worker) asks Ray for."""
    if not cfg.train.use_gpu:
        return 0.0
    return TRAINER_GPU_SHARE if shares_gpus(cfg) else 1.0


def trainer_resources(cfg: Config) -> dict[str, float]:
    """Ray Train's `resources_per_worker` (without a GPU entry, `use_gpu` means one whole GPU)."""
    res = {"CPU": float(cfg.train.cpus_per_worker)}
    if shares_gpus(cfg):
        res["GPU"] = TRAINER_GPU_SHARE
    return res


def effective_placement(cfg: Config, engines_can_sleep: bool, why_not: str = "") -> tuple[str, Optional[str]]:
    """The placement the run uses once its engines are up, and the line to log when it is not the
    requested one. Raises when colocated GPUs hold engines that cannot sleep."""
    if cfg.run.placement == "separate" or engines_can_sleep:
        return cfg.run.placement, None
    if shares_gpus(cfg):
        raise RuntimeError(f"run.placement=colocated: the sampler engines cannot sleep ({why_not}), so they "
                           "would keep their GPU memory through training on the GPUs the trainers share; "
                           "set run.placement=separate")
    return "separate", (f"[placement] run.placement=colocated, but the sampler engines cannot sleep ({why_not}): "
                        "falling back to separate placement")


def before_training(placement: str, engines_up: bool, asleep: bool) -> tuple[str, ...]:
    """Engine calls before a round's training: colocated engines that are up go to sleep."""
    return ("sleep",) if placement == "colocated" and engines_up and not asleep else ()


def on_next_use(asleep: bool, loaded: str, wanted: str) -> tuple[str, ...]:
    """Engine calls when the engines are next needed (sampling or evaluation) with policy `wanted`:
    a sleeping engine wakes its weights, takes the new policy in place, then its KV cache."""
    load = ("load_weights",) if loaded != wanted else ()
    if asleep:
        return ("wake_weights", *load, "wake_kv_cache")
    return load
