"""The first half of a round (DESIGN §2): prompts → samples → graded → pairs + skips, as Parquet.

Each stage reads the previous stage's Parquet with Ray Data, maps it over an actor pool, and writes
its own Parquet under a temporary name that is renamed into place and then recorded in the
manifest. Rows stream through the actors; the driver never holds a stage's data.

    python -m jobs.sample --config configs/tiny-cpu.yaml [key=value ...]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from wpo_ray import contracts
from wpo_ray.cluster import data_context
from wpo_ray.config import Config
from wpo_ray.rundir import RunDir


class AccountingError(RuntimeError):
    """#prompts in != #pairs + #skips: something was lost or duplicated."""


def check_accounting(r: int, n_in: int, n_pairs: int, n_skips: int) -> None:
    if n_in != n_pairs + n_skips:
        raise AccountingError(
            f"round {r}: {n_in} prompts in but {n_pairs} pairs + {n_skips} skips out; refusing to continue"
        )


def count_rows(path: Path) -> int:
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def _write(ds, run: RunDir, r: int, name: str, schema: pa.Schema) -> int:
    final, tmp = run.stage_output(r, name)
    ds.write_parquet(str(tmp))
    tmp.mkdir(parents=True, exist_ok=True)  # an empty dataset writes no file
    if not any(tmp.glob("*.parquet")):
        pq.write_table(schema.empty_table(), tmp / "empty.parquet")
    RunDir.commit(tmp, final)
    return count_rows(final)


def stage_prompts(cfg: Config, run: RunDir, r: int, tokenizer=None, log=print) -> dict:
    from wpo_ray.prompts import load_prompts

    prompts, bad = load_prompts(cfg.data, "train", tokenizer=tokenizer)
    final, tmp = run.stage_output(r, "prompts")
    tmp.mkdir(parents=True)
    pq.write_table(prompts, tmp / "prompts.parquet")
    bad = bad.set_column(bad.schema.get_field_index("round"), "round", pa.array([r] * len(bad), pa.int32()))
    pq.write_table(contracts.validate(bad, "skips", "bad rows"), tmp / "bad_rows.parquet")
    RunDir.commit(tmp, final)
    info = {"rows": len(prompts), "bad_rows": len(bad)}
    if bad.num_rows:
        log(f"[round {r}] {len(bad)} bad input row(s) recorded as skips (data.on_bad_row=skip)")
    return info


def commit_pairs(run: RunDir, r: int, pairs, skips, t0: float) -> None:
    """Write the round's pairs and skips (Ray datasets) sorted by prompt_id, so the files do not
    depend on the order actors finished in; check that every prompt became one of them; record."""
    rd = run.round_dir(r)
    n_pairs = _write(pairs.sort("prompt_id"), run, r, "pairs", contracts.PAIRS)
    final, tmp = run.stage_output(r, "skips")
    skips.sort("prompt_id").write_parquet(str(tmp))
    tmp.mkdir(parents=True, exist_ok=True)
    pq.write_table(pq.read_table(rd / "prompts" / "bad_rows.parquet"), tmp / "bad_rows.parquet")
    RunDir.commit(tmp, final)
    n_skips = count_rows(final)
    prompts = run.done(r, "prompts")
    n_in = prompts["rows"] + prompts["bad_rows"]
    check_accounting(r, n_in, n_pairs, n_skips)
    reasons = pq.read_table(final, columns=["reason"]).column("reason").value_counts().to_pylist()
    run.mark_done(r, "pairs", pairs=n_pairs, skips=n_skips, prompts=n_in,
                  skip_reasons={d["values"]: d["counts"] for d in reasons}, seconds=round(time.time() - t0, 1))


def sample_stage(ds, cfg: Config, pool, r: int, policy_path: str):
    """prompts → samples through the pool's engines. The stage's actors are thin proxies (no CPU
    reserved); the engines hold the resources."""
    from actors.sampler import SampleBatch

    s = cfg.sampling
    return ds.map_batches(
        SampleBatch, fn_constructor_kwargs=dict(engines=pool.engines, round_idx=r, run_seed=cfg.run.seed,
                                             policy=policy_path, failover_timeout_s=s.failover_timeout_s),
        batch_size=s.batch_size, batch_format="pyarrow", concurrency=s.num_actors, num_cpus=0)


def grade_stage(ds, cfg: Config):
    """samples → graded on the GraderActor pool."""
    from actors.grader import GraderActor

    g = cfg.grading
    return ds.map_batches(GraderActor, fn_constructor_kwargs=dict(grader=g.grader, timeout_s=g.timeout_s),
                          batch_size=cfg.sampling.batch_size, batch_format="pyarrow", concurrency=g.num_actors,
                          num_cpus=1)


def ensure_prompts(cfg: Config, run: RunDir, r: int, policy_path: str, log=print) -> int:
    """The round's `prompts` stage (done once); returns the number of good prompt rows."""
    if not run.done(r, "prompts"):
        tokenizer = None
        if cfg.data.chat_template:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(policy_path, trust_remote_code=cfg.model.trust_remote_code)
        run.mark_done(r, "prompts", **stage_prompts(cfg, run, r, tokenizer, log))
    return run.done(r, "prompts")["rows"]


def run_sampling(cfg: Config, run: RunDir, r: int, policy_path: str, pool=None, log=print) -> dict:
    """Run (or resume) the sampling half of round r with the policy at `policy_path`.

    `pool` is the run's SamplerPool (engines kept across rounds); one is started when needed if
    none is given. Returns the round's pair/skip accounting.
    """
    import ray.data

    from actors.sampler import SamplerPool
    from wpo_ray.pairing import build_pairs

    data_context()
    rd = run.round_dir(r)
    s = cfg.sampling

    n_prompts = ensure_prompts(cfg, run, r, policy_path, log)

    if not run.done(r, "samples"):
        t0 = time.time()
        log(f"[round {r}] sampling {n_prompts} prompts x {s.n} with {s.num_actors} {s.backend} actor(s)")
        if pool is None:
            pool = SamplerPool(cfg, policy_path, log)
        pool.load_weights(policy_path, log)
        ds = sample_stage(ray.data.read_parquet(str(rd / "prompts" / "prompts.parquet")), cfg, pool, r, policy_path)
        rows = _write(ds, run, r, "samples", contracts.SAMPLES)
        run.mark_done(r, "samples", rows=rows, seconds=round(time.time() - t0, 1), policy=policy_path,
                      backend=s.backend)
    else:
        log(f"[round {r}] samples already done; not resampling")

    if not run.done(r, "graded"):
        t0 = time.time()
        rows = _write(grade_stage(ray.data.read_parquet(str(rd / "samples")), cfg), run, r, "graded", contracts.GRADED)
        run.mark_done(r, "graded", rows=rows, seconds=round(time.time() - t0, 1))

    if not run.done(r, "pairs"):
        t0 = time.time()
        w = cfg.weighting
        # Pairing is pure and cheap: read the graded table twice rather than hold it.
        graded = lambda: ray.data.read_parquet(str(rd / "graded"))  # noqa: E731
        # Sorted by prompt_id: the persisted pairs do not depend on the order actors finished in,
        # so the same seed gives identical files.
        pairs = graded().map_batches(lambda b: build_pairs(b, r, w)[0], batch_format="pyarrow",
                                     batch_size=s.batch_size)
        skips = graded().map_batches(lambda b: build_pairs(b, r, w)[1], batch_format="pyarrow",
                                     batch_size=s.batch_size)
        commit_pairs(run, r, pairs, skips, t0)
    info = run.done(r, "pairs")
    log(f"[round {r}] {info['prompts']} prompts -> {info['pairs']} pairs + {info['skips']} skips "
        f"{info['skip_reasons']}")
    return info


def main(argv: list[str] | None = None) -> int:
    from wpo_ray.cli import main as cli_main

    return cli_main(["sample", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
