"""The main job as users run it: `wpo-ray run` resumes after the driver dies, and `ray job submit`
works against a two-node Ray cluster started on this machine."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT, TINY_OVERRIDES
from wpo_ray import contracts

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
ONE_ROUND = [*TINY_OVERRIDES, "run.rounds=1"]


def _env() -> dict:
    # Nothing Ray-related is inherited from this test session's embedded Ray: its address, its
    # auth settings, its loopback-only switch (which makes `ray start --address` refuse a node).
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PATH"] = f"{BIN}:{env['PATH']}"
    env["PYTHONPATH"] = str(ROOT)
    return env


def _manifest(run_dir: Path) -> dict:
    p = run_dir / "manifest.json"
    return json.loads(p.read_text())["stages"] if p.exists() else {}


def _wait_for(pred, timeout: float, proc=None, what: str = ""):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}")
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def test_driver_killed_after_sampling_and_mid_training_resumes(tiny_policy, tiny_cfg_factory, vllm_pool, grader_pool,
                                                              tmp_path):
    """The driver is SIGKILLed twice: once the sampling half is recorded, then in the middle of
    training (a worker held at micro-batch 3, right after the step-2 checkpoint). The third run
    resumes training from that checkpoint, never resamples, and finishes the round."""
    from pipeline.sampling import run_sampling
    from wpo_ray.failpoints import ENV, arm, fired
    from wpo_ray.rundir import RunDir

    # Relative run.dir and cache paths, as users write them: actors and train workers run in other
    # working directories, so the job must hand them absolute paths.
    cache = os.path.relpath(Path(tiny_policy).parent, tmp_path)
    run_dir = tmp_path / "run"
    train_over = ["train.micro_batch_size=1", "train.checkpoint_every=2"]  # enough steps to die between
    cmd = [str(BIN / "wpo-ray"), "run", str(ROOT / "configs" / "tiny-cpu.yaml"), *ONE_ROUND, *train_over,
           "run.dir=run", f"bootstrap.cache_dir={cache}"]
    env = _env()
    env[ENV] = str(tmp_path / "failpoints")
    (tmp_path / "failpoints").mkdir()

    def run_until(pred, what: str, log_name: str) -> None:
        log = (tmp_path / log_name).open("w")
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            _wait_for(pred, 900, proc, what)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver dies, with everything it started
            proc.wait()

    run_until(lambda: "round-001/pairs" in _manifest(run_dir), "the sampling half to finish", "first.log")
    stages = _manifest(run_dir)
    assert "round-001/train" not in stages
    samples = run_dir / "round-001" / "samples"
    stamps = {p.name: p.stat().st_mtime_ns for p in samples.glob("*.parquet")}
    assert stamps

    arm(tmp_path / "failpoints", "train.micro_step", hit=3, action="hang")
    # The run's trainer group keeps its Ray Train state for every round in one place.
    snapshot = run_dir / "trainers" / "ray_train" / "checkpoint_manager_snapshot.json"
    run_until(lambda: fired(tmp_path / "failpoints", "train.micro_step") and snapshot.exists()
              and "round-001-step-000002" in snapshot.read_text(), "the step-2 checkpoint", "second.log")
    assert "round-001/train" not in _manifest(run_dir)

    third = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    out = third.stdout + third.stderr
    assert "resumed from checkpoint at optimizer step 2" in out
    # Sampling was not repeated: same files, same manifest entry.
    assert {p.name: p.stat().st_mtime_ns for p in samples.glob("*.parquet")} == stamps
    after = _manifest(run_dir)
    assert after["round-001/samples"] == stages["round-001/samples"]
    assert {"round-001/train", "round-001/eval", "round-000/eval"} <= set(after)
    assert (run_dir / "round-001" / "checkpoint" / "policy" / "model.safetensors").is_file()
    assert (run_dir / "report.html").is_file()
    assert "greedy" in out and "report:" in out  # the accuracy table and the report path are printed

    # The pairs equal those of an uninterrupted sampling run with the same config.
    cfg = tiny_cfg_factory("run.rounds=1", *train_over, run_dir=tmp_path / "uninterrupted")
    run_sampling(cfg, RunDir(cfg), 1, tiny_policy, pool=vllm_pool, graders=grader_pool)
    # The run's pairs also carry their reference log-probs: its running RefLogp pool scored them as
    # they were paired, and the training stage used them as given.
    pairs = pq.read_table(run_dir / "round-001" / "pairs")
    assert pairs.select(contracts.PAIRS.names).equals(pq.read_table(tmp_path / "uninterrupted" / "round-001" / "pairs"))
    for c in ("ref_chosen_logp", "ref_rejected_logp"):
        assert pairs.column(c).null_count == 0 and max(pairs.column(c).to_pylist()) < 0, c
    assert "reference log-probs given with the pairs" in out

    # A rerun of a finished run does nothing and says so quickly; a changed config is refused.
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and _manifest(run_dir) == after
    said = again.stdout + again.stderr
    assert "every round is already recorded" in said and "[ray]" not in said, said[-2000:]  # no Ray started
    changed = subprocess.run(cmd + ["train.loss.beta=0.5"], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                             timeout=120)
    assert changed.returncode == 1 and "train.loss.beta: 0.1 -> 0.5" in changed.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Ray rewrites a node IP of 127.0.0.1 to the machine's routable address, but keeps other loopback
# addresses: the test cluster's nodes talk over 127.0.0.2 and never leave this machine.
LOOPBACK_NODE_IP = "127.0.0.2"


@pytest.mark.cluster
def test_ray_job_submit_on_a_two_node_cluster(tiny_policy, tmp_path):
    import secrets

    import shutil
    import tempfile

    env = _env()
    # A short temp dir of its own: Ray's Unix sockets live under it (path limit ~107 chars), and the
    # cluster's session files stay out of the test session's.
    ray_tmp = Path(tempfile.mkdtemp(prefix="wr-", dir="/tmp"))
    # And one per node: a node's runtime-env agent unpacks the job's working_dir under its temp dir
    # when the driver connects, so two nodes sharing one dir (only possible on one machine) replace
    # each other's copy under the running driver, whose cwd then no longer exists.
    head_tmp, worker_tmp = ray_tmp / "head", ray_tmp / "worker"
    head_tmp.mkdir(), worker_tmp.mkdir()
    env["RAY_TMPDIR"] = str(head_tmp)
    # Ray 2.60 clusters started with `ray start` require token authentication: give every node and
    # the CLI the same fresh token instead of turning authentication off.
    env["RAY_AUTH_MODE"], env["RAY_AUTH_TOKEN"] = "token", secrets.token_hex(32)
    port, dash = _free_port(), _free_port()
    ip = LOOPBACK_NODE_IP
    ray = str(BIN / "ray")
    start = [ray, "start", "--head", f"--port={port}", "--num-cpus=4", f"--node-ip-address={ip}",
             "--include-dashboard=true", f"--dashboard-host={ip}", f"--dashboard-port={dash}",
             f"--dashboard-agent-listen-port={_free_port()}", f"--temp-dir={head_tmp}", "--disable-usage-stats"]
    run_dir = tmp_path / "run"
    try:
        # Both nodes share one IP: each needs its own dashboard-agent port (the default 52365 would
        # collide, and a head without its agent cannot accept jobs).
        # Only the second node has the resource the sampler engine asks for: the job must place it
        # there, and the manifest must say so.
        worker = [ray, "start", f"--address={ip}:{port}", "--num-cpus=4", f"--node-ip-address={ip}",
                  '--resources={"wpo_second_node": 1}', f"--dashboard-agent-listen-port={_free_port()}",
                  f"--temp-dir={worker_tmp}", "--disable-usage-stats"]
        for cmd, tmp in ((start, head_tmp), (worker, worker_tmp)):
            res = subprocess.run(cmd, env={**env, "RAY_TMPDIR": str(tmp)}, capture_output=True, text=True, timeout=180)
            assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
        def two_nodes() -> bool:  # the worker registers asynchronously after `ray start` returns
            out = subprocess.run([ray, "status", f"--address={ip}:{port}"], env=env, capture_output=True,
                                 text=True, timeout=60).stdout
            return out.count("node_") >= 2

        _wait_for(two_nodes, 180, what="the second node to join")
        submit_cmd = [ray, "job", "submit", f"--address=http://{ip}:{dash}",
                      f"--runtime-env={ROOT / 'configs' / 'runtime_env.yaml'}", "--working-dir", str(ROOT), "--",
                      "python", "-m", "jobs.run", "--config", "configs/tiny-cpu.yaml", *ONE_ROUND, "ray.address=null",
                      "sampling.resources_per_actor={wpo_second_node: 1}",
                      f"run.dir={run_dir}", f"bootstrap.cache_dir={Path(tiny_policy).parent}"]
        for _ in range(30):  # the dashboard's job agent comes up after `ray start` returns
            submit = subprocess.run(submit_cmd, env=env, capture_output=True, text=True, timeout=1500)
            if "No available agent to submit job" not in submit.stdout + submit.stderr:
                break
            time.sleep(5)
        out = submit.stdout + submit.stderr
        assert submit.returncode == 0, out[-4000:]
        assert "succeeded" in out
        assert "joined the cluster" in out  # the job used the cluster, not an embedded Ray
        stages = _manifest(run_dir)
        assert {"round-001/pairs", "round-001/train", "round-001/eval"} <= set(stages)
        p = stages["round-001/pairs"]
        assert p["pairs"] + p["skips"] == p["prompts"]
        probe = subprocess.run([str(BIN / "python"), "-c", (
            "import json, ray; ray.init(address='%s:%d', log_to_driver=False); "
            "print('NODES', json.dumps({n['NodeID']: n['Resources'] for n in ray.nodes() if n['Alive']}))") % (ip, port)],
            env=env, capture_output=True, text=True, timeout=120)
        nodes = json.loads(next(x for x in probe.stdout.splitlines() if x.startswith("NODES ")).split(" ", 1)[1])
        second = {n for n, res in nodes.items() if res.get("wpo_second_node")}
        assert len(nodes) == 2 and len(second) == 1, nodes
        placed = stages["round-001/samples"]["placement"]["samplers"]
        assert {a["node_id"] for a in placed} == second, (placed, nodes)  # the engine ran on the second node
        assert {a["node_id"] for a in stages["round-001/train"]["placement"]["train_workers"]} <= set(nodes)
    finally:
        _stop_cluster(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _stop_cluster(temp_dir: Path) -> None:
    """Stop this test's cluster only: `ray stop` would also kill the test session's own Ray."""
    import psutil

    procs = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if str(temp_dir) in cmd or LOOPBACK_NODE_IP in cmd:
                procs += [p, *p.children(recursive=True)]  # agents rename themselves "ray::..."
        except psutil.Error:
            continue
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=30)
