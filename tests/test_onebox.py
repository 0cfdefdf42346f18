"""One-box production (issue 15): `cluster.supervise` serving configs/one-box.yaml on 0.0.0.0,
restarting the service after its process is killed; the compose recipe's settings validate
against our config schema.

The live test runs the supervisor as a user would (its own session), on a copy of
configs/one-box.yaml with a free port, reads /health on this machine's non-loopback address,
SIGKILLs `serve run`, waits for the restart, and stops the supervisor with SIGTERM: nothing of
it may be left running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from cluster.processes import free_port, kill_sessions, session_processes
from deployments.config_env import load_config

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "cluster" / "onebox" / "docker-compose.yaml"


def test_the_compose_recipe():
    doc = yaml.safe_load(COMPOSE.read_text())
    svc = doc["services"]["llm-serve"]
    assert svc["restart"] == "unless-stopped" and "8000:8000" in svc["ports"]
    assert svc["command"][:3] == ["python", "-m", "cluster.supervise"]
    assert svc["command"][svc["command"].index("--config") + 1] == "configs/one-box.yaml"
    assert "/health" in " ".join(svc["healthcheck"]["test"])
    assert svc["build"]["dockerfile"] == "cluster/Dockerfile" and (REPO / svc["build"]["dockerfile"]).is_file()
    assert svc["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    # its environment is a valid configuration of the service (as the container would load it)
    cfg = load_config({}, {k: str(v) for k, v in svc["environment"].items()})
    assert cfg.accelerator == "gpu" and cfg.model.model_source == "/models/qwen3-8b"
    assert cfg.lora.adapters["news-lora"] == "/models/news-lora" and cfg.engine.max_model_len == 2048
    one_box = yaml.safe_load((REPO / "configs" / "one-box.yaml").read_text())
    assert one_box["http_options"]["host"] == "0.0.0.0"


def _node_ip() -> str | None:
    from ray.util import get_node_ip_address

    ip = get_node_ip_address()
    return None if ip.startswith("127.") else ip


def _wait(pred, timeout_s: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(2)
    pytest.fail(f"{what} within {timeout_s:.0f}s; log tail:\n{log.read_text(errors='replace')[-3000:]}")


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _serve_run_pid(session: int) -> int | None:
    for pid in session_processes({session}):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(cmd) > 2 and cmd[0].endswith(b"python") and cmd[1].endswith(b"/serve") and cmd[2] == b"run":
            return pid
    return None


@pytest.mark.soak  # the real one-box (two engine starts, ~2.5 min); CI: the stand-in test below
def test_the_supervisor_restarts_the_killed_service(tmp_path):
    ip = _node_ip()
    if ip is None:
        pytest.skip("no non-loopback address on this machine")
    port = free_port()
    cfg = yaml.safe_load((REPO / "configs" / "one-box.yaml").read_text())
    cfg["http_options"]["port"] = port
    config = tmp_path / "one-box.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    log, serve_log = tmp_path / "supervise.log", tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "LLM_SERVE__"))}
    env.update({"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"})
    url = f"http://{ip}:{port}/health"
    services: set[int] = set()  # each `serve run` leads its own session (cluster.processes.spawn)
    with open(log, "wb") as out:
        sup = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cluster.supervise",
                "--config",
                str(config),
                "--health-url",
                url,
                "--log",
                str(serve_log),
            ],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait(lambda: _healthy(url), 300, f"/health on {ip} (0.0.0.0)", serve_log)
        first = _serve_run_pid(sup.pid)
        assert first is not None, sorted(session_processes({sup.pid}))
        services.add(first)
        os.kill(first, signal.SIGKILL)
        _wait(lambda: "restart #1" in log.read_text(), 120, "the supervisor noticing", log)
        _wait(
            lambda: _healthy(url) and _serve_run_pid(sup.pid) not in (None, first),
            300,
            "a restarted, healthy service",
            log,
        )
        services.add(_serve_run_pid(sup.pid))
    finally:
        sup.send_signal(signal.SIGTERM)
        try:
            sup.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pass
        # what the supervisor stopped exits on its own (polled by pid: a deadline, not a pause)
        deadline = time.monotonic() + 30
        while (left := sorted(session_processes({sup.pid, *services}))) and time.monotonic() < deadline:
            time.sleep(0.5)
        kill_sessions({sup.pid, *services}, grace_s=20)
    assert sup.returncode == 0, log.read_text()[-2000:]
    assert not left, f"still running after the supervisor stopped: {left}"


STAND_IN = """
import http.server, os, sys
port, flag = int(sys.argv[1]), sys.argv[2]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        code = 503 if os.path.exists(flag) else 200
        self.send_response(code); self.send_header("Content-Length", "0"); self.end_headers()
    def log_message(self, *a):
        pass
with open(os.path.join(os.path.dirname(flag), "starts"), "a") as f:
    f.write(f"{os.getpid()}\\n")
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def test_the_supervisor_restarts_a_stand_in_that_dies_or_stops_answering(tmp_path):
    """`cluster.supervise.Supervisor` around a stand-in service (an HTTP server whose /health
    fails while a flag file exists): killed → started again; /health failing longer than
    `unhealthy_after_s` → its session stopped by pid and started again; stop → nothing left.
    The real one-box service: `test_the_supervisor_restarts_the_killed_service` (-m soak)."""
    import threading

    from cluster import supervise

    port, flag = free_port(), tmp_path / "unhealthy"
    script = tmp_path / "service.py"
    script.write_text(STAND_IN)
    sup = supervise.Supervisor(
        [sys.executable, str(script), str(port), str(flag)],
        dict(os.environ),
        f"http://127.0.0.1:{port}/health",
        tmp_path / "service.log",
        unhealthy_after_s=1.0,
        poll_s=0.2,
    )
    thread = threading.Thread(target=sup.run, daemon=True)
    thread.start()

    def starts() -> list[int]:
        path = tmp_path / "starts"
        return [int(x) for x in path.read_text().split()] if path.exists() else []

    def wait(pred, what: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while not pred():
            assert time.monotonic() < deadline, f"{what} within {timeout_s} s: starts {starts()}"
            time.sleep(0.2)

    def healthy() -> bool:
        # then a second more: the supervisor (polling every 0.2 s) has seen it answer too — it
        # restarts on a failing /health only once the service has answered
        if supervise.healthy(f"http://127.0.0.1:{port}/health"):
            time.sleep(1.0)
            return True
        return False

    try:
        wait(lambda: len(starts()) == 1 and healthy(), "the service up")
        os.kill(starts()[0], signal.SIGKILL)  # dies
        wait(lambda: len(starts()) == 2 and healthy(), "started again after it died")
        assert sup.restarts == 1
        flag.write_text("")  # stops answering /health (the process lives on)
        wait(lambda: len(starts()) == 3, "started again after /health failed")
        hung = starts()[1]
        wait(lambda: not session_processes({hung}), "the unhealthy one stopped", 30)
        flag.unlink()
        wait(healthy, "healthy again")
        assert sup.restarts == 2
    finally:
        sup.stop.set()
        thread.join(timeout=90)
    assert not thread.is_alive()
    assert not any(session_processes({pid}) for pid in starts())
