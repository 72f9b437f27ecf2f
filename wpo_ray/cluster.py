"""Connecting to Ray: an existing cluster when there is one, else an embedded local one."""

from __future__ import annotations

import logging
import os
import sys

from .config import RayConfig
from .logs import is_verbose, quiet_libraries, route_worker_output

log = logging.getLogger(__name__)

# Ray kills idle worker processes once the node has more workers than CPUs, and the run's actors
# (engines, graders, reference, trainers) already count that many: every Ray Data stage then
# started its tasks in new processes, 1-4 s per stage and round on 2 cores. Keeping a few idle
# ones took a tiny round's pairing from ~7 s to ~3 s (docs/ENVIRONMENT.md).
IDLE_WORKERS_PER_CPU = 4


def init_ray(cfg: RayConfig):
    """Join a cluster or start an embedded one.

    - `ray.address: null` (default): join RAY_ADDRESS when it is set (`ray job submit` sets it),
      else start an embedded Ray.
    - `ray.address: auto`: Ray's auto-detection of a cluster started with `ray start` here.
    - `ray.address: local`: always an embedded Ray.
    - `ray.address: host:port` / `ray://...`: that cluster.
    The embedded Ray binds to 127.0.0.1 only (safe by default). Auto-detection is not the default
    on purpose: a stale /tmp/ray/ray_current_cluster makes `ray.init("auto")` retry forever.
    Unless `cfg.verbose`, what the workers print goes to the run log and only our roles' progress
    lines reach the console (wpo_ray/logs.py).
    """
    import ray

    if ray.is_initialized():
        return ray
    address = cfg.address or os.environ.get("RAY_ADDRESS") or "local"
    quiet = dict(log_to_driver=True, logging_level=logging.INFO if cfg.verbose else logging.WARNING)
    if address != "local":
        ray.init(address=address, **quiet)
        route_worker_output(cfg.verbose)
        log.info("[ray] joined the cluster at %s: %s", address, ray.cluster_resources())
        return ray
    _loopback_only()
    ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=cfg.include_dashboard,
             dashboard_host="127.0.0.1", _system_config={"num_workers_soft_limit": IDLE_WORKERS_PER_CPU * cfg.num_cpus},
             **quiet)
    route_worker_output(cfg.verbose)
    node_ip = ray.nodes()[0]["NodeManagerAddress"]
    if not node_ip.startswith("127."):
        ray.shutdown()
        raise RuntimeError(f"embedded Ray came up on {node_ip}, not on loopback; refusing to run exposed")
    log.info("[ray] embedded local Ray on 127.0.0.1 with %d logical CPUs", cfg.num_cpus)
    return ray


def _loopback_only() -> None:
    """Make an embedded Ray use 127.0.0.1 as its node IP, so every server binds to loopback.

    Ray resolves "127.0.0.1" passed as the node IP to the machine's routable address on purpose;
    its single-machine mode (the one it uses on macOS) keeps loopback. The flag is read when
    `ray` is imported, so set the environment (inherited by Ray's processes) and, if `ray` is
    already imported in this process, its constant too.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

    if "ray._private.ray_constants" in sys.modules:
        sys.modules["ray._private.ray_constants"].ENABLE_RAY_CLUSTER = False


def data_context():
    """Ray Data settings every stage uses: row order kept (same inputs, same files, same shards)."""
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    # Ray 2.60's DataSourceV2 Parquet reader starts a pool of footer-reading actors on every
    # `read_parquet`: ~5 s per read for files of a few KB, i.e. per stage and per round. The V1
    # reader reads the same files in the same order in ~0.2 s (docs/ENVIRONMENT.md).
    ctx.use_datasource_v2 = False
    # Progress bars and per-execution dumps are Ray's chatter: run.log, or the console with ray.verbose.
    # A live bar on a terminal (it redraws in place); none in a log or CI, where each redraw is a line.
    ctx.enable_progress_bars = is_verbose() or sys.stderr.isatty()
    ctx.print_on_execution_start = False
    quiet_libraries()
    # The sort of pairs/skips falls back to this many partitions when the input block count is
    # unknown; Ray's default (200) is hundreds of tasks for a few hundred rows.
    ctx.default_hash_shuffle_parallelism = max(2, int(ray.cluster_resources().get("CPU", 2)))
    return ctx



def log_placement(role: str) -> None:
    """In an actor: one line in the run log saying which node it runs on (no-op outside Ray)."""
    import ray

    if ray.is_initialized():
        at = where_am_i()
        log.info("[%s] on node %s (%s)", role, at["node_id"], at["ip"])


def where_am_i() -> dict:
    """This Ray process's node: what a stage records about where each actor ran."""
    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address()}
