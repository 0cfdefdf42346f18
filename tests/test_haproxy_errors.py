"""HAProxy's own answers on the fast path are OpenAI error objects: a backend that is down is a
503 JSON with Retry-After (Ray's configuration sends a plain-text 500), and while HAProxy has just
(re)started without routes every path is a 503 JSON (Ray's: a plain-text 404). The real HAProxy
binary serves the rewritten configuration on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from cluster.haproxy_wrapper import add_rules, openai_errors, real_binary, rules
from cluster.processes import free_port

# The shapes Ray Serve 2.60 writes (ray/serve/_private/haproxy_templates.py), abridged: before the
# routes are known (no use_backend) and with one application routed to a backend.
DEFAULTS = """global
    maxconn 256
defaults
    mode http
    timeout connect 2s
    timeout client 10s
    timeout server 10s
    errorfile 502 {err}
    errorfile 503 {err}
    errorfile 504 {err}
frontend http_frontend
    bind 127.0.0.1:{port}
"""
NO_ROUTES = (
    DEFAULTS
    + """    default_backend default_backend
backend default_backend
    http-request return status 404 content-type text/plain lf-string "Path \\'%[path]\\' not found. Ping http://.../-/routes for available routes."
"""
)
ROUTED = (
    DEFAULTS
    + """    acl is_llm path_beg /
    use_backend llm if is_llm
    default_backend default_backend
backend default_backend
    http-request return status 404 content-type text/plain lf-string "Path \\'%[path]\\' not found."
backend llm
    server SERVE_REPLICA_a 127.0.0.1:{dead} check
"""
)


def _ray_500(tmp: Path) -> Path:
    err = tmp / "500.http"
    err.write_text("HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\n\r\nInternal Server Error")
    return err


def test_the_rewrite(tmp_path: Path):
    err = _ray_500(tmp_path)
    routed = openai_errors(ROUTED.format(err=err, port=1, dead=2), tmp_path)
    assert str(err) not in routed
    assert f"errorfile 503 {tmp_path / 'llm-serve-503.http'}" in routed
    assert f"errorfile 504 {tmp_path / 'llm-serve-504.http'}" in routed
    assert "status 404" in routed  # routes known: an unknown path stays a 404
    starting = openai_errors(NO_ROUTES.format(err=err, port=1), tmp_path)
    assert "status 404" not in starting and "return status 503 content-type application/json" in starting
    raw = (tmp_path / "llm-serve-503.http").read_bytes().decode()
    head, body = raw.split("\r\n\r\n", 1)
    assert head.startswith("HTTP/1.1 503 ") and "Retry-After: 1" in head
    assert f"Content-Length: {len(body.encode())}" in head
    assert set(json.loads(body)["error"]) == {"message", "type", "param", "code"}


def _serve(tmp_path: Path, template: str, **fmt) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cfg = tmp_path / f"haproxy-{port}.cfg"
    text = template.format(err=_ray_500(tmp_path), port=port, **fmt)
    cfg.write_text(openai_errors(add_rules(text, rules({})), tmp_path))
    check = subprocess.run([real_binary(), "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    proc = subprocess.Popen([real_binary(), "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            httpx.get(url + "/health", timeout=2)
            return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    pytest.fail(f"HAProxy did not listen: {proc.stderr.read() if proc.stderr else ''}")


@pytest.mark.parametrize("shape", ["starting, no routes", "backend down"])
def test_haproxy_answers_openai_503s(tmp_path: Path, shape: str):
    template = NO_ROUTES if shape.startswith("starting") else ROUTED
    proc, url = _serve(tmp_path, template, dead=free_port())
    try:
        r = httpx.post(url + "/v1/chat/completions", json={"messages": []}, timeout=20)
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "1" and r.headers["content-type"].startswith("application/json")
        err = r.json()["error"]
        assert err["code"] == "service_unavailable" and err["type"] == "service_unavailable_error"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert os.path.exists(tmp_path / "llm-serve-503.http")
