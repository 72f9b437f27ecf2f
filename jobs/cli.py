"""`wpo-ray` command line: run | bootstrap | sample | train | eval | report | plan | export.

Every verb takes a YAML config and dotted overrides: `wpo-ray run configs/tiny-cpu.yaml train.loss.beta=0.2`.
The `jobs/<verb>.py` entry points (for `ray job submit`) call `main` with their verb.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wpo-ray", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.add_argument("config", nargs="?", help="YAML config (default: built-in defaults)")
        sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.loss.beta=0.2")
        sp.add_argument("--config", dest="config_opt", metavar="PATH", help="same as the positional config")
        sp.add_argument("-v", "--verbose", action="store_true",
                        help="Ray's own logs and every worker's output on the console too (same as ray.verbose=true)")
        return sp

    verb("run", "iterative rounds end to end: bootstrap if needed, sample, grade, pair, train, evaluate").add_argument(
        "--fresh", action="store_true", help="delete the run directory and start over")
    verb("bootstrap", "SFT the built-in tiny policy on the arithmetic task (cached)").add_argument(
        "--force", action="store_true", help="retrain even if cached")
    verb("sample", "the sampling half of one round: prompts -> samples -> graded -> pairs + skips").add_argument(
        "--round", type=int, default=1, help="round number (default 1)")
    tr = verb("train", "train on a pairs directory (ours, or a TRL-format preference dataset)")
    tr.add_argument("--pairs", required=True, help="directory or file of pairs (Parquet / JSONL)")
    tr.add_argument("--output", help="checkpoint directory (default: <run.dir>/train)")
    ev = verb("eval", "greedy accuracy and maj@N of a policy on the test split")
    ev.add_argument("--model", help="policy directory (default: the config's initial policy)")
    verb("report", "write report.html + PNGs for a run directory")
    pl = verb("plan", "print what the run asks Ray for, per role, and check that a cluster can hold it")
    pl.add_argument("--cluster", metavar="YAML", help="a KubeRay RayCluster or RayJob manifest")
    pl.add_argument("--nodes", type=int, help="a cluster of N identical nodes (with --gpus-per-node)")
    pl.add_argument("--gpus-per-node", type=float, default=None)
    pl.add_argument("--cpus-per-node", type=float, default=None, help="default: 8 per GPU, at least 8")
    pl.add_argument("--params", type=float, help="the policy's parameter count, e.g. 7.6e9 (default: read "
                    "from model.path/config.json)")
    pl.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (default 80)")
    ex = verb("export", "write a round's pairs (of run.dir) as a dataset for another trainer")
    ex.add_argument("--round", type=int, required=True, help="the round whose pairs to export")
    ex.add_argument("--format", choices=["trl"], default="trl", help="trl: prompt/chosen/rejected Parquet")
    ex.add_argument("--output", help="directory (default: <run.dir>/export/round-NNN-trl)")
    return p


def _split_config(args) -> tuple[str | None, list[str]]:
    config, overrides = args.config_opt or args.config, list(args.overrides)
    if args.config_opt and args.config:  # positional slot then holds the first override
        overrides.insert(0, args.config)
    if config and "=" in config and not config.endswith((".yaml", ".yml")):
        overrides.insert(0, config)
        config = None
    return config, overrides


def main(argv: list[str] | None = None) -> int:
    import os

    from wpo_ray.config import ConfigError, load_config
    from wpo_ray.logs import add_log_file, setup_console
    from wpo_ray.rundir import RunLayout

    args = _parser().parse_args(argv)
    config, overrides = _split_config(args)
    if args.verbose:
        overrides.append("ray.verbose=true")
    try:
        cfg = load_config(config, overrides)
    except ConfigError as e:
        print(f"wpo-ray: {e}", file=sys.stderr)
        return 2
    if not cfg.model.allow_download:
        # No network at run time: transformers must never try the hub (inherited by Ray's processes).
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    setup_console(cfg.ray.verbose)
    try:
        run = preflight(args, cfg)
        if args.verb not in ("report", "plan", "export"):
            add_log_file(RunLayout(cfg.run.dir).log_file)
        return _dispatch(args, cfg, run)
    except KeyboardInterrupt:
        print("wpo-ray: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"wpo-ray {args.verb}: error: {e}", file=sys.stderr)
        return 1


def check_prompt_data(cfg, splits: tuple[str, ...]) -> None:
    """Read the prompt data of `splits` once before any engine, Ray or bootstrap starts.

    Loading prompts is pure and cheap, while the stages that load them run after Ray and vLLM are
    up; checking first makes bad data fail in seconds, naming its file and line, before any stage
    writes output. Chat templating needs the policy's tokenizer, so the stage checks it later.
    """
    if cfg.data.source == "arithmetic":  # generated in code: nothing to check
        return
    from pipeline.evaluation import eval_rows
    from wpo_ray.prompts import load_prompts

    plain = cfg.model_copy(update={"data": cfg.data.model_copy(update={"chat_template": False})})
    if "train" in splits:
        prompts, _ = load_prompts(plain.data, "train")
        cfg.data.round_window(prompts.num_rows, cfg.run.rounds, cfg.run.rounds)  # a pool big enough
    if "test" in splits:
        eval_rows(plain)  # the evaluation's own loader: also refuses a missing data.test_path
        if cfg.eval.dev:
            eval_rows(plain, split="dev")


def preflight(args, cfg):
    """Every cheap check of a verb's input, before the bootstrap, Ray or an engine starts.

    Bad prompt data, a policy directory that is missing or incomplete, a missing `--pairs`, a
    recorded round checkpoint damaged since: each fails here in seconds, naming the file, line or
    path, and nothing is written but (for run and sample) the run directory's config. Returns the
    opened run directory for run and sample (`--fresh` applied), else None.
    """
    from wpo_ray.bootstrap import check_model_source, check_policy_dir
    from wpo_ray.contracts import pairs_files
    from wpo_ray.rundir import RunDir, RunLayout

    run = None
    if args.verb == "plan":
        return None
    if args.verb == "export":
        layout = RunLayout(cfg.run.dir)
        stages = json.loads(layout.manifest_file.read_text())["stages"] if layout.manifest_file.is_file() else {}
        if f"{layout.round_name(args.round)}/pairs" not in stages:
            raise ValueError(f"run.dir {layout.path}: round {args.round} has no recorded pairs to export "
                             f"(recorded: {sorted(k for k in stages if k.endswith('/pairs')) or 'none'})")
        return None
    if args.verb == "train":
        pairs_files(Path(args.pairs))
    if args.verb == "sample":
        run = RunDir(cfg)
        if not run.done(args.round, "prompts"):
            check_prompt_data(cfg, ("train",))
    if args.verb == "eval":
        check_prompt_data(cfg, ("test",))
    if args.verb == "run":
        run = RunDir(cfg, fresh=args.fresh)
        rounds = range(1, cfg.run.rounds + 1)
        splits = ()
        if any(not run.done(r, "train") and not run.done(r, "prompts") for r in rounds):
            splits += ("train",)
        if any(not run.done(r, "eval") for r in (0, *rounds)):
            splits += ("test",)
        check_prompt_data(cfg, splits)
        for r in rounds:  # recorded, but may have been damaged since: fail here, not inside vLLM
            if run.done(r, "train"):
                check_policy_dir(run.policy_dir(r), f"round {r} checkpoint")
    if args.verb == "eval" and args.model:
        check_policy_dir(args.model, "--model")
    elif args.verb in ("run", "sample", "eval", "train"):
        check_model_source(cfg)  # a local directory checked; a hub id refused unless downloading is on
    return run


def _dispatch(args, cfg, run) -> int:
    """The verb's work, after `preflight` has checked its input."""
    from wpo_ray.bootstrap import resolve_policy, run_bootstrap
    from wpo_ray.cluster import init_ray

    if args.verb == "bootstrap":
        run_bootstrap(cfg, force=args.force)
        return 0
    if args.verb == "sample":
        from pipeline.sampling import run_sampling

        # Round N samples the policy round N - 1 trained (the initial one for round 1).
        prev = args.round - 1
        policy = str(run.policy_dir(prev)) if prev >= 1 and run.done(prev, "train") else resolve_policy(cfg)
        init_ray(cfg.ray)
        run_sampling(cfg, run, args.round, policy)
        return 0
    if args.verb == "eval":
        from pipeline.evaluation import run_eval

        result = run_eval(cfg, str(Path(args.model).absolute()) if args.model else resolve_policy(cfg))
        print(json.dumps(result, indent=2))
        return 0
    if args.verb == "train":
        from pipeline.training import run_training
        from wpo_ray.rundir import RunLayout, commit, temp_path

        policy = resolve_policy(cfg)
        init_ray(cfg.ray)
        out = (Path(args.output) if args.output else RunLayout(cfg.run.dir).train_verb_dir / "checkpoint").absolute()
        tmp = temp_path(out)  # `out` appears only complete
        run_training(cfg, args.pairs, tmp, policy, policy, out.parent)
        commit(tmp, out)
        log.info("[train] checkpoint: %s", out)
        return 0
    if args.verb == "run":
        from pipeline.round import run_rounds

        return run_rounds(cfg, run)
    if args.verb == "plan":
        return _plan(args, cfg)
    if args.verb == "export":
        from wpo_ray.export import export_trl
        from wpo_ray.rundir import RunLayout

        layout = RunLayout(cfg.run.dir)
        out = Path(args.output) if args.output else layout.path / "export" / f"{layout.round_name(args.round)}-trl"
        print(export_trl(layout.output(args.round, "pairs"), out))
        return 0
    if args.verb == "report":
        from wpo_ray.report import write_report

        print(write_report(cfg.run.dir))
        return 0
    raise AssertionError(args.verb)


def _plan(args, cfg) -> int:
    from wpo_ray.plan import PlanError, describe, load_cluster, nodes_from_counts

    if args.cluster and args.nodes:
        raise ValueError("give --cluster or --nodes, not both")
    if args.nodes is not None and args.gpus_per_node is None:
        raise ValueError("--nodes needs --gpus-per-node")
    nodes = (load_cluster(args.cluster) if args.cluster else
             nodes_from_counts(args.nodes, args.gpus_per_node, args.cpus_per_node) if args.nodes else None)
    try:
        print(describe(cfg, nodes, args.gpu_memory_gib, int(args.params) if args.params else None))
    except PlanError as e:
        print(f"wpo-ray plan: does not fit: {e}", file=sys.stderr)
        return 1
    return 0


def entry(verb: str):
    """`main` of a `jobs/<verb>.py` entry point: the CLI with that verb."""
    return lambda argv=None: main([verb, *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
