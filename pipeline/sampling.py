"""The first half of a round: prompts → samples → graded → pairs + skips, as Parquet.

Each stage reads the previous stage's Parquet with Ray Data, maps it over an actor pool, and
writes its own output through the run directory's stage protocol (`RunDir.stage`); sampling,
grading and pairing share one execution (the grader actors grade and pair each batch as it is
sampled) and record three stages. Rows stream
through the actors; the driver never holds a stage's data.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from wpo_ray import contracts
from wpo_ray.cluster import data_context
from wpo_ray.config import Config
from wpo_ray.pairing import GRADED_AND_OUTCOMES, PAIRS_AND_SKIPS, split_outcomes, split_pairs_and_skips
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
    """prompts → samples through the pool's engines: thin tasks (no CPU reserved), one batch in
    flight per engine; the engines hold the resources."""
    from actors.stages import proxy_tasks, sample_batch

    s = cfg.sampling
    return ds.map_batches(
        sample_batch, fn_kwargs=dict(engines=pool.engines, round_idx=r, run_seed=cfg.run.seed, policy=policy_path,
                                     failover_timeout_s=s.failover_timeout_s),
        batch_size=s.batch_size, batch_format="pyarrow", num_cpus=0, compute=proxy_tasks(s.num_actors))


def ordered_files(path: Path, key: str = "prompt_id", reorder: bool = False) -> list[str] | None:
    """The non-empty Parquet files of directory `path` such that reading them one after another
    gives rows in strictly increasing `key` order: in name order (the order Ray Data reads a
    directory in), or with `reorder` in the order of their first keys. None when no such order
    exists (a file not sorted inside, or two files' key ranges overlapping). Reads only the `key`
    column, one file at a time."""
    import pyarrow.compute as pc

    spans = []
    for f in sorted(path.glob("*.parquet")):
        col = pq.read_table(f, columns=[key]).column(key)
        if len(col) == 0:
            continue
        if len(col) > 1 and not pc.all(pc.less(col.slice(0, len(col) - 1), col.slice(1))).as_py():
            return None
        spans.append((col[0].as_py(), col[-1].as_py(), str(f)))
    if reorder:
        spans.sort()
    if any(prev[1] >= nxt[0] for prev, nxt in zip(spans, spans[1:])):
        return None
    return [f for _, _, f in spans]


def write_in_order(ds, out: Path, schema: pa.Schema, key: str = "prompt_id") -> int:
    """`write_parquet`, with the rows in `key` order in the directory's file order, so the files do
    not depend on the order actors finished in. A dataset read from ordered inputs through Ray Data
    (which keeps the order: `data_context`) is written as it comes; anything else is sorted first,
    a shuffle of the whole dataset."""
    n = write_parquet(ds, out, schema)
    if ordered_files(out, key) is None:
        log.info("[stage] %s: rows not in %s order; sorting them", out.name, key)
        shutil.rmtree(out)
        n = write_parquet(ds.sort(key), out, schema)
    return n


def read_in_order(path: Path, key: str = "prompt_id"):
    """A Ray dataset of the Parquet files in `path`, rows in `key` order: the files read in the order
    of their key ranges when those do not overlap (no shuffle), else sorted. For files written in
    no particular order (a streamed round's parts); a stage's own output needs none of this."""
    import ray.data

    files = ordered_files(path, key, reorder=True)
    if files is None:
        return ray.data.read_parquet(str(path)).sort(key)
    return ray.data.read_parquet(files or str(path))  # (no rows at all: the directory, for its schema)


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
        # In prompt_id order: every later stage keeps it, so no stage has to sort its output.
        prompts = prompts.sort_by("prompt_id")
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


def split_files(src: Path, split: Callable[[pa.Table], tuple[pa.Table, ...]], outs: list[tuple[Path, pa.Schema]]) -> None:
    """Split each Parquet file of `src` (a stage's scratch output, in prompt_id order) with
    `split` into one table per `(directory, schema)` of `outs`, written under the file's own name,
    so that name order stays prompt_id order. The driver holds one file's rows at a time."""
    for d, _ in outs:
        d.mkdir(parents=True)
    for f in ordered_files(src) or []:
        for table, (d, _) in zip(split(pq.read_table(f)), outs):
            if table.num_rows:
                pq.write_table(table, d / Path(f).name)
    for d, schema in outs:
        if not any(d.glob("*.parquet")):  # its schema, readable with no rows
            pq.write_table(schema.empty_table(), d / "empty.parquet")


def write_pairs_and_skips(both, pairs_out: Path, skips_out: Path) -> None:
    """Write a PAIRS_AND_SKIPS Ray dataset as the round's pairs and skips, in prompt_id order, with
    one Ray Data execution: the combined rows go to a scratch directory, then each of its files is
    split in two."""
    scratch = pairs_out.with_name("pairs-and-skips.tmp")  # (*.tmp: a crash leaves nothing a rerun keeps)
    shutil.rmtree(scratch, ignore_errors=True)
    write_in_order(both, scratch, PAIRS_AND_SKIPS)
    split_files(scratch, split_pairs_and_skips, [(pairs_out, contracts.PAIRS), (skips_out, contracts.SKIPS)])
    shutil.rmtree(scratch)


def pairs_stage(run: RunDir, r: int, write: Callable[[Path, Path], None]) -> dict:
    """Write the round's pairs and skips, `write(pairs_dir, skips_dir)` writing them in prompt_id
    order; check that every prompt became one of them."""

    def produce(out) -> dict:
        write(out("pairs"), out("skips"))
        n_pairs = count_rows(out("pairs"))
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


def run_sampling(cfg: Config, run: RunDir, r: int, policy_path: str, pool=None, graders=None,
                 after_samples: Callable[[], None] | None = None, reference=None) -> dict:
    """Run (or resume) the sampling half of round r with the policy at `policy_path`.

    `pool` is the run's SamplerPool and `graders` its GraderPool (both kept across rounds); what is
    not given is started when needed and shut down on return. `after_samples` is called once the
    samples are recorded (the engines are idle from then on). `reference` = (running
    ReferencePool, reference model path, [object ref of its weights] or None): the pairs get their
    reference log-probs in the execution that grades and pairs them, so the training stage needs no
    execution of its own for them; with the weights, a new reference comes from the trainers'
    memory instead of its checkpoint.
    Returns the round's pair/skip accounting.
    """
    import ray.data

    data_context()
    s = cfg.sampling
    n_prompts = prompts_stage(cfg, run, r, policy_path)
    own_pool, own_graders = pool is None, graders is None

    def grader_pool():
        nonlocal graders
        if graders is None:
            from actors.grader import GraderPool

            graders = GraderPool(cfg)
        return graders

    # Sampling, grading, pairing (and, with `reference`, the reference log-probs) are one Ray Data
    # execution: each batch is graded and paired as soon as it is sampled, beside the next batch's
    # sampling, instead of in executions of their own after it (an execution's start costs as much
    # as a tiny round's grading). Its rows, graded rows with their pair or skip, go to a scratch
    # directory that the samples, graded and pairs stages then split into their outputs.
    fused = run.round_dir(r) / "graded-and-outcomes.tmp"
    fused_here = False  # written by this call (a resumed stage works from the recorded outputs)

    def grade_and_pair(ds):
        ds = grader_pool().grade_and_pair_stage(ds, r, cfg.weighting, length_check(cfg, policy_path))
        return ds if reference is None else reference[0].outcomes_stage(ds, reference[1], reference[2])

    def write_fused(ds) -> None:
        nonlocal fused_here
        shutil.rmtree(fused, ignore_errors=True)
        write_in_order(ds, fused, GRADED_AND_OUTCOMES)
        fused_here = True

    def samples(out) -> dict:
        nonlocal pool
        log.info("[round %d] sampling %d prompts x %d with %d %s engine(s), grading and pairing as they come", r,
                 n_prompts, s.n, s.num_actors, s.backend)
        if pool is None:
            from actors.sampler import SamplerPool

            pool = SamplerPool(cfg, policy_path)
        pool.load_weights(policy_path)
        write_fused(grade_and_pair(sample_stage(
            ray.data.read_parquet(str(run.output(r, "prompts") / "prompts.parquet")), cfg, pool, r, policy_path)))
        if reference is not None and reference[2] is not None:  # the trainers handed this reference over
            came = [how for held, how in reference[0].holding() if held == reference[1]]
            log.info("[round %d] the reference %s reached %d RefLogp actor(s), %d of them from the trainers' memory",
                     r, reference[1], len(came), came.count("memory"))
        split_files(fused, lambda t: (split_outcomes(t)[0].select(contracts.SAMPLES.names).cast(contracts.SAMPLES),),
                    [(out("samples"), contracts.SAMPLES)])
        return dict(rows=count_rows(out("samples")), policy=policy_path, backend=s.backend,
                    placement={"samplers": pool.placement})

    def graded(out) -> dict:
        if not fused_here:  # samples recorded before a restart: grade and pair them now
            # A stage's own output is in order already (write_in_order): read as Ray Data lists it.
            write_fused(grade_and_pair(ray.data.read_parquet(str(run.output(r, "samples")))))
        split_files(fused, lambda t: split_outcomes(t)[:1], [(out("graded"), contracts.GRADED)])
        return dict(rows=count_rows(out("graded")))

    def pairs_and_skips(pairs_out: Path, skips_out: Path) -> None:
        if fused_here:
            split_files(fused, lambda t: split_outcomes(t)[1:], [(pairs_out, contracts.PAIRS),
                                                                  (skips_out, contracts.SKIPS)])
            if reference is not None:
                log.info("[round %d] the pairs' reference log-probs came with them (%s)", r, reference[1])
        else:
            both = grader_pool().pair_stage(ray.data.read_parquet(str(run.output(r, "graded"))), r, cfg.weighting,
                                            length_check(cfg, policy_path))
            write_pairs_and_skips(both, pairs_out, skips_out)
        shutil.rmtree(fused, ignore_errors=True)

    try:
        run.stage(r, "samples", samples)
        if after_samples is not None:
            after_samples()
        run.stage(r, "graded", graded)
        return pairs_stage(run, r, pairs_and_skips)
    finally:  # what this call started, it stops (their CPUs are held until then)
        if own_graders and graders is not None:
            graders.shutdown()
        if own_pool and pool is not None:
            pool.shutdown()
