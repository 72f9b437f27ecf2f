"""The embedded Ray is safe by default: every Ray server listens on loopback only."""

from __future__ import annotations

import psutil
import pytest

pytestmark = pytest.mark.integration


def test_embedded_ray_binds_only_to_loopback(ray_session):
    ray = ray_session
    assert ray.nodes()[0]["NodeManagerAddress"] == "127.0.0.1"
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    exposed = []
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status != psutil.CONN_LISTEN or not conn.pid:
            continue
        try:
            name = " ".join(psutil.Process(conn.pid).cmdline())
        except psutil.Error:
            continue
        if "ray" not in name or "pytest" in name and "ray::" not in name:
            continue
        ip = conn.laddr.ip.removeprefix("::ffff:")
        if not (ip.startswith("127.") or ip == "::1"):
            exposed.append((ip, conn.laddr.port, name[:80]))
    assert not exposed, f"Ray processes listening beyond loopback: {exposed}"


_DASHBOARD_PROBE = r"""
import json, psutil
from wpo_ray.cluster import init_ray
from wpo_ray.config import RayConfig
ray = init_ray(RayConfig(address="local", num_cpus=1, include_dashboard=True))
import time, urllib.request
from ray._private.worker import global_worker
dash = global_worker.node.address_info.get("webui_url") or ""
for _ in range(60):  # the dashboard comes up after ray.init returns
    try:
        urllib.request.urlopen("http://" + dash, timeout=2)
        break
    except Exception:
        time.sleep(1)
mine = psutil.Process().children(recursive=True)
listening = []
for p in mine:
    try:
        for c in p.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN:
                listening.append([c.laddr.ip, c.laddr.port, " ".join(p.cmdline())[:80]])
    except psutil.Error:
        pass
print("PROBE " + json.dumps({"dashboard": dash, "listening": listening}))
ray.shutdown()
"""


def test_embedded_dashboard_when_enabled_binds_to_loopback():
    """`ray.include_dashboard: true` on the embedded Ray: the dashboard and every other server of
    that Ray listen on loopback only (a separate Ray, in a subprocess, so the session's is untouched)."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    from tests.conftest import ROOT

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PYTHONPATH"] = str(ROOT)
    ray_tmp = tempfile.mkdtemp(prefix="wd-", dir="/tmp")  # Ray's socket paths must stay short
    env["RAY_TMPDIR"] = ray_tmp
    try:
        out = subprocess.run([sys.executable, "-c", _DASHBOARD_PROBE], env=env, capture_output=True, text=True,
                             timeout=300)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    line = next((x for x in out.stdout.splitlines() if x.startswith("PROBE ")), None)
    assert out.returncode == 0 and line, out.stdout[-2000:] + out.stderr[-2000:]
    probe = json.loads(line.removeprefix("PROBE "))
    assert probe["dashboard"].startswith("127.0.0.1:"), probe
    ports = {port for _, port, _ in probe["listening"]}
    assert int(probe["dashboard"].rsplit(":", 1)[1]) in ports, probe  # the dashboard really listens
    exposed = [x for x in probe["listening"] if not (x[0].startswith("127.") or x[0] in ("::1", "::ffff:127.0.0.1"))]
    assert not exposed, f"servers of the embedded Ray listening beyond loopback: {exposed}"
