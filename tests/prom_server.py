"""A real Prometheus server for tests: scrapes given targets, answers PromQL over its HTTP API.

    from prom_server import PromServer, find_prometheus

    with PromServer(["127.0.0.1:8123"], metrics_path="/metrics/prometheus",
                    scrape_interval="1s", rule_files=["monitoring/alerts.yaml"]) as prom:
        prom.wait_for_scrape()                       # first successful scrape of every target
        value = prom.wait_for_value('sum(llm_requests_total)', lambda v: v == 12, timeout_s=20)
        rows = prom.query('llm_requests_total')      # raw instant-vector result

The server listens on 127.0.0.1:<free port>, keeps its TSDB in a temporary folder and is
stopped by its pid (terminate, then kill) — never by name. Debian's `prometheus` package
provides the binary (`scripts/install_test_deps.sh`).
"""

from __future__ import annotations

import math
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import yaml

from cluster.processes import free_port

REPO = Path(__file__).resolve().parents[1]


def find_prometheus() -> str | None:
    return shutil.which("prometheus")


def find_promtool() -> str | None:
    return shutil.which("promtool")


def ensure_prometheus_tools() -> str | None:
    """Path of promtool, installing Debian's `prometheus` package with
    scripts/install_test_deps.sh when it is missing and we may (root or passwordless sudo).
    None when it cannot be had; the reason is in the returned-None caller's skip message."""
    if find_promtool() and find_prometheus():
        return find_promtool()
    script = REPO / "scripts" / "install_test_deps.sh"
    try:
        subprocess.run(["bash", str(script)], check=True, timeout=900, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    except (subprocess.SubprocessError, OSError):
        return None
    return find_promtool() if find_prometheus() else None


class PromServer:
    """One Prometheus process. Use as a context manager, or `start()` / `stop()`."""

    def __init__(
        self,
        targets: Sequence[str],
        *,
        metrics_path: str = "/metrics/prometheus",
        scrape_interval: str = "1s",
        job: str = "llm-serve",
        rule_files: Sequence[str | Path] = (),
        bearer_token: str | None = None,
        extra_scrape_configs: Sequence[dict] = (),
        port: int | None = None,
        binary: str | None = None,
        workdir: str | Path | None = None,
    ):
        self.targets = list(targets)
        self.metrics_path = metrics_path
        self.scrape_interval = scrape_interval
        self.job = job
        self.rule_files = [str(Path(p).resolve()) for p in rule_files]
        self.bearer_token = bearer_token
        self.extra_scrape_configs = list(extra_scrape_configs)
        self.port = port or free_port()
        self.binary = binary or find_prometheus()
        self._own_dir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="prom-test-"))
        self.proc: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ lifecycle

    def config(self) -> dict[str, Any]:
        job: dict[str, Any] = {
            "job_name": self.job,
            "metrics_path": self.metrics_path,
            "scrape_interval": self.scrape_interval,
            "scrape_timeout": self.scrape_interval,
            "static_configs": [{"targets": self.targets}],
        }
        if self.bearer_token:
            job["authorization"] = {"type": "Bearer", "credentials": self.bearer_token}
        return {
            "global": {"scrape_interval": self.scrape_interval, "evaluation_interval": self.scrape_interval},
            "rule_files": self.rule_files,
            "scrape_configs": [job, *self.extra_scrape_configs],
        }

    def start(self, timeout_s: float = 60.0) -> PromServer:
        if not self.binary:
            raise FileNotFoundError("prometheus binary not found (run scripts/install_test_deps.sh)")
        cfg = self.workdir / "prometheus.yml"
        cfg.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        self.log_path = self.workdir / "prometheus.log"
        log = open(self.log_path, "wb")  # noqa: SIM115  (the child keeps writing to it; closed below)
        self.proc = subprocess.Popen(
            [
                self.binary,
                f"--config.file={cfg}",
                f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"prometheus not ready after {timeout_s}s: {self.log_tail()}")

    def stop(self) -> None:
        """Terminate by pid (SIGTERM, then SIGKILL after 10 s); remove the temporary folder."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> PromServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, n: int = 2000) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-n:]
        except (OSError, AttributeError):
            return ""

    # ------------------------------------------------------------------ API

    def api(self, path: str, **params: Any) -> Any:
        r = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = r.json()
        if body.get("status") != "success":
            raise RuntimeError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant query; the result list (vector: [{"metric": {...}, "value": [ts, "v"]}])."""
        data = self.api("query", query=promql)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def query_value(self, promql: str) -> float | None:
        """The single value of an instant query (None when the result is empty)."""
        rows = self.query(promql)
        if not rows:
            return None
        if len(rows) > 1:
            raise ValueError(f"{promql!r} returned {len(rows)} series; aggregate it")
        return float(rows[0]["value"][1])

    def wait_for_value(
        self, promql: str, predicate: Callable[[float], bool] = lambda v: True, timeout_s: float = 30.0
    ) -> float:
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = self.query_value(promql)
                if last is not None and not math.isnan(last) and predicate(last):
                    return last
            except (httpx.HTTPError, RuntimeError, ValueError) as exc:
                last = exc
            time.sleep(0.5)
        raise TimeoutError(f"{promql!r}: last value {last!r} after {timeout_s}s; targets: {self.targets_health()}")

    def targets_health(self) -> list[dict[str, Any]]:
        try:
            return [
                {"url": t.get("scrapeUrl"), "health": t.get("health"), "error": t.get("lastError")}
                for t in self.api("targets")["activeTargets"]
            ]
        except Exception as exc:
            return [{"error": repr(exc)}]

    def wait_for_scrape(self, timeout_s: float = 30.0) -> None:
        """Until every target was scraped successfully at least once."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            health = self.targets_health()
            if health and all(t.get("health") == "up" for t in health):
                return
            time.sleep(0.3)
        raise TimeoutError(f"targets not up after {timeout_s}s: {self.targets_health()}")

    def rules(self) -> list[dict[str, Any]]:
        return [r for g in self.api("rules")["groups"] for r in g["rules"]]


if __name__ == "__main__":  # manual: python tests/prom_server.py 127.0.0.1:8000
    import sys

    with PromServer(sys.argv[1:] or ["127.0.0.1:8000"]) as p:
        print("prometheus at", p.url, "pid", p.proc.pid if p.proc else None)
        try:
            while True:
                time.sleep(5)
                print(p.targets_health())
        except KeyboardInterrupt:
            pass
