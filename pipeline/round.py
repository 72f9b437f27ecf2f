"""The main job, top to bottom: iterative weighted preference rounds, resumable, ending with a report.

    round 0:  evaluate the initial policy
    round r:  prompts → samples (vLLM engines) → graded → pairs + skips, weighted (grader actors)
              → reference log-probs (RefLogp actors; in the same execution when the pool is
              running) → DeepSpeed workers → checkpoint → evaluate;
              the engines take the new policy in place for round r + 1, from the trainers' memory
              (sampling.weight_handover=memory) or the checkpoint

With `eval.overlap` (the default) round r's evaluation waits until round r + 1 has drawn its
samples with the same policy, then runs on the otherwise idle engines while round r + 1 grades,
pairs and trains (`LazySamplers.defer`); it always finishes before the engines change policy.

Every stage goes through the run directory's stage protocol (`RunDir.stage`): a finished stage is
recorded in the manifest and never recomputed, so rerunning the same command resumes at the first
unfinished one. `run.overlap=streaming` runs a round's sampling half and training as one Ray Data
pipeline (pipeline/streaming.py); staged (the default) finishes the sampling half first.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Callable

from pipeline.evaluation import accuracy_table, eval_stage
from pipeline.sampling import run_sampling
from pipeline.streaming import run_round_streaming
from pipeline.training import run_training
from wpo_ray import colocation
from wpo_ray.config import Config
from wpo_ray.rundir import RunDir

log = logging.getLogger(__name__)


class LazySamplers:
    """The run's sampler engines, started on first use (a resumed run that only writes its report
    starts none) and shut down at the end; a pool handed in (a test's shared engine) is used as it
    is and left running. Under colocated placement it also keeps the engines' turns with the
    trainers: `before_training` puts them to sleep, and the next use wakes them with the new
    policy (wpo_ray/colocation.py says which engine calls, in which order)."""

    def __init__(self, cfg: Config, pool=None):
        self.cfg, self.pool, self.owned = cfg, pool, pool is None
        self.placement, self.asleep = cfg.run.placement, False
        self.offered = None  # (policy path, object ref of its weights): the trainer group's hand-over
        self.deferred = None  # (policy, job): work that needs the engines on `policy`, not started yet
        self.pending = None  # (policy, future): that work, running in the background
        if pool is not None:
            self._resolve_placement()

    def defer(self, policy: str, job: Callable[[], object]) -> None:
        """Run `job` (a round's evaluation of `policy`, the engines' current policy) when the
        engines are next idle (`engines_idle`: the next round has drawn its samples, with the same
        policy), in the background while that round grades, pairs and trains; at the latest before
        the engines change policy or go to sleep (`settle`)."""
        self.settle()
        self.deferred = (policy, job)

    def engines_idle(self) -> None:
        """The engines have nothing to do until the next hand-over: start the deferred job."""
        if self.deferred is not None:
            from concurrent.futures import ThreadPoolExecutor

            (policy, job), self.deferred = self.deferred, None
            executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deferred-eval")
            self.pending = (policy, executor.submit(job))
            executor.shutdown(wait=False)

    def settle(self) -> None:
        """Finish the deferred job: run it now if it has not started, else wait for it (its error
        is raised here)."""
        deferred, self.deferred = self.deferred, None
        if deferred is not None:
            deferred[1]()
        pending, self.pending = self.pending, None
        if pending is not None:
            pending[1].result()

    def _settle_unless(self, policy: str) -> None:
        held = self.pending or self.deferred
        if held is not None and held[0] != policy:
            self.settle()

    def offer(self, policy: str, weights) -> None:
        """The trainers hold `policy`'s weights in memory (`weights`, an object ref): the engines'
        next use of that policy loads them from there instead of from the checkpoint."""
        self.offered = (policy, weights) if weights is not None else None

    def __call__(self, policy: str):
        self._settle_unless(policy)  # deferred work needs the engines' current policy
        if self.pool is None:
            from actors.sampler import SamplerPool

            self.pool = SamplerPool(self.cfg, policy)
            self._resolve_placement()
        if self.asleep:  # a sleeping engine takes the new policy between its weights and its KV cache
            self._do(colocation.on_next_use(True, self.pool.model_path, policy), policy)
            self.asleep = False
        if self.offered is not None and self.offered[0] == policy:
            self.pool.load_weights(policy, weights=self.offered[1])
        self.offered = None
        return self.pool

    def before_training(self) -> None:
        steps = colocation.before_training(self.placement, self.pool is not None, self.asleep)
        if steps:  # a sleeping engine evaluates nothing: the deferred job finishes first
            self.settle()
        self._do(steps, None)
        self.asleep = self.asleep or "sleep" in steps

    def _resolve_placement(self) -> None:
        self.placement, fallback = colocation.effective_placement(self.cfg, self.pool.can_sleep, self.pool.why_not_sleep)
        if fallback:
            log.warning(fallback)

    def _do(self, steps: tuple[str, ...], policy) -> None:
        for step in steps:
            if step == "sleep":
                self.pool.sleep(colocation.SLEEP_LEVEL)
            elif step == "wake_weights":
                self.pool.wake_up(["weights"])
            elif step == "load_weights":
                self.pool.load_weights(policy)
            elif step == "wake_kv_cache":
                self.pool.wake_up(["kv_cache"])
            else:
                raise ValueError(f"unknown engine call {step!r}")

    def shutdown(self) -> None:
        """Stop the engines. A job not started yet is dropped (the run is ending on an error; the
        resumed run redoes it); a running one is waited for, so that it records its result."""
        self.deferred = None
        if self.pending is not None:
            log.info("[run] waiting for the evaluation of %s to finish", self.pending[0])
            try:
                self.settle()
            except Exception:  # noqa: BLE001 - the run already fails for another reason
                log.exception("[run] the background evaluation failed too")
        if self.pool is not None and self.owned:
            self.pool.shutdown()


class LazyGraders:
    """The run's grader actors (actors/grader.py), started on the first round that grades and kept
    for the rest of the run; a pool handed in (a test's shared one) is used and left running."""

    def __init__(self, cfg: Config, pool=None):
        self.cfg, self.pool, self.owned = cfg, pool, pool is None

    def __call__(self):
        if self.pool is None:
            from actors.grader import GraderPool

            self.pool = GraderPool(self.cfg)
            log.info("[run] %d grader(s) started for every round", len(self.pool.actors))
        return self.pool

    def shutdown(self) -> None:
        if self.pool is not None and self.owned:
            self.pool.shutdown()


class LazyTrainers:
    """The run's trainer group (pipeline/training.py), started when the run starts (if a round
    still trains: its start-up then runs beside round 0's evaluation and round 1's sampling) and
    kept for the rest of the run (`run.trainers: persistent`), staged and streamed rounds alike.
    None where each round starts its own: `run.trainers: per_round`, and colocated engines, which
    need the trainers' GPUs given back between rounds."""

    def __init__(self, cfg: Config, run: RunDir):
        self.cfg, self.run, self.group = cfg, run, None

    def __call__(self, placement: str):
        if self.cfg.run.trainers != "persistent" or placement != "separate":
            return None
        if self.group is None:
            from pipeline.training import TrainerGroup, claim_work_dir

            # Ray Train state another config left here is never resumed (the run dir refuses one anyway).
            claim_work_dir(self.run.trainers_dir, self.cfg, "", "", [])
            self.group = TrainerGroup(self.cfg, self.run.trainers_dir)
            log.info("[run] trainer group started: %d worker(s) for every round", self.cfg.train.num_workers)
        return self.group

    def start(self, placement: str, reference: str) -> None:
        """Start the group now, and the RefLogp pool its rounds need (on `reference`; each round's
        stage names its own), so that their start-ups overlap the work before the first training."""
        group = self(placement)
        t = self.cfg.train
        if group is not None and group.reference is None and t.loss.needs_reference and t.reference_logps == "precomputed":
            from actors.ref_logp import ReferencePool

            group.reference = ReferencePool(self.cfg, reference)  # stopped with the group

    def reference(self, path: str, r: int):
        """(the running RefLogp pool, `path`, [object ref of its weights] or None) for round r when
        the group has a pool up: a staged round's pairs then get their reference log-probs as they
        are paired (pipeline/sampling.py). None otherwise. The weights are round r − 1's, still held
        by the group until round r trains, when `path` is that round's policy (`run.reference:
        previous`); a resumed run has none and the pool reads the checkpoint."""
        if self.group is None or self.group.reference is None:
            return None
        weights = self.group.weights(r - 1) if r > 1 and path == str(self.run.policy_dir(r - 1)) else None
        return self.group.reference, path, None if weights is None else [weights]

    def close(self) -> None:
        if self.group is not None:
            self.group.close()


def train_round(cfg: Config, run: RunDir, r: int, policy: str, reference: str, samplers: LazySamplers,
                graders: LazyGraders, trainers: LazyTrainers) -> None:
    """Round r's sampling half and training, recorded as the `train` stage (its checkpoint)."""

    def produce(out) -> dict:
        if cfg.run.overlap == "streaming" and not run.done(r, "pairs"):
            samplers.settle()  # a streamed round keeps the engines busy until its training ends
            pool = samplers(policy)
            group = trainers(samplers.placement)
            info = run_round_streaming(cfg, run, r, policy, reference, pool, out("checkpoint"), graders=graders(),
                                       group=group)
        else:  # staged, or a streamed round whose pairs were recorded before its training was
            if not run.done(r, "pairs"):  # (a resumed round starts no engine it does not need)
                run_sampling(cfg, run, r, policy, pool=samplers(policy), graders=graders(),
                             after_samples=samplers.engines_idle, reference=trainers.reference(reference, r))
            samplers.engines_idle()  # (pairs recorded before a restart: the engines idle from here too)
            samplers.before_training()  # colocated: the engines give the trainers their GPUs
            group = trainers(samplers.placement)
            info = run_training(cfg, run.output(r, "pairs"), out("checkpoint"), policy, reference,
                                run.train_dir(r), group=group, round_idx=r)
        if group is not None:  # the engines take the new policy from the trainers' memory, not this checkpoint
            samplers.offer(str(run.policy_dir(r)), group.weights(r))
        return info

    run.stage(r, "train", produce, outputs=("checkpoint",))


def check_cluster(cfg: Config) -> None:
    """The resource plan (wpo_ray/plan.py) against the nodes Ray has now: a run the cluster cannot
    hold fails here, naming the role, not hours later when that role's actors wait forever."""
    import ray

    from wpo_ray.plan import check_fit, check_roles, nodes_from_ray, roles

    check_roles(cfg)
    check_fit(roles(cfg), nodes_from_ray(ray.nodes()))


def run_rounds(cfg: Config, run: RunDir, pool=None, graders=None) -> int:
    """Run (or resume) every round of `run`. `pool` / `graders`: a running SamplerPool and
    GraderPool to use (and leave running); by default the run starts its own."""
    from wpo_ray.bootstrap import resolve_policy
    from wpo_ray.cluster import init_ray

    t_start = time.time()
    log.info("[run] %s (%d round(s), loss %s, weighting %s, reference policy: %s, overlap: %s)", run.path,
             cfg.run.rounds, cfg.train.loss.base, cfg.weighting.scheme, cfg.run.reference, cfg.run.overlap)
    finished = run.done(0, "eval") and all(run.done(r, s) for r in range(1, cfg.run.rounds + 1) for s in ("train", "eval"))
    if finished:  # nothing to do: no Ray, no bootstrap, just the report again
        log.info("[run] every round is already recorded in %s", run.manifest_file)
        return _finish(cfg, run, t_start)
    init_ray(cfg.ray)
    check_cluster(cfg)
    initial = resolve_policy(cfg)
    samplers, graders, trainers = LazySamplers(cfg, pool), LazyGraders(cfg, graders), LazyTrainers(cfg, run)

    def evaluate(r: int, policy: str) -> None:
        if run.done(r, "eval"):
            return
        job = functools.partial(eval_stage, cfg, run, r, policy, samplers(policy))
        if cfg.eval.overlap and r < cfg.run.rounds:  # round r + 1 samples this policy first
            samplers.defer(policy, job)
        else:
            job()

    try:
        if any(not run.done(r, "train") for r in range(1, cfg.run.rounds + 1)):
            # The trainer group's and the RefLogp pool's start-ups (Ray Train's workers, DeepSpeed's
            # import, the reference model) run beside round 0's evaluation and round 1's sampling.
            samplers(initial)  # (the engines' placement decides whether the group lives for the run)
            trainers.start(samplers.placement, initial)
        evaluate(0, initial)
        policy = initial
        for r in range(1, cfg.run.rounds + 1):
            reference = initial if cfg.run.reference == "initial" else policy
            train_round(cfg, run, r, policy, reference, samplers, graders, trainers)
            policy = str(run.policy_dir(r))
            evaluate(r, policy)
        samplers.settle()
    finally:
        trainers.close()
        graders.shutdown()
        samplers.shutdown()
    return _finish(cfg, run, t_start)


def _finish(cfg: Config, run: RunDir, t_start: float) -> int:
    from wpo_ray.report import write_report

    report = write_report(run.path)
    log.info("\n%s", accuracy_table(cfg, run, run.manifest))
    log.info("\n[run] done in %.0fs; report: %s", time.time() - t_start, report)
    return 0
