"""Failpoints fire once, in one process, on the configured hit, and are inert when not armed."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest

from wpo_ray import failpoints
from wpo_ray.failpoints import arm, failpoint, fired


@pytest.fixture
def fp_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(failpoints.ENV, str(tmp_path))
    monkeypatch.setattr(failpoints, "_hits", {})
    return tmp_path


def test_inert_without_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(failpoints.ENV, raising=False)
    arm(tmp_path, "x.y", hit=1, action="interrupt")
    failpoint("x.y")  # no directory configured: nothing happens
    assert not fired(tmp_path, "x.y")


def test_fires_on_the_configured_hit_and_only_once(fp_dir):
    arm(fp_dir, "stage.done", hit=3, action="interrupt")
    failpoint("other")  # another name is not affected
    failpoint("stage.done")
    failpoint("stage.done")
    assert not fired(fp_dir, "stage.done")
    with pytest.raises(KeyboardInterrupt, match="stage.done"):
        failpoint("stage.done")
    assert fired(fp_dir, "stage.done") and not (fp_dir / "stage.done").exists()
    for _ in range(5):
        failpoint("stage.done")  # claimed: never again


def _reach(name: str, q) -> None:
    failpoint(name)
    q.put("survived")


def test_kill_is_a_sigkill_of_the_process_that_claims_it(fp_dir):
    arm(fp_dir, "worker.step", hit=1)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    first = ctx.Process(target=_reach, args=("worker.step", q))
    first.start()
    first.join(60)
    assert first.exitcode == -signal.SIGKILL and q.empty()
    second = ctx.Process(target=_reach, args=("worker.step", q))  # a restarted process passes
    second.start()
    second.join(60)
    assert second.exitcode == 0 and q.get(timeout=10) == "survived"
    assert fired(fp_dir, "worker.step")


def _reach_timed(name: str, q) -> None:
    q.put(time.monotonic())
    failpoint(name)
    q.put("survived")


def test_kill_after_a_pause_is_a_sigkill_that_comes_late(fp_dir):
    arm(fp_dir, "worker.step", action="kill:1.5")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_reach_timed, args=("worker.step", q))
    p.start()
    started = q.get(timeout=60)
    p.join(60)
    assert p.exitcode == -signal.SIGKILL and q.empty()
    assert time.monotonic() - started >= 1.5


def test_bad_arming_is_refused(tmp_path):
    with pytest.raises(ValueError):
        arm(tmp_path, "a", hit=0)
    with pytest.raises(ValueError):
        arm(tmp_path, "a", action="explode")
    with pytest.raises(ValueError):
        arm(tmp_path, "a", action="kill:soon")
    assert not os.listdir(tmp_path)


def test_delay_sleeps_and_goes_on(fp_dir):
    import time

    arm(fp_dir, "slow.step", hit=1, action="delay:0.2")
    t0 = time.monotonic()
    failpoint("slow.step")  # returns: the process goes on
    assert time.monotonic() - t0 >= 0.2 and fired(fp_dir, "slow.step")
    with pytest.raises(ValueError):
        arm(fp_dir, "x", action="delay:soon")


def test_until_waits_for_the_path_and_records_whether_it_appeared(fp_dir, tmp_path, monkeypatch):
    import threading
    import time

    from wpo_ray import failpoints

    flag = tmp_path / "first-step"
    arm(fp_dir, "held.batch", hit=1, action=f"until:{flag}")
    threading.Timer(0.5, flag.touch).start()
    t0 = time.monotonic()
    failpoint("held.batch")
    assert 0.5 <= time.monotonic() - t0 < 5
    assert (fp_dir / "held.batch.fired").read_text().splitlines()[-1] == "until: met"

    monkeypatch.setattr(failpoints, "UNTIL_MAX_S", 0.3)
    arm(fp_dir, "never", hit=1, action=f"until:{tmp_path / 'missing'}")
    failpoint("never")
    assert (fp_dir / "never.fired").read_text().splitlines()[-1] == "until: timed out"
    with pytest.raises(ValueError):
        arm(fp_dir, "x", action="until:")


def test_every_fires_on_each_hit_from_the_configured_one_until_disarmed(fp_dir):
    arm(fp_dir, "worker.step", hit=2, action="interrupt", every=True)
    failpoint("worker.step")  # hit 1: not yet
    for _ in range(3):
        with pytest.raises(KeyboardInterrupt):
            failpoint("worker.step")
    assert fired(fp_dir, "worker.step") and (fp_dir / "worker.step").exists()  # still armed
    (fp_dir / "worker.step").unlink()
    failpoint("worker.step")  # disarmed


def test_a_failpoint_armed_again_counts_its_hits_from_one_in_a_process_that_saw_the_last_arming(fp_dir):
    """A test session's in-process driver reaches `driver.graded.committed` twice under one test's
    arming (hit=2); the next test arms it with hit=1 and must see it fire on the next hit."""
    arm(fp_dir, "driver.graded.committed", hit=2, action="interrupt")
    failpoint("driver.graded.committed")
    with pytest.raises(KeyboardInterrupt):
        failpoint("driver.graded.committed")
    (fp_dir / "driver.graded.committed.fired").unlink()
    arm(fp_dir, "driver.graded.committed", hit=1, action="interrupt")
    with pytest.raises(KeyboardInterrupt):
        failpoint("driver.graded.committed")
    assert fired(fp_dir, "driver.graded.committed")
