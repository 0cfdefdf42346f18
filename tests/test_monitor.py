"""scripts/monitor.py against a stand-in service: --once prints the figures, handles auth and
an unreachable service."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MONITOR = REPO / "scripts" / "monitor.py"

METRICS = {
    "num_waiting_requests": 4,
    "num_running_requests": 3,
    "total_requests": 120,
    "total_tokens_generated": 5000,
    "num_model_replicas": 1,
    "slo": {
        "ttft_mean": 0.2,
        "ttft_p50": 0.123,
        "ttft_p95": 2.5,
        "ttft_p99": 3.0,
        "decoding_throughput_mean": 40.0,
        "decoding_throughput_p50": 41.5,
        "decoding_throughput_p95": 55.0,
        "total_throughput": 88.8,
        "sample_size": 100,
    },
}
STATS = {
    "total_requests": 120,
    "successful_requests": 110,
    "failed_requests": 10,
    "queue_full_count": 3,
    "current_queue_size": 4,
    "peak_queue_size": 9,
    "available_slots": 0,
    "model_replicas": 1,
    "rejections": {"queue_full": 3, "rate_limited": 5, "invalid": 2, "timeout": 0, "unauthorized": 0, "unavailable": 0},
}


class _Service(BaseHTTPRequestHandler):
    key: str | None = None

    def do_GET(self):
        if self.key and self.headers.get("Authorization") != f"Bearer {self.key}":
            return self._send(
                401, {"error": {"message": "Incorrect API key provided.", "type": "authentication_error"}}
            )
        body = {"/metrics": METRICS, "/stats": STATS}.get(self.path)
        self._send(200 if body else 404, body or {"error": {"message": "Not found."}})

    def _send(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def service():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Service)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        _Service.key = None
        server.shutdown()
        server.server_close()


def _monitor(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(MONITOR), *args], capture_output=True, text=True, timeout=60)


def test_once_plain(service):
    r = _monitor("--url", service, "--once", "--plain")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "waiting 4" in out and "running 3" in out and "total 120" in out
    assert "p50 123 ms" in out and "p95 2.50 s" in out
    assert "now 88.8" in out  # first poll: the window's throughput
    assert "queue_full 3" in out and "rate_limited 5" in out and "invalid 2" in out
    assert "peak queue 9" in out and "free slots 0" in out


def test_once_json_and_api_key(service):
    _Service.key = "sk-mon"
    r = _monitor("--url", service, "--once", "--plain")
    assert r.returncode == 1 and "HTTP 401" in r.stdout and "Incorrect API key" in r.stdout
    r = _monitor("--url", service, "--once", "--json", "--api-key", "sk-mon")
    assert r.returncode == 0
    doc = json.loads(r.stdout)
    assert doc["metrics"]["num_waiting_requests"] == 4 and doc["stats"]["peak_queue_size"] == 9


def test_unreachable_service():
    r = _monitor("--url", "http://127.0.0.1:9", "--once", "--plain", "--timeout", "1")
    assert r.returncode == 1 and "ConnectError" in r.stdout


def test_live_rates_and_rich_render():
    from scripts import monitor

    prev = monitor.Snapshot("u", at=100.0, metrics=dict(METRICS), stats=STATS)
    cur = monitor.Snapshot(
        "u", at=105.0, metrics={**METRICS, "total_tokens_generated": 5500, "total_requests": 130}, stats=STATS
    )
    assert monitor.rates(cur, prev) == {"tokens_per_s": 100.0, "requests_per_s": 2.0}
    assert "now 100.0" in monitor.render_plain(cur, prev)
    from rich.console import Console

    console = Console(record=True, width=160)
    console.print(monitor.render_rich(cur, prev, 5))
    text = console.export_text()
    assert "TTFT" in text and "Rejections" in text and "rate_limited" in text
