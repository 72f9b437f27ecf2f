"""Logging: one logger per module, configured once by the entry point.

What a user reads on the console is our progress: one line per stage, the training steps, errors.
Everything else (Ray's own INFO, Ray Data's progress dumps, vLLM's and DeepSpeed's logs from the
worker processes) goes to the run's log file, `<run.dir>/run.log`, unless `ray.verbose=true`
(or `wpo-ray -v`) asks for it on the console too.

Worker processes (actors, Ray Train workers) call `setup_worker_logging()`: their records are
printed as plain lines, and the driver's handler of worker output (`route_worker_output`) shows on
the console the lines that start with one of `OUR_PREFIXES` and files the rest.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

# Loggers of this project's packages.
PACKAGES = ("wpo_ray", "actors", "pipeline", "jobs")
# Libraries whose driver-side records are chatter: run.log only, unless verbose.
CHATTY = ("ray", "DeepSpeed")
# Worker lines shown on the console: our own roles' progress.
OUR_PREFIXES = ("[train]", "[sampler]", "[samplers]", "[ref-logp]", "[failpoint]")
_CONSOLE = "wpo-ray-console"
_FILE = "wpo-ray-file"
worker_log = logging.getLogger("ray.worker-output")  # what workers printed, filed in run.log
_verbose = False


def is_verbose() -> bool:
    """Whether the entry point asked for Ray's chatter on the console."""
    return _verbose


def _replace_handler(logger: logging.Logger, name: str, handler: logging.Handler) -> None:
    for h in [h for h in logger.handlers if h.get_name() == name]:
        logger.removeHandler(h)
        h.close()
    handler.set_name(name)
    logger.addHandler(handler)


def setup_console(verbose: bool = False) -> None:
    """Our packages' INFO to stdout as plain lines; Ray's loggers quiet unless `verbose`."""
    global _verbose
    _verbose = verbose
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    for name in PACKAGES:
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)  # propagates too: pytest's caplog sees our records
        _replace_handler(logger, _CONSOLE, console)
    if not verbose:
        import os

        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' save/load bars
        quiet_libraries()


def quiet_libraries() -> None:
    """Detach the console handlers that Ray (Ray Data, Ray Train, ...) and DeepSpeed put on their
    own loggers, so their records reach only the run log (through the top logger's file handler).
    Ray Data configures its loggers when it is imported, so this runs again before each stage."""
    if _verbose:
        return
    for name in list(logging.Logger.manager.loggerDict):
        if not any(name == c or name.startswith(c + ".") for c in CHATTY):
            continue
        logger = logging.getLogger(name)
        for h in [h for h in logger.handlers if h.get_name() != _FILE]:
            logger.removeHandler(h)
        logger.propagate = name not in CHATTY  # children reach the top logger; the top one stops there
    for name in CHATTY:
        top = logging.getLogger(name)
        top.propagate = False
        top.setLevel(logging.INFO)


def add_log_file(path: str | Path) -> Path:
    """Also write our records and Ray's (driver side and workers') to `path`, with timestamps."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    for name in (*PACKAGES, *CHATTY):
        _replace_handler(logging.getLogger(name), _FILE, handler)
    return path


def route_worker_output(verbose: bool) -> bool:
    """On the driver, after `ray.init(log_to_driver=True)`: show our roles' lines from the workers
    on the console and file everything they print (and the raylet's warnings). Ray keeps no public
    hook for this; its stdstream dispatcher and `print_to_stdstream` are used where they exist
    (Ray 2.60), else Ray prints as usual. Returns whether the routing is in place."""
    quiet_libraries()
    if verbose:
        return False
    try:
        import ray._private.worker as ray_worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return False
    console = logging.getLogger("wpo_ray.workers")

    def handle(data: dict) -> None:
        for line in data.get("lines", ()):
            worker_log.info("(%s pid=%s) %s", data.get("actor_name") or data.get("task_name") or "worker",
                            data.get("pid"), line)
            if line.lstrip().startswith(OUR_PREFIXES):
                console.info("%s", line.strip())

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.remove_handler("wpo_ray_logs")
    dispatcher.add_handler("wpo_ray_logs", handle)
    if hasattr(ray_worker, "print_to_stdstream"):  # the raylet's warnings, printed by a driver thread
        ray_worker.print_to_stdstream = lambda data, ignore_prefix=False: handle(data)
    return True


def setup_worker_logging() -> None:
    """In an actor or Ray Train worker: our packages' INFO as plain lines on the process's stderr
    (which Ray forwards to the driver). A no-op elsewhere (an actor class called in-process)."""
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for name in PACKAGES:
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # Ray's own root handler in a worker would print each line twice
        _replace_handler(logger, _CONSOLE, handler)
