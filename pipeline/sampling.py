"""The first half of a round: prompts → samples → graded → pairs + skips, as Parquet.

Each stage reads the previous stage's Parquet with Ray Data, maps it over an actor pool, and
writes its own output through the run directory's stage protocol (`RunDir.stage`). Rows stream
through the actors; the driver never holds a stage's data.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from wpo_ray import contracts
from wpo_ray.cluster import data_context
from wpo_ray.config import Config
from wpo_ray.pairing import pairs_and_skips_batch, split_pairs_and_skips
from wpo_ray.rundir import RunDir

log = logging.getLogger(__name__)


def count_rows(path: Path) -> int:
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def write_parquet(ds, out: Path, schema: pa.Schema) -> int:
    """Write a Ray dataset as Parquet into the directory `out`; returns its rows. An empty dataset
    still gets a file, so the stage's schema can be read back."""
    ds.write_parquet(str(out))
    out.mkdir(parents=True, exist_ok=True)  # an empty dataset writes no file
    if not any(out.glob("*.parquet")):
        pq.write_table(schema.empty_table(), out / "empty.parquet")
    return count_rows(out)


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


def prompts_stage(cfg: Config, run: RunDir, r: int, policy_path: str) -> int:
    """The round's prompts (and the loader's bad rows, as skips); returns the good prompt rows."""
    from wpo_ray.prompts import check_template_fits, load_prompts, round_prompts, split_too_long
    from wpo_ray.train_plan import prompt_token_limit

    def produce(out) -> dict:
        limit = prompt_token_limit(cfg)
        tokenizer = None
        if cfg.data.chat_template or limit is not None:  # the policy's own template and token counts
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(policy_path, trust_remote_code=cfg.model.trust_remote_code)
            if cfg.data.chat_template and limit is not None:
                check_template_fits(tokenizer, limit)
        prompts, bad = round_prompts(*load_prompts(cfg.data, "train", tokenizer=tokenizer if cfg.data.chat_template
                                                   else None), cfg.data, cfg.run.rounds, r)
        bad = bad.set_column(bad.schema.get_field_index("round"), "round", pa.array([r] * len(bad), pa.int32()))
        if bad.num_rows:
            log.info("[round %d] %d bad input row(s) recorded as skips (data.on_bad_row=skip)", r, len(bad))
        if limit is not None:
            prompts, too_long = split_too_long(prompts, tokenizer, limit, r)
            if too_long:
                log.info("[round %d] %d prompt(s) longer than %d tokens recorded as too_long skips", r,
                         len(too_long), limit)
                bad = pa.concat_tables([bad, contracts.from_rows(too_long, "skips").cast(bad.schema)])
        tmp = out("prompts")
        tmp.mkdir(parents=True)
        pq.write_table(prompts, tmp / "prompts.parquet")
        pq.write_table(contracts.validate(bad, "skips", "bad rows"), tmp / "bad_rows.parquet")
        return {"rows": len(prompts), "bad_rows": len(bad)}

    return run.stage(r, "prompts", produce)["rows"]


def length_check(cfg: Config, policy_path: str):
    """What the pairing stage asks of each pair: does it fit train.max_length (a `too_long` skip if not)."""
    from wpo_ray.batching import LengthCheck
    from wpo_ray.train_plan import train_max_length

    return LengthCheck(policy_path, train_max_length(cfg), cfg.model.trust_remote_code)


def pairs_stage(run: RunDir, r: int, source) -> dict:
    """Write the round's pairs and skips, `source()` -> (pairs, skips) Ray datasets, sorted by
    prompt_id so the files do not depend on the order actors finished in; check that every prompt
    became one of them."""

    def produce(out) -> dict:
        pairs, skips = source()
        n_pairs = write_parquet(pairs.sort("prompt_id"), out("pairs"), contracts.PAIRS)
        write_parquet(skips.sort("prompt_id"), out("skips"), contracts.SKIPS)
        pq.write_table(pq.read_table(run.output(r, "prompts") / "bad_rows.parquet"), out("skips") / "bad_rows.parquet")
        n_skips = count_rows(out("skips"))
        prompts = run.done(r, "prompts")
        n_in = prompts["rows"] + prompts["bad_rows"]
        contracts.check_accounting(r, n_in, n_pairs, n_skips)
        reasons = pq.read_table(out("skips"), columns=["reason"]).column("reason").value_counts().to_pylist()
        return dict(pairs=n_pairs, skips=n_skips, prompts=n_in,
                    skip_reasons={d["values"]: d["counts"] for d in reasons})

    info = run.stage(r, "pairs", produce, outputs=("pairs", "skips"))
    log.info("[round %d] %d prompts -> %d pairs + %d skips %s", r, info["prompts"], info["pairs"], info["skips"],
             info["skip_reasons"])
    return info


def run_sampling(cfg: Config, run: RunDir, r: int, policy_path: str, pool=None) -> dict:
    """Run (or resume) the sampling half of round r with the policy at `policy_path`.

    `pool` is the run's SamplerPool (engines kept across rounds); one is started when needed if
    none is given. Returns the round's pair/skip accounting.
    """
    import ray.data

    data_context()
    s = cfg.sampling
    n_prompts = prompts_stage(cfg, run, r, policy_path)

    def samples(out) -> dict:
        nonlocal pool
        log.info("[round %d] sampling %d prompts x %d with %d %s engine(s)", r, n_prompts, s.n, s.num_actors,
                 s.backend)
        if pool is None:
            from actors.sampler import SamplerPool

            pool = SamplerPool(cfg, policy_path)
        pool.load_weights(policy_path)
        ds = sample_stage(ray.data.read_parquet(str(run.output(r, "prompts") / "prompts.parquet")), cfg, pool, r,
                          policy_path)
        return dict(rows=write_parquet(ds, out("samples"), contracts.SAMPLES), policy=policy_path, backend=s.backend,
                    placement={"samplers": pool.placement})

    def graded(out) -> dict:
        ds = grade_stage(ray.data.read_parquet(str(run.output(r, "samples"))), cfg)
        return dict(rows=write_parquet(ds, out("graded"), contracts.GRADED))

    def pairs_and_skips():
        # One pairing pass over the graded table, kept in the object store (not the driver) and
        # split into the two outputs.
        both = ray.data.read_parquet(str(run.output(r, "graded"))).map_batches(
            pairs_and_skips_batch, fn_kwargs=dict(round=r, weighting=cfg.weighting, too_long=length_check(cfg, policy_path)),
            batch_format="pyarrow", batch_size=s.batch_size).materialize()
        return tuple(both.map_batches(lambda t, i=i: split_pairs_and_skips(t)[i], batch_format="pyarrow")
                     for i in (0, 1))

    run.stage(r, "samples", samples)
    run.stage(r, "graded", graded)
    return pairs_stage(run, r, pairs_and_skips)
