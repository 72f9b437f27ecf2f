"""Colocated placement: what each role asks Ray for, the fallback, and the engines' sleep/wake
sequence around training, driven through the pipeline's LazySamplers with a recording pool."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from wpo_ray import colocation
from wpo_ray.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
GSM8K = REPO / "configs" / "qwen2-7b-gsm8k.yaml"
TINY = REPO / "configs" / "tiny-cpu.yaml"


class RecordingPool:
    """The SamplerPool interface the placement logic uses, recording each call in order."""

    def __init__(self, policy: str, can_sleep: bool, why_not_sleep: str = ""):
        self.model_path, self.can_sleep, self.why_not_sleep = policy, can_sleep, why_not_sleep
        self.calls: list[tuple] = []

    def sleep(self, level: int) -> None:
        self.calls.append(("sleep", level))

    def wake_up(self, tags: list[str]) -> None:
        self.calls.append(("wake_up", tuple(tags)))

    def load_weights(self, path: str, weights=None) -> None:
        self.calls.append(("load_weights", path) if weights is None else ("load_weights", path, weights))
        self.model_path = path


def test_gpu_shares_give_one_engine_and_one_trainer_per_gpu():
    cfg = load_config(GSM8K)
    assert colocation.shares_gpus(cfg)
    e, t = colocation.engine_gpus(cfg), colocation.trainer_gpus(cfg)
    assert e + t == pytest.approx(1.0)
    assert 2 * e > 1 and e + 2 * t > 1  # no GPU takes two engines, or an engine and two trainers
    assert colocation.trainer_resources(cfg) == {"CPU": cfg.train.cpus_per_worker, "GPU": t}
    apart = load_config(GSM8K, ["run.placement=separate"])
    assert (colocation.engine_gpus(apart), colocation.trainer_gpus(apart)) == (1.0, 1.0)
    assert "GPU" not in colocation.trainer_resources(apart)  # Ray Train's use_gpu: one whole GPU
    tiny = load_config(TINY, ["run.placement=colocated"])  # on CPUs: nothing to share
    assert not colocation.shares_gpus(tiny)
    assert (colocation.engine_gpus(tiny), colocation.trainer_gpus(tiny)) == (0.0, 0.0)


def test_engines_that_cannot_sleep_fall_back_on_cpu_and_are_refused_on_shared_gpus():
    tiny = load_config(TINY, ["run.placement=colocated"])
    placement, line = colocation.effective_placement(tiny, False, "vLLM has no sleep mode on cpu")
    assert placement == "separate" and "cannot sleep (vLLM has no sleep mode on cpu)" in line
    assert colocation.effective_placement(tiny, True) == ("colocated", None)
    assert colocation.effective_placement(load_config(TINY), False) == ("separate", None)
    with pytest.raises(RuntimeError, match="cannot sleep .* set run.placement=separate"):
        colocation.effective_placement(load_config(GSM8K), False, "no sleep mode")


def test_sleep_and_wake_calls_are_a_function_of_the_placement_and_the_engines_state():
    assert colocation.before_training("colocated", engines_up=True, asleep=False) == ("sleep",)
    assert colocation.before_training("colocated", engines_up=False, asleep=False) == ()  # none to put away
    assert colocation.before_training("colocated", engines_up=True, asleep=True) == ()
    assert colocation.before_training("separate", engines_up=True, asleep=False) == ()
    assert colocation.on_next_use(True, "p0", "p1") == ("wake_weights", "load_weights", "wake_kv_cache")
    assert colocation.on_next_use(True, "p1", "p1") == ("wake_weights", "wake_kv_cache")
    assert colocation.on_next_use(False, "p0", "p1") == ("load_weights",)
    assert colocation.on_next_use(False, "p1", "p1") == ()


def test_the_pipeline_puts_colocated_engines_to_sleep_for_training_and_wakes_them_with_the_new_policy():
    from pipeline.round import LazySamplers

    cfg = load_config(GSM8K)
    pool = RecordingPool("p0", can_sleep=True)
    samplers = LazySamplers(cfg, pool)
    assert samplers("p0") is pool and pool.calls == []  # round 1 samples the initial policy
    samplers.before_training()
    samplers.before_training()  # (a retried training attempt) asleep already: no second call
    assert pool.calls == [("sleep", colocation.SLEEP_LEVEL)]
    samplers("p1")  # evaluation of round 1's policy
    assert pool.calls[1:] == [("wake_up", ("weights",)), ("load_weights", "p1"), ("wake_up", ("kv_cache",))]
    samplers("p1")  # round 2's sampling: awake, policy loaded, nothing to do
    assert len(pool.calls) == 4 and not samplers.asleep


def test_the_cpu_engine_falls_back_to_separate_saying_so_once(caplog):
    from pipeline.round import LazySamplers

    cfg = load_config(TINY, ["run.placement=colocated"])
    pool = RecordingPool("p0", can_sleep=False, why_not_sleep="vLLM has no sleep mode on cpu")
    with caplog.at_level(logging.WARNING, logger="pipeline.round"):
        samplers = LazySamplers(cfg, pool)
        for r in range(1, 4):
            samplers(f"p{r - 1}")
            samplers.before_training()
    said = [r.getMessage() for r in caplog.records if "falling back to separate placement" in r.getMessage()]
    assert len(said) == 1 and "vLLM has no sleep mode on cpu" in said[0]
    assert samplers.placement == "separate" and pool.calls == []


@pytest.mark.parametrize("overrides, key", [
    (["run.overlap=streaming", "train.checkpoint_every=0"], "run.overlap=staged"),
    (["train.use_gpu=false"], "both on GPUs or both on CPUs"),
    (["sampling.num_actors=4"], r"sampling.num_actors \(4\) must equal train.num_workers \(8\)"),
    (["sampling.engine.tensor_parallel_size=2", "sampling.num_gpus_per_actor=2"], "tensor_parallel_size 1"),
])
def test_colocated_combinations_that_cannot_work_are_refused_naming_the_keys(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config(GSM8K, overrides)


def test_weights_handed_over_in_memory_go_to_the_engines_only_for_the_policy_they_are():
    from pipeline.round import LazySamplers

    pool = RecordingPool("p0", can_sleep=False)
    samplers = LazySamplers(load_config(TINY), pool)
    samplers.offer("p1", "ref-1")  # round 1's trainers hold p1's weights
    samplers("p1")  # round 1's evaluation: p1 from memory
    assert pool.calls == [("load_weights", "p1", "ref-1")]
    samplers("p1")  # round 2's sampling: loaded already, and the offer is spent
    samplers.offer("p2", "ref-2")
    samplers("p1")  # (a caller that wants another policy) the offer for p2 is not used for it, and dropped
    samplers("p2")
    assert pool.calls == [("load_weights", "p1", "ref-1")]
    samplers.offer("p3", None)  # a round that did not hand its weights over: nothing to use
    samplers("p3")
    assert pool.calls == [("load_weights", "p1", "ref-1")] and samplers.offered is None


def test_a_deferred_evaluation_runs_while_the_engines_idle_and_ends_before_they_change_policy():
    import threading

    from pipeline.round import LazySamplers

    pool = RecordingPool("p0", can_sleep=False)
    samplers = LazySamplers(load_config(TINY), pool)
    started, release = threading.Event(), threading.Event()

    def evaluate_p0():
        started.set()
        assert release.wait(10)
        pool.calls.append(("evaluated", "p0", threading.current_thread() is threading.main_thread()))

    samplers.defer("p0", evaluate_p0)
    samplers("p0")  # round 1 samples the same policy: the evaluation waits, nothing is loaded
    assert not started.is_set() and pool.calls == []
    samplers.engines_idle()  # round 1's samples are drawn: it starts, in the background
    assert started.wait(10)
    samplers.before_training()  # separate placement: training does not wait for it
    samplers.offer("p1", "ref-1")
    release.set()
    samplers("p1")  # the hand-over waits for it
    assert pool.calls == [("evaluated", "p0", False), ("load_weights", "p1", "ref-1")]


def test_a_deferred_evaluation_ends_before_colocated_engines_sleep_and_runs_inline_if_they_never_idle():
    from pipeline.round import LazySamplers

    pool = RecordingPool("p0", can_sleep=True)
    samplers = LazySamplers(load_config(GSM8K), pool)
    samplers.defer("p0", lambda: pool.calls.append(("evaluated", "p0")))
    samplers("p0")
    samplers.engines_idle()
    samplers.before_training()
    assert pool.calls == [("evaluated", "p0"), ("sleep", colocation.SLEEP_LEVEL)]

    pool = RecordingPool("p0", can_sleep=False)
    samplers = LazySamplers(load_config(TINY), pool)
    samplers.defer("p0", lambda: pool.calls.append(("evaluated", "p0")))
    samplers.offer("p1", "ref-1")  # (a resumed run whose next round had sampled already: no idle point)
    samplers("p1")
    assert pool.calls == [("evaluated", "p0"), ("load_weights", "p1", "ref-1")]


def test_a_failed_deferred_evaluation_fails_the_run_and_shutdown_waits_for_a_running_one():
    from pipeline.round import LazySamplers

    def broken():
        raise ValueError("grader crashed")

    samplers = LazySamplers(load_config(TINY), RecordingPool("p0", can_sleep=False))
    samplers.defer("p0", broken)
    samplers.engines_idle()
    with pytest.raises(ValueError, match="grader crashed"):
        samplers.settle()

    done = []
    samplers.defer("p1", lambda: done.append("p1"))
    samplers.engines_idle()
    samplers.shutdown()  # running: waited for, so that it records its result
    samplers.defer("p2", lambda: done.append("p2"))
    samplers.shutdown()  # not started: dropped (the resumed run evaluates p2)
    assert done == ["p1"] and samplers.pending is None and samplers.deferred is None
