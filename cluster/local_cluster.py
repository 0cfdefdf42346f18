#!/usr/bin/env python3
"""A local multi-node Ray cluster on one machine: a head node plus worker nodes, each started
with `ray start --block` in its own session, each worker advertising one *logical* GPU
(`--num-gpus=1`). Multi-GPU scheduling and Serve autoscaling across GPUs can be tried (and
tested) on a machine without GPUs: a model replica with `num_gpus: 1` lands on a worker, gets
`ray.get_gpu_ids() == [<that worker's id>]` and `CUDA_VISIBLE_DEVICES=<id>`, and runs the vLLM
CPU engine as usual.

    .venv/bin/python cluster/local_cluster.py start [--workers 2]  # prints RAY_ADDRESS etc.
    .venv/bin/python cluster/local_cluster.py status
    eval "$(.venv/bin/python cluster/local_cluster.py env)"        # RAY_ADDRESS, RAY_DASHBOARD_ADDRESS
    .venv/bin/python cluster/local_cluster.py stop

(cluster/start-local-cluster.sh and stop-local-cluster.sh run it with the repo's venv.)

Everything is private to this cluster: explicit free ports (never 6379/8000/8265/10001/52365),
its own Ray temp dir under /tmp, the dashboard on 127.0.0.1, and `stop` ends exactly the
process sessions it recorded at start (never `ray stop`, which would end every Ray process of
the user on this machine). Ray binds the node's own address (it turns 127.0.0.1 into it).
Worker `i` is started with `CUDA_VISIBLE_DEVICES=i`, so the logical GPUs have distinct ids
0..N-1 across the cluster, as on one multi-GPU host.

State (pids, ports, logs) lives in `--state-dir` (default `.ray_tmp/local-cluster` in the repo).
Token authentication follows `RAY_AUTH_MODE` as for any Ray cluster (on by default; the token is
`~/.ray/auth_token`); throwaway test clusters set `RAY_AUTH_MODE=disabled`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cluster.processes import HOST, free_port, kill_sessions, pid_alive, spawn, wait_until

REPO = Path(__file__).resolve().parents[1]
DEFAULT_STATE_DIR = REPO / ".ray_tmp" / "local-cluster"
OBJECT_STORE_BYTES = 200 * 1024 * 1024  # small: the app passes token ids, not tensors
START_ATTEMPTS = 3


# ----------------------------------------------------------------------------- helpers


def ray_bin() -> str:
    """The `ray` console script of the interpreter running this file (the project's venv)."""
    here = Path(sys.executable).parent / "ray"
    return str(here) if here.exists() else (shutil.which("ray") or "ray")


def _state_file(state_dir: Path) -> Path:
    return state_dir / "state.json"


def load_state(state_dir: Path = DEFAULT_STATE_DIR) -> dict[str, Any] | None:
    f = _state_file(state_dir)
    if not f.exists():
        return None
    return json.loads(f.read_text())


def _node_env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.update(extra)
    return env


def _wait_log(proc: subprocess.Popen, log: Path, needle: str, timeout_s: float) -> None:
    def died() -> None:
        if proc.poll() is not None:
            raise RuntimeError(
                f"`ray start` exited with {proc.returncode}; see {log}:\n" + log.read_text(errors="replace")[-3000:]
            )

    if wait_until(lambda: needle in log.read_text(errors="replace"), timeout_s, 0.5, died) is None:
        raise TimeoutError(f"node did not start within {timeout_s:.0f}s; see {log}")


def alive_nodes(gcs_address: str) -> list[dict[str, Any]]:
    """Alive nodes from the GCS (no driver needed): id, resources, labels, head flag."""
    from ray._raylet import GcsClient  # type: ignore[attr-defined]  # in _raylet.so, missing from its .pyi

    client = GcsClient(address=gcs_address)
    nodes = []
    for node_id, info in client.get_all_node_info(timeout=10).items():
        if info.state != 0:  # ALIVE == 0
            continue
        nodes.append(
            {
                "node_id": node_id.hex(),
                "head": bool(info.is_head_node),
                "resources": dict(info.resources_total),
            }
        )
    return nodes


# ----------------------------------------------------------------------------- commands


def start(
    workers: int = 2,
    head_cpus: int = 2,
    worker_cpus: int = 2,
    gpus_per_worker: int = 1,
    dashboard: bool = True,
    state_dir: Path = DEFAULT_STATE_DIR,
    timeout_s: float = 120.0,
) -> dict[str, Any]:
    """Start head + `workers` worker nodes; returns (and records) the cluster state."""
    state_dir = Path(state_dir)
    old = load_state(state_dir)
    if old and any(pid_alive(n["pid"]) for n in old["nodes"]):
        raise RuntimeError(f"a local cluster from {state_dir} is still running; stop it first")
    state_dir.mkdir(parents=True, exist_ok=True)
    for old_log in state_dir.glob("*.log"):
        old_log.unlink()
    # A short temp dir: Ray puts Unix sockets under it (path length limit ~107 bytes).
    temp_dir = tempfile.mkdtemp(prefix="llmserve-ray-", dir="/tmp")
    gcs_port = free_port()
    gcs_address = f"{HOST}:{gcs_port}"
    state: dict[str, Any] = {
        "gcs_address": gcs_address,
        "temp_dir": temp_dir,
        "dashboard_url": None,
        "nodes": [],
        "auth_mode": os.environ.get("RAY_AUTH_MODE", "token (Ray default)"),
    }
    common = [
        f"--temp-dir={temp_dir}",
        f"--object-store-memory={OBJECT_STORE_BYTES}",
        "--min-worker-port=0",
        "--max-worker-port=0",
        "--disable-usage-stats",
        "--block",
    ]

    def record(role: str, proc: subprocess.Popen, log: Path, **extra: Any) -> None:
        # start_new_session: the pid is also the node's session id, which `stop` uses
        state["nodes"].append({"role": role, "pid": proc.pid, "log": str(log), **extra})
        _state_file(state_dir).write_text(json.dumps(state, indent=2))

    try:
        head = [
            ray_bin(),
            "start",
            "--head",
            f"--port={gcs_port}",
            f"--num-cpus={head_cpus}",
            "--num-gpus=0",
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            *common,
        ]
        if dashboard:
            dash_port = free_port()
            head += ["--include-dashboard=true", f"--dashboard-host={HOST}", f"--dashboard-port={dash_port}"]
            state["dashboard_url"] = f"http://{HOST}:{dash_port}"
        else:
            head += ["--include-dashboard=false"]
        log = state_dir / "head.log"
        proc = spawn(head, log, _node_env({"CUDA_VISIBLE_DEVICES": ""}))
        record("head", proc, log, num_cpus=head_cpus, num_gpus=0)
        _wait_log(proc, log, "Ray runtime started", timeout_s)

        for i in range(workers):
            gpu_ids = ",".join(str(i * gpus_per_worker + g) for g in range(gpus_per_worker))
            cmd = [
                ray_bin(),
                "start",
                f"--address={gcs_address}",
                f"--num-cpus={worker_cpus}",
                f"--num-gpus={gpus_per_worker}",
                f"--dashboard-agent-listen-port={free_port()}",
                f"--labels=llm-serve/local-worker=w{i}",
                *common,
            ]
            log = state_dir / f"worker-{i}.log"
            # One at a time, and retried: on a small, busy machine a raylet can miss Ray's fixed
            # 30 s registration deadline ("The current node timed out during startup").
            for attempt in range(1, START_ATTEMPTS + 1):
                proc = spawn(cmd, log, _node_env({"CUDA_VISIBLE_DEVICES": gpu_ids}))
                record(
                    f"worker-{i}",
                    proc,
                    log,
                    num_cpus=worker_cpus,
                    num_gpus=gpus_per_worker,
                    gpu_ids=gpu_ids,
                    attempt=attempt,
                )
                try:
                    _wait_log(proc, log, "Ray runtime started", timeout_s)
                    break
                except RuntimeError:
                    if attempt == START_ATTEMPTS:
                        raise
                    kill_sessions({proc.pid}, grace_s=5)
                    state["nodes"] = [n for n in state["nodes"] if n["pid"] != proc.pid]
                    with open(log, "a") as f:
                        f.write(f"\n--- attempt {attempt} failed; retrying ---\n")

        deadline = time.monotonic() + timeout_s
        while True:
            nodes = alive_nodes(gcs_address)
            if len(nodes) >= workers + 1:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(nodes)} of {workers + 1} nodes registered")
            time.sleep(0.5)
    except BaseException:
        stop(state_dir, grace_s=5, state=state)
        raise
    state["started_at"] = time.time()
    _state_file(state_dir).write_text(json.dumps(state, indent=2))
    return state


def stop(state_dir: Path = DEFAULT_STATE_DIR, grace_s: float = 15.0, state: dict[str, Any] | None = None) -> int:
    """Stop the recorded nodes: SIGTERM to every process of their sessions (the `ray start`
    pids recorded at start), then SIGKILL to whatever is left after `grace_s`. Nothing else on
    the machine is touched. Returns the number of processes that had to be killed."""
    state_dir = Path(state_dir)
    state = state or load_state(state_dir)
    if not state:
        return 0
    killed = kill_sessions({n["pid"] for n in state["nodes"]}, grace_s)
    temp_dir = state.get("temp_dir")
    if temp_dir and Path(temp_dir).name.startswith("llmserve-ray-"):
        shutil.rmtree(temp_dir, ignore_errors=True)
    f = _state_file(state_dir)
    if f.exists():
        f.rename(state_dir / "state.stopped.json")
    return killed


def status(state_dir: Path = DEFAULT_STATE_DIR) -> dict[str, Any] | None:
    state = load_state(state_dir)
    if not state:
        return None
    for n in state["nodes"]:
        n["alive"] = pid_alive(n["pid"])
    try:
        state["registered_nodes"] = alive_nodes(state["gcs_address"])
    except Exception as exc:  # GCS down
        state["registered_nodes"] = f"unreachable: {type(exc).__name__}: {exc}"
    return state


def env_lines(state: dict[str, Any]) -> list[str]:
    lines = [f"export RAY_ADDRESS={state['gcs_address']}"]
    if state.get("dashboard_url"):
        lines.append(f"export RAY_DASHBOARD_ADDRESS={state['dashboard_url']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--state-dir",
        type=Path,
        default=Path(os.environ.get("LLM_SERVE_CLUSTER_DIR", DEFAULT_STATE_DIR)),
        help="where pids, ports and logs are recorded (env LLM_SERVE_CLUSTER_DIR)",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start", help="start head + workers", parents=[common])
    s.add_argument("--workers", type=int, default=2, help="worker nodes, one logical GPU each (default 2)")
    s.add_argument("--gpus-per-worker", type=int, default=1)
    s.add_argument("--head-cpus", type=int, default=2, help="logical CPUs of the head (ingress, tokenizer)")
    s.add_argument(
        "--worker-cpus",
        type=int,
        default=2,
        help="logical CPUs per worker: 1 for the model replica, room for a CPU replica",
    )
    s.add_argument("--no-dashboard", action="store_true", help="skip the dashboard (then no `serve status` CLI)")
    sub.add_parser("stop", help="stop the recorded nodes", parents=[common])
    sub.add_parser("status", help="recorded nodes and what the GCS sees", parents=[common])
    sub.add_parser("env", help="print `export RAY_ADDRESS=… RAY_DASHBOARD_ADDRESS=…`", parents=[common])
    a = p.parse_args(argv)

    if a.cmd == "start":
        st = start(a.workers, a.head_cpus, a.worker_cpus, a.gpus_per_worker, not a.no_dashboard, a.state_dir)
        print(f"local Ray cluster up: head + {a.workers} worker(s) × {a.gpus_per_worker} logical GPU")
        for n in st["nodes"]:
            print(
                f"  {n['role']:<9} pid={n['pid']:<7} cpus={n['num_cpus']} gpus={n['num_gpus']}"
                + (f" gpu_ids={n['gpu_ids']}" if n.get("gpu_ids") else "")
            )
        print("use it with:")
        for line in env_lines(st):
            print("  " + line)
        print("stop it with: cluster/local_cluster.py stop")
        return 0
    if a.cmd == "stop":
        if not load_state(a.state_dir):
            print(f"no running local cluster recorded in {a.state_dir}")
            return 0
        killed = stop(a.state_dir)
        print(f"stopped (forced kills: {killed})")
        return 0
    if a.cmd == "status":
        seen = status(a.state_dir)
        print(json.dumps(seen, indent=2) if seen else f"no local cluster recorded in {a.state_dir}")
        return 0 if seen else 1
    if a.cmd == "env":
        recorded = load_state(a.state_dir)
        if not recorded:
            print(f"no local cluster recorded in {a.state_dir}", file=sys.stderr)
            return 1
        print("\n".join(env_lines(recorded)))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
