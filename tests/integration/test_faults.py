"""Faults the other suites do not cover: a training worker that fails on every attempt, an engine
and a driver killed during evaluation, the driver killed during the bootstrap. Each runs the real
component and injects the fault with a failpoint (wpo_ray/failpoints.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from wpo_ray.failpoints import arm, fired

pytestmark = pytest.mark.integration


def _pairs_recorded(cfg, arithmetic_pairs):
    """A run whose round 1 has its pairs recorded, as after a finished sampling half."""
    from wpo_ray import contracts
    from wpo_ray.rundir import RunDir

    run = RunDir(cfg)
    run.output(1, "pairs").mkdir(parents=True)
    shutil.copy(Path(arithmetic_pairs) / "pairs.parquet", run.output(1, "pairs") / "pairs.parquet")
    run.output(1, "skips").mkdir()
    pq.write_table(contracts.SKIPS.empty_table(), run.output(1, "skips") / "empty.parquet")
    n = pq.read_metadata(run.output(1, "pairs") / "pairs.parquet").num_rows
    run.mark_done(1, "pairs", pairs=n, skips=0, prompts=n, skip_reasons={})
    return run


def test_a_worker_failing_on_every_attempt_stops_the_round_and_a_rerun_trains_cleanly(
        ray_session, tiny_cfg_factory, tiny_policy, arithmetic_pairs, failpoints):
    """Killed at its first micro-batch on every (re)start: after train.max_failures restarts the
    round's training raises, nothing is recorded or put in place, and once the fault is gone the
    same command trains the round from the start."""
    from pipeline.round import LazyGraders, LazySamplers, LazyTrainers, train_round
    from wpo_ray.rundir import RunDir, checkpoint_has_policy

    def train(run) -> None:  # as run_rounds does it: the run's trainer group
        trainers = LazyTrainers(cfg, run)
        try:
            train_round(cfg, run, 1, tiny_policy, tiny_policy, LazySamplers(cfg), LazyGraders(cfg), trainers)
        finally:
            trainers.close()

    # The reference on the workers: no RefLogp stage to start for each of the three trainings.
    cfg = tiny_cfg_factory("run.rounds=1", "train.max_failures=1", "train.reference_logps=worker")
    run = _pairs_recorded(cfg, arithmetic_pairs)
    armed = arm(failpoints, "train.micro_step", hit=1, action="kill", every=True)
    with pytest.raises(Exception) as e:
        train(run)
    assert fired(failpoints, "train.micro_step"), e.value
    assert run.done(1, "train") is None and not run.output(1, "checkpoint").exists()

    armed.unlink()  # the fault is gone; the user reruns the same command
    rerun = RunDir(cfg)
    assert not (rerun.round_dir(1) / "checkpoint.tmp").exists()
    train(rerun)
    info = rerun.done(1, "train")
    assert info["steps"] == 6 and checkpoint_has_policy(rerun.output(1, "checkpoint"))  # 48 pairs / (2 x 4)
    assert [w["rank"] for w in info["placement"]["train_workers"]] == [0, 1]


def test_an_engine_killed_during_evaluation_fails_over_and_gives_the_same_result(
        ray_session, tiny_cfg_factory, tiny_policy, failpoints):
    """Two engines (transformers backend: a restart takes seconds, not a vLLM start); the first to
    reach an evaluation chunk is SIGKILLed in it, its chunk goes to the other engine."""
    from actors.sampler import SamplerPool
    from pipeline.evaluation import run_eval

    cfg = tiny_cfg_factory("sampling.backend=transformers", "sampling.num_actors=2")
    pool = SamplerPool(cfg, tiny_policy)
    try:
        clean = run_eval(cfg, tiny_policy, sampler=pool)
        arm(failpoints, "sampler.generate", hit=1, action="kill")
        disturbed = run_eval(cfg, tiny_policy, sampler=pool)
        assert fired(failpoints, "sampler.generate")
    finally:
        pool.shutdown()
    for key in ("greedy_accuracy", "greedy_by_bucket", f"maj@{cfg.eval.maj_n}_accuracy", "n_prompts"):
        assert disturbed[key] == clean[key], key


@pytest.mark.parametrize("point", ["driver.eval.json.written", "driver.eval.json.committed"])
def test_a_driver_stopped_while_recording_an_eval_redoes_it_on_the_rerun(
        tiny_cfg_factory, tiny_policy, vllm_pool, failpoints, point):
    """Ctrl-C with the eval written but not in place, and in place but not recorded: the next run
    takes neither as done and evaluates again; the result is the same."""
    from pipeline.evaluation import eval_stage
    from wpo_ray.rundir import RunDir

    cfg = tiny_cfg_factory()
    run = RunDir(cfg)
    arm(failpoints, point, action="interrupt")
    with pytest.raises(KeyboardInterrupt):
        eval_stage(cfg, run, 0, tiny_policy, vllm_pool)
    assert run.done(0, "eval") is None
    rerun = RunDir(cfg)
    assert not (rerun.round_dir(0) / "eval.json.tmp").exists()
    result = eval_stage(cfg, rerun, 0, tiny_policy, vllm_pool)
    assert rerun.done(0, "eval")["greedy_accuracy"] == result["greedy_accuracy"]
    assert json.loads(rerun.output(0, "eval.json").read_text()) == result


@pytest.mark.parametrize("point, hit", [("bootstrap.step", 10), ("bootstrap.written", 1)])
def test_a_driver_stopped_during_the_bootstrap_never_leaves_a_partial_cache_entry(tmp_path, failpoints, point, hit):
    """Stopped mid-SFT, or with the entry written but not yet renamed into place: no cache entry
    exists; the next run rebuilds a complete one, and the run after that reuses it."""
    from wpo_ray.bootstrap import bootstrap_dir, check_policy_dir, run_bootstrap
    from wpo_ray.config import load_config

    root = Path(__file__).resolve().parents[2]
    cfg = load_config(root / "configs" / "tiny-cpu.yaml", ["bootstrap.steps=40", "data.arithmetic.n_test=64",
                                                          f"bootstrap.cache_dir={tmp_path / 'cache'}",
                                                          f"run.dir={tmp_path / 'run'}"])
    arm(failpoints, point, hit=hit, action="interrupt")
    with pytest.raises(KeyboardInterrupt):
        run_bootstrap(cfg)
    entry = bootstrap_dir(cfg)
    assert not entry.exists()  # at most a *.tmp sibling, never taken as the cache entry
    out = run_bootstrap(cfg)
    assert out == entry and check_policy_dir(out) and json.loads((out / "bootstrap.json").read_text())["steps"] == 40
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert run_bootstrap(cfg) == entry and (out / "model.safetensors").stat().st_mtime_ns == stamp
    assert not entry.with_name(entry.name + ".tmp").exists()


def test_a_vllm_engine_killed_mid_round_gives_the_round_an_undisturbed_run_gives(
        tiny_cfg_factory, tiny_policy, vllm_pool, grader_pool, failpoints, tmp_path):
    """The real vLLM engine SIGKILLed in its second sampling batch: Ray restarts it, the batch is
    sampled again with the same per-prompt seeds, and no prompt is lost or sampled twice."""
    from pipeline.sampling import run_sampling
    from wpo_ray.rundir import RunDir

    clean = tiny_cfg_factory(run_dir=tmp_path / "clean")
    run_sampling(clean, RunDir(clean), 1, tiny_policy, pool=vllm_pool, graders=grader_pool)
    killed = tiny_cfg_factory(run_dir=tmp_path / "killed")
    arm(failpoints, "sampler.sample", hit=2)
    info = run_sampling(killed, RunDir(killed), 1, tiny_policy, pool=vllm_pool, graders=grader_pool)
    assert fired(failpoints, "sampler.sample"), "the failpoint never fired: nothing was tested"
    assert info["pairs"] + info["skips"] == info["prompts"] == killed.data.arithmetic.n_train
    samples = pq.read_table(tmp_path / "killed" / "round-001" / "samples")
    assert sorted(samples.column("prompt_id").to_pylist()) == sorted(set(samples.column("prompt_id").to_pylist()))
    read = lambda run, out: pq.read_table(tmp_path / run / "round-001" / out)  # noqa: E731
    # The same samples for every prompt; the re-routed batch may land in another file of the stage.
    by_prompt = lambda run: read(run, "samples").sort_by("prompt_id").select(["prompt_id", "responses"])  # noqa: E731
    assert by_prompt("killed").equals(by_prompt("clean"))
    for out in ("pairs", "skips"):
        assert read("killed", out).equals(read("clean", out)), out


def test_a_grader_killed_while_grading_and_while_pairing_gives_the_round_an_undisturbed_run_gives(
        tiny_cfg_factory, tiny_policy, vllm_pool, grader_pool, failpoints, tmp_path):
    """A run's grader SIGKILLed in its first pairing batch, then (restarted) in its second grading
    batch: Ray restarts it and retries the batch, and the round's graded rows, pairs and skips are
    those of an undisturbed run (grading and pairing are pure). Each batch is graded, then paired,
    in one call, as the batches come from sampling."""
    from actors.grader import GraderPool
    from pipeline.sampling import run_sampling
    from wpo_ray.rundir import RunDir

    clean = tiny_cfg_factory(run_dir=tmp_path / "clean")
    run_sampling(clean, RunDir(clean), 1, tiny_policy, pool=vllm_pool, graders=grader_pool)
    killed = tiny_cfg_factory(run_dir=tmp_path / "killed")
    graders = GraderPool(killed)  # its own: the shared one is never killed
    try:
        before = graders.info()
        arm(failpoints, "grader.grade", hit=2)  # (hits count per process: the restarted one's second)
        arm(failpoints, "grader.pair", hit=1)
        info = run_sampling(killed, RunDir(killed), 1, tiny_policy, pool=vllm_pool, graders=graders)
        assert fired(failpoints, "grader.grade") and fired(failpoints, "grader.pair"), "nothing was tested"
        assert graders.info()[0]["pid"] != before[0]["pid"]  # the actor really died and came back
    finally:
        graders.shutdown()
    assert info["pairs"] + info["skips"] == info["prompts"] == killed.data.arithmetic.n_train
    for out in ("graded", "pairs", "skips"):
        a = pq.read_table(tmp_path / "clean" / "round-001" / out)
        assert pq.read_table(tmp_path / "killed" / "round-001" / out).equals(a), out


def test_a_reference_actor_killed_mid_stage_gives_the_log_probs_an_undisturbed_one_gives(
        ray_session, tiny_cfg_factory, tiny_policy, arithmetic_pairs, failpoints):
    """The RefLogp actor SIGKILLed in its second batch: Ray restarts it, the restarted actor loads
    the reference again and the batch is retried, so every pair gets the reference log-probs an
    undisturbed pool computes, none lost or doubled."""
    import numpy as np
    import pyarrow as pa
    import ray

    from actors.ref_logp import ReferencePool

    cfg = tiny_cfg_factory("train.reference.batch_size=16")  # 48 pairs: three batches
    pairs = pq.read_table(Path(arithmetic_pairs) / "pairs.parquet")

    def with_ref_logps() -> pa.Table:
        pool = ReferencePool(cfg, tiny_policy)
        try:
            ds = pool.stage(ray.data.from_arrow(pairs), tiny_policy, streamed=False)
            return pa.concat_tables(ray.get(ds.to_arrow_refs())).sort_by("prompt_id")
        finally:
            pool.shutdown()

    clean = with_ref_logps()
    arm(failpoints, "ref_logp.logps", hit=2)
    killed = with_ref_logps()
    assert fired(failpoints, "ref_logp.logps"), "nothing was tested"
    assert killed.column("prompt_id").to_pylist() == sorted(pairs.column("prompt_id").to_pylist())
    for col in ("ref_chosen_logp", "ref_rejected_logp"):
        np.testing.assert_allclose(killed.column(col).to_numpy(), clean.column(col).to_numpy(), rtol=1e-9)
        assert np.all(clean.column(col).to_numpy() < 0)
