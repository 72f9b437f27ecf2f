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
