"""run.overlap=streaming on the real stack: vLLM samplers, graders and two DeepSpeed workers in one
Ray Data pipeline, writing what a staged round writes."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from wpo_ray import contracts

pytestmark = pytest.mark.integration


def test_streaming_round_trains_while_sampling_and_records_a_staged_rounds_outputs(tiny_cfg_factory, tiny_policy,
                                                                                   vllm_pool, grader_pool, failpoints,
                                                                                   tmp_path):
    from wpo_ray.rundir import checkpoint_has_policy, ledger_file
    from wpo_ray.train_plan import optimizer_steps
    from pipeline.sampling import run_sampling
    from pipeline.streaming import run_round_streaming
    from wpo_ray.failpoints import arm, fired
    from wpo_ray.rundir import RunDir

    # Reference log-probs from the RefLogp actor stage inside the stream (the default), one
    # sampling batch's pairs at a time: a stage that waited for a full batch of its own would hold
    # the pairs back until sampling ended, and nothing would overlap. Batches of 4 prompts; the
    # engine holds its 7th batch until the trainers have taken their first optimizer step (rank 0
    # writes metrics.jsonl). They can only if they train on the 24 prompts' pairs sampled before
    # it while sampling is unfinished; a pipeline that trained after sampling would never get
    # there (the failpoint gives up after failpoints.UNTIL_MAX_S, and the test fails).
    cfg = tiny_cfg_factory("run.overlap=streaming", "sampling.batch_size=4", run_dir=tmp_path / "streamed")
    run = RunDir(cfg)
    rd = tmp_path / "streamed" / "round-001"
    arm(failpoints, "sampler.sample", hit=7, action=f"until:{rd / 'train' / 'metrics.jsonl'}")
    info = run_round_streaming(cfg, run, 1, tiny_policy, tiny_policy, vllm_pool, run.output(1, "checkpoint"))
    assert fired(failpoints, "sampler.sample")
    assert (failpoints / "sampler.sample.fired").read_text().splitlines()[-1] == "until: met"

    # The round's outputs and manifest are a staged round's: contracts, accounting, recorded stages.
    for stage in ("samples", "graded", "pairs", "skips"):
        contracts.validate(pq.read_table(rd / stage), stage, source=stage)
        assert run.done(1, stage if stage != "skips" else "pairs")
    pairs, skips = pq.read_table(rd / "pairs"), pq.read_table(rd / "skips")
    assert pairs.num_rows + skips.num_rows == cfg.data.arithmetic.n_train == run.done(1, "pairs")["prompts"]
    assert pairs.column("prompt_id").to_pylist() == sorted(pairs.column("prompt_id").to_pylist())
    assert not (rd / "stream.tmp").exists()

    # The same pairs as a staged round from the same policy and seed (per-prompt seeds).
    staged_cfg = tiny_cfg_factory(run_dir=tmp_path / "staged")
    run_sampling(staged_cfg, RunDir(staged_cfg), 1, tiny_policy, pool=vllm_pool, graders=grader_pool)
    assert pairs.equals(pq.read_table(tmp_path / "staged" / "round-001" / "pairs"))

    # Training used the stream: the steps its pairs allow, each applied pair a distinct pair of the round.
    assert info["steps"] == optimizer_steps(pairs.num_rows, cfg) > 0 and info["pairs"] == pairs.num_rows
    applied = [i for r in range(2) for i in json.loads((rd / "checkpoint" / ledger_file(r)).read_text())]
    assert len(applied) == len(set(applied)) == info["steps"] * 2 * cfg.train.micro_batch_size
    assert set(applied) <= set(pairs.column("prompt_id").to_pylist())
    assert checkpoint_has_policy(rd / "checkpoint")
    m = [json.loads(x) for x in (rd / "train" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [x["step"] for x in m] == list(range(1, info["steps"] + 1))
    # Overlap, measured: optimizer steps ran while the sampler was still sampling.
    assert info["overlap_seconds"] > 0, info


def test_streamed_rounds_share_one_trainer_group_and_a_worker_killed_mid_stream_retrains_the_round_once(
        tiny_cfg_factory, tiny_policy, vllm_pool, grader_pool, failpoints, tmp_path):
    """Two streamed rounds on one trainer group (the main job's `run.trainers: persistent`): the
    workers started for round 1 train round 2 from its stream, round 2 samples round 1's policy
    (handed over from the trainers' memory), and a worker SIGKILLed in round 2's stream brings the
    group back on a fresh split of the stream: the round ends with each of its pairs applied once,
    the pairs a staged round draws from the same policy."""
    from pipeline.sampling import run_sampling
    from pipeline.streaming import run_round_streaming
    from pipeline.training import TrainerGroup
    from wpo_ray.failpoints import arm, fired
    from wpo_ray.rundir import RunDir, ledger_file
    from wpo_ray.train_plan import optimizer_steps

    cfg = tiny_cfg_factory("run.overlap=streaming", "sampling.batch_size=4", run_dir=tmp_path / "streamed")
    run = RunDir(cfg)
    group = TrainerGroup(cfg, run.trainers_dir)
    try:
        info1 = run_round_streaming(cfg, run, 1, tiny_policy, tiny_policy, vllm_pool, run.output(1, "checkpoint"),
                                    graders=grader_pool, group=group)
        policy1 = str(run.output(1, "checkpoint") / "policy")
        assert vllm_pool.load_weights(policy1, weights=group.weights(1)) == ["in_memory"]
        arm(failpoints, "train.micro_step", hit=2)  # the first rank to reach round 2's second micro-batch dies
        info2 = run_round_streaming(cfg, run, 2, policy1, tiny_policy, vllm_pool, run.output(2, "checkpoint"),
                                    graders=grader_pool, group=group)
        assert fired(failpoints, "train.micro_step"), "the failpoint never fired: nothing was tested"

        # No round started a group of its own: both rounds' checkpoints are the run's group's.
        kept = {p.name for p in (run.trainers_dir / "ray_train").iterdir()}
        assert {"round-001-final", "round-002-final"} <= kept, kept
        assert not any((run.train_dir(r) / "ray_train").exists() for r in (1, 2))

        pairs2 = pq.read_table(run.round_dir(2) / "pairs")
        staged_cfg = tiny_cfg_factory(run_dir=tmp_path / "staged")
        vllm_pool.load_weights(policy1)
        run_sampling(staged_cfg, RunDir(staged_cfg), 2, policy1, pool=vllm_pool, graders=grader_pool)
        assert pairs2.equals(pq.read_table(tmp_path / "staged" / "round-002" / "pairs"))
        assert not pairs2.equals(pq.read_table(run.round_dir(1) / "pairs"))  # round 2 sampled a new policy
    finally:
        group.close()
        vllm_pool.load_weights(tiny_policy)  # the shared engine as the other tests expect it

    ids = pairs2.column("prompt_id").to_pylist()
    applied = [i for r in range(2) for i in json.loads((run.output(2, "checkpoint") / ledger_file(r)).read_text())]
    assert info2["steps"] == optimizer_steps(len(ids), cfg) > 1 and info1["steps"] > 0
    assert len(applied) == len(set(applied)) == info2["steps"] * 2 * cfg.train.micro_batch_size
    assert set(applied) <= set(ids)
    m = [json.loads(x) for x in (run.train_dir(2) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [x["step"] for x in m] == list(range(1, info2["steps"] + 1))
