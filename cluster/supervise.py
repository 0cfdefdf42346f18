"""One-box production without Kubernetes: keep the service up on a single host.

    .venv/bin/python -m cluster.supervise                         # configs/one-box.yaml, fast path
    .venv/bin/python -m cluster.supervise --config configs/serve_config.yaml --health-url http://127.0.0.1:8000/health

Runs `serve run <config>` on Serve's fast path (as `make run`: `configs/fast-path.env` and
`llm-serve-haproxy`) in its own session, and restarts it — the whole session, every Ray
process and HAProxy ended by pid first — when it exits or when `/health` has failed for
`--unhealthy-after` seconds after it first answered. Restarts back off (5 s doubling to 5 min,
reset after 10 healthy minutes). SIGTERM/SIGINT stop the service and exit. Logs: this
program's lines on stderr (prefixed `supervise:`), the service's own output appended to
`--log` (default `logs/serve.log`), Ray's and Serve's logs under `/tmp/ray/session_latest/logs`
(docs/one-box.md). The container recipe (`cluster/onebox/docker-compose.yaml`) runs this as its
command, with Docker restarting the supervisor itself.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

import httpx

from cluster.haproxy_wrapper import fast_path_env
from cluster.processes import REPO, kill_sessions, spawn

DEFAULT_CONFIG = REPO / "configs" / "one-box.yaml"


def say(msg: str) -> None:
    print(f"supervise: {time.strftime('%Y-%m-%d %H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


class Supervisor:
    def __init__(
        self,
        argv: list[str],
        env: dict[str, str],
        health_url: str,
        log: Path,
        unhealthy_after_s: float,
        poll_s: float = 2.0,
    ):
        self.argv, self.env, self.health_url, self.log = argv, env, health_url, log
        self.unhealthy_after_s, self.poll_s = unhealthy_after_s, poll_s
        self.stop = threading.Event()
        self.restarts = 0

    def run(self) -> int:
        backoff = 5.0
        while not self.stop.is_set():
            started = time.monotonic()
            reason = self._run_once()
            if self.stop.is_set():
                return 0
            if time.monotonic() - started > 600:
                backoff = 5.0
            self.restarts += 1
            say(f"{reason}; restart #{self.restarts} in {backoff:.0f} s")
            if self.stop.wait(backoff):
                return 0
            backoff = min(backoff * 2, 300.0)
        return 0

    def _run_once(self) -> str:
        proc = spawn(self.argv, self.log, self.env)
        say(f"started `{' '.join(self.argv)}` (pid {proc.pid}); output in {self.log}")
        seen_healthy, failing_since = False, None
        try:
            while not self.stop.wait(self.poll_s):
                if proc.poll() is not None:
                    return f"the service exited with {proc.returncode}"
                if healthy(self.health_url):
                    if not seen_healthy:
                        say(f"healthy at {self.health_url}")
                    seen_healthy, failing_since = True, None
                elif seen_healthy:
                    failing_since = failing_since or time.monotonic()
                    if time.monotonic() - failing_since > self.unhealthy_after_s:
                        return f"{self.health_url} failing for {self.unhealthy_after_s:.0f} s"
            return "stopping"
        finally:
            self._end(proc)

    def _end(self, proc) -> None:
        """The service's whole session, by pid: Ray's processes and HAProxy outlive `serve run`."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # as Ctrl-C: Serve shuts down cleanly
            try:
                proc.wait(timeout=60)
            except Exception:
                pass
        left = kill_sessions({proc.pid}, grace_s=20)
        if left:
            say(f"killed {left} process(es) that outlived the service")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="Serve config (default configs/one-box.yaml)")
    p.add_argument("--health-url", default="http://127.0.0.1:8000/health")
    p.add_argument(
        "--unhealthy-after",
        type=float,
        default=60.0,
        help="seconds of failing /health (after it first answered) before a restart",
    )
    p.add_argument("--log", type=Path, default=REPO / "logs" / "serve.log")
    p.add_argument("--python-proxy", action="store_true", help="Serve's Python proxy instead of the fast path")
    a = p.parse_args(argv)
    if not a.config.is_file():
        p.error(f"--config: no such file: {a.config}")
    a.log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # its own local cluster, never someone else's
    env.update({"FORWARDED_ALLOW_IPS": ""} if a.python_proxy else fast_path_env())
    serve = Path(sys.executable).parent / "serve"
    sup = Supervisor([str(serve), "run", str(a.config)], env, a.health_url, a.log, a.unhealthy_after)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sup.stop.set())
    return sup.run()


if __name__ == "__main__":
    sys.exit(main())
