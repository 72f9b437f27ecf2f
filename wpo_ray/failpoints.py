"""Failpoints: named places where a test makes this process die, to prove recovery on the real stack.

Off unless the environment variable ``WPO_FAILPOINTS_DIR`` names a directory; then the cost of a
failpoint is one ``stat``. Tests set it before Ray starts, so every Ray worker inherits it. A test
arms a failpoint by writing the file ``<dir>/<name>`` with ``"<hit> [action] [every]"``: the
process that reaches the failpoint for the ``hit``-th time claims it by renaming the file (so it
fires once, in one process, across all processes; with ``every``, the file stays and every
process fires on every hit from the ``hit``-th on: a fault that comes back after each restart)
and then

- ``kill`` (default): sends itself SIGKILL, as the OOM killer or a preempted node would: no
  cleanup, no ``finally``; ``kill:<s>`` first sleeps s seconds (what the process just handed to
  others, e.g. a checkpoint report, has reached them);
- ``interrupt``: raises ``KeyboardInterrupt``, as Ctrl-C would, for a driver running inside pytest;
- ``hang``: sleeps for an hour, so that a test can kill something else at a known point (the
  driver, while a training worker hangs right after a checkpoint);
- ``delay:<s>``: sleeps s seconds and goes on (a slow sampler);
- ``until:<path>``: waits until ``path`` exists (at most ``UNTIL_MAX_S``) and goes on, appending
  ``until: met`` or ``until: timed out`` to the ``.fired`` file (a sampler that holds its batch
  until the trainers have taken a step: they can only if training overlaps sampling).

Places (grep ``failpoint(`` for the full list): ``sampler.sample`` (an engine, per batch),
``sampler.generate`` (an engine, per evaluation chunk), ``grader.grade`` / ``grader.pair`` (a
grader, per batch), ``train.micro_step`` (a training worker,
before each micro-batch), ``driver.<output>.written`` (a stage's output written, not yet renamed
into place), ``driver.<output>.committed`` (renamed, not yet in the manifest),
``bootstrap.step`` / ``bootstrap.written`` (the SFT bootstrap: per step; its cache entry written,
not yet renamed into place).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "WPO_FAILPOINTS_DIR"
ACTIONS = ("kill", "interrupt", "hang")
UNTIL_MAX_S = 300.0
# name -> (which arming, hits since): a failpoint armed again (a new file) counts from 1 again,
# also in a process that reached it under an earlier arming (a test session's driver, an engine).
_hits: dict[str, tuple[tuple[int, int], int]] = {}


def arm(directory: str | Path, name: str, hit: int = 1, action: str = "kill", every: bool = False) -> Path:
    """Arm `name` to fire on the `hit`-th time a process reaches it (with `every`, on each time
    from then on, in every process, until disarmed) (a test helper)."""
    if (action not in ACTIONS and not _delay(action) and not _until(action) and not _kill_after(action)) or hit < 1:
        raise ValueError(f"failpoint {name}: bad hit {hit} or action {action!r}")
    path = Path(directory) / name
    path.write_text(f"{hit} {action}{' every' if every else ''}\n")
    return path


def _seconds(action: str, head: str) -> float | None:
    """s of an action `<head>:<s>` (s > 0), else None."""
    name, _, secs = action.partition(":")
    try:
        return float(secs) if name == head and float(secs) > 0 else None
    except ValueError:
        return None


def _delay(action: str) -> float | None:
    return _seconds(action, "delay")


def _kill_after(action: str) -> float | None:
    return _seconds(action, "kill")


def _until(action: str) -> str | None:
    head, _, path = action.partition(":")
    return path if head == "until" and path else None


def fired(directory: str | Path, name: str) -> bool:
    return (Path(directory) / f"{name}.fired").exists()


def failpoint(name: str) -> None:
    directory = os.environ.get(ENV)
    if not directory:
        return
    armed = Path(directory) / name
    try:
        st = armed.stat()
        hit, _, action = armed.read_text().strip().partition(" ")
    except FileNotFoundError:  # not armed, or another process claimed it
        return
    arming = (st.st_ino, st.st_mtime_ns)
    seen, count = _hits.get(name, (None, 0))
    count = count + 1 if seen == arming else 1
    _hits[name] = (arming, count)
    action, _, every = action.partition(" ")
    if every:
        if count < int(hit):
            return
        armed.with_name(f"{name}.fired").touch()
    elif count != int(hit):
        return
    else:
        try:
            os.rename(armed, armed.with_name(f"{name}.fired"))  # atomic: exactly one process wins
        except FileNotFoundError:
            return
    log.warning("[failpoint] %s: firing (%s) in pid %d", name, action or "kill", os.getpid())
    if action == "interrupt":
        raise KeyboardInterrupt(f"failpoint {name}")
    if action == "hang" or _delay(action):
        time.sleep(3600 if action == "hang" else _delay(action))
        return
    if _until(action):
        flag, deadline = Path(_until(action)), time.monotonic() + UNTIL_MAX_S
        while not flag.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        with open(armed.with_name(f"{name}.fired"), "a") as f:
            f.write("until: met\n" if flag.exists() else "until: timed out\n")
        return
    time.sleep(_kill_after(action) or 0.0)
    os.kill(os.getpid(), signal.SIGKILL)
