"""Autoscaling across GPUs, proven on a CPU machine (slow; runs in CI).

A real multi-node Ray cluster on this machine (`cluster/local_cluster.py`: a head without GPUs
plus two worker nodes started with `ray start --num-gpus=1`, logical GPU ids 0 and 1), the app
deployed the way `serve deploy` and KubeRay deploy it (the Serve config, PUT to the dashboard's
REST API) from `configs/serve_config.yaml` with `accelerator: gpu` and short autoscaling delays,
the real vLLM CPU engine and the embedded tiny model. Under load the model deployment goes from
1 to 2 replicas, one per worker node and GPU id; the 3rd replica it asks for stays pending (no
free GPU) while every request still succeeds; after the load it scales back to 1.

This test process never joins the Ray cluster (the session cluster of the other tests may live
in it): it watches through HTTP only — the Serve REST API (`serve status`), the state API and
the app's GET /health. The pieces are cluster/autoscale_demo.py's (the interactive demo).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

WORKERS = 2                      # logical GPUs in the cluster
USERS = 6                        # concurrent clients: 2 replicas x 3 slots
# Replica starts (a vLLM CPU engine each) dominate the run time. On the 2-core development
# machine shared with other test runs (load average 30-60) they took 1-4 minutes each and the
# whole test 5-8 minutes; the engine alone starts in ~16 s on an idle machine.
START_TIMEOUT_S = 420


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "cluster" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


local_cluster = _load("local_cluster")
demo = _load("autoscale_demo")


@pytest.fixture(scope="module")
def gpu_cluster():
    if not (REPO / "models" / "tiny-qwen3").is_dir():
        pytest.fail("embedded model missing: run scripts/setup.sh (make test does)")
    # Not under pytest's tmp_path: concurrent pytest sessions prune each other's old basetemps.
    state_dir = Path(tempfile.mkdtemp(prefix="llmserve-lc-"))
    try:
        state = local_cluster.start(workers=WORKERS, head_cpus=2, worker_cpus=2, gpus_per_worker=1,
                                    dashboard=True, state_dir=state_dir)
    except BaseException:  # start() already stopped what it had started
        shutil.rmtree(state_dir, ignore_errors=True)
        raise
    try:
        yield state
    finally:
        killed = local_cluster.stop(state_dir, grace_s=10, state=state)
        print(f"\nlocal cluster stopped (forced kills: {killed})")
        shutil.rmtree(state_dir, ignore_errors=True)


def _log_tails(state: dict, lines: int = 40) -> str:
    """The last lines of the Serve logs of the local cluster (printed when the test fails)."""
    logs = Path(state["temp_dir"]) / "session_latest" / "logs" / "serve"
    out = []
    for f in sorted(logs.glob("*.log")):
        if f.name.startswith(("controller", "replica_llm")):
            tail = f.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {f.name}\n" + "\n".join(tail))
    return "\n".join(out)


def test_model_scales_across_gpus_and_back(gpu_cluster):
    try:
        _scenario(gpu_cluster)
    except BaseException:
        print("\nServe logs of the local cluster:\n" + _log_tails(gpu_cluster), flush=True)
        raise


def _scenario(gpu_cluster: dict) -> None:
    dashboard = gpu_cluster["dashboard_url"]
    nodes = local_cluster.alive_nodes(gpu_cluster["gcs_address"])
    gpu_nodes = {n["node_id"] for n in nodes if n["resources"].get("GPU")}
    assert len(gpu_nodes) == WORKERS
    assert not any(n["resources"].get("GPU") for n in nodes if n["head"]), "the head has no GPU"

    http_port = demo.free_port()
    base_url = f"http://127.0.0.1:{http_port}"
    # production knobs from configs/serve_config.yaml, with test delays; one replica more than
    # there are GPUs, so that one must stay pending
    autoscaling = {"min_replicas": 1, "max_replicas": WORKERS + 1, "target_ongoing_requests": 2}
    cfg = demo.demo_serve_config(http_port, autoscaling)
    model = cfg["applications"][0]["args"]["deployments"]["model"]
    assert model["max_ongoing_requests"] == 3 and model["max_queued_requests"] == 10
    w = demo.Watcher(dashboard, base_url)
    demo.deploy(dashboard, cfg)
    w.note(f"deployed (PUT {dashboard}/api/serve/applications/) model autoscaling="
           f"{model['autoscaling_config']}")

    # --- at rest: 1 replica, on a GPU worker, pinned to that worker's GPU
    snap = w.wait_for("1 model replica RUNNING", lambda s: len(s["running"]) == 1 and s["target"] == 1,
                      START_TIMEOUT_S)
    deadline = time.monotonic() + 120
    while demo.retry(w.app_status) != "RUNNING":
        assert time.monotonic() < deadline, "application not RUNNING"
        time.sleep(1)
    health = demo.retry(w.health)
    assert health["status"] == "healthy", health
    first = health["replica"]
    first_node = snap["running"][0]["node_id"]
    assert first_node in gpu_nodes
    assert len(first["ray_gpu_ids"]) == 1 and first["cuda_visible_devices"] == first["ray_gpu_ids"][0]
    w.gpu_of_node[first_node] = first["ray_gpu_ids"][0]
    w.note(f"at rest: replica on node {first_node[:8]}: ray.get_gpu_ids()={first['ray_gpu_ids']} "
           f"CUDA_VISIBLE_DEVICES={first['cuda_visible_devices']}")

    with demo.Load(base_url, USERS) as load:
        t_load = time.monotonic()
        w.note(f"load: {USERS} concurrent clients")

        # --- 1 -> 2 replicas, on the other worker node and GPU id
        snap = w.wait_for("2 model replicas RUNNING", lambda s: len(s["running"]) == 2, START_TIMEOUT_S)
        t_two = time.monotonic()
        running_nodes = {r["node_id"] for r in snap["running"]}
        assert len(running_nodes) == 2 and running_nodes <= gpu_nodes
        seen = w.sample_gpu_ids(2)
        w.note(f"replicas report ray.get_gpu_ids() -> CUDA_VISIBLE_DEVICES: {seen}")
        assert len(seen) == 2 and all(k == v for k, v in seen.items()), seen
        (other_node,) = running_nodes - {first_node}
        (w.gpu_of_node[other_node],) = set(seen) - {first["ray_gpu_ids"][0]}

        # --- it asks for a 3rd, but no GPU is free: pending, and the service goes on
        snap = w.wait_for("a 3rd replica pending (no free GPU)",
                          lambda s: (s["target"] or 0) > 2 and len(s["pending_actors"]) >= 1, 90)
        t_pending = time.monotonic()
        time.sleep(8)
        snap = demo.retry(w.snapshot)
        w.note("8 s later: " + w.describe(snap))
        assert len(snap["running"]) == 2 and len(snap["pending_actors"]) >= 1
        served_while_pending = load.statuses(since=t_pending)
        w.note(f"served while the 3rd replica was pending: {dict(served_while_pending)}")
        assert served_while_pending[200] > 0

        status_cli = subprocess.run([str(Path(sys.executable).parent / "serve"), "status", "-a", dashboard],
                                    capture_output=True, text=True, timeout=120)
        print("`serve status` at peak:\n" + status_cli.stdout, flush=True)
        assert "ModelReplica" in status_cli.stdout, status_cli.stderr
    t_stop = time.monotonic()
    counts = load.statuses()
    lat = load.latencies()
    w.note(f"load stopped: {sum(counts.values())} requests {dict(counts)}; "
           f"latency p50={lat[len(lat) // 2]:.2f}s max={lat[-1]:.2f}s")
    assert set(counts) == {200}, f"every request must succeed while scaling: {counts}"

    # --- and back to 1 (the pending one is dropped too)
    w.wait_for("back to 1 replica",
               lambda s: s["target"] == 1 and len(s["running"]) == 1 and not s["pending_actors"]
               and set(s["states"]) == {"RUNNING"}, 180)
    t_down = time.monotonic()
    assert demo.retry(w.health)["status"] == "healthy"
    w.note(f"summary: 1->2 replicas {t_two - t_load:.0f}s after the load started; back to 1 "
           f"{t_down - t_stop:.0f}s after it stopped; GPU id by node: "
           + json.dumps({k[:8]: v for k, v in w.gpu_of_node.items()}))
    assert sorted(w.gpu_of_node.values()) == [str(i) for i in range(WORKERS)]
