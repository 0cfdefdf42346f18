"""OpenTelemetry traces (issue 16, item 3): one request through the real app (own cluster,
Serve's tracing on, tests/tracing_app.py) gives one connected trace at an OTLP/HTTP receiver
started here, which decodes the exported protobuf with opentelemetry-proto: the proxy, the
ingress, the tokenizer and the model replica (Serve's spans) and the engine (ours), the request
id as an attribute. Tracing off (every other test) costs one boolean test per request."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import httpx
import pytest
from reliability import wait_until

from cluster.processes import free_port, kill_sessions, log_tail, spawn
from cluster.processes import wait_until as wait_for_process

REPO = Path(__file__).resolve().parents[1]


class _Receiver(BaseHTTPRequestHandler):
    """POST /v1/traces: an OTLP ExportTraceServiceRequest (protobuf)."""

    spans: ClassVar[list[dict]] = []
    lock = threading.Lock()

    def do_POST(self):
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        req = ExportTraceServiceRequest()
        req.ParseFromString(body)
        with self.lock:
            for rs in req.resource_spans:
                resource = {kv.key: _value(kv.value) for kv in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        self.spans.append(
                            {
                                "name": s.name,
                                "trace_id": s.trace_id.hex(),
                                "span_id": s.span_id.hex(),
                                "parent": s.parent_span_id.hex() or None,
                                "scope": ss.scope.name,
                                "attrs": {kv.key: _value(kv.value) for kv in s.attributes},
                                "resource": resource,
                                "start": s.start_time_unix_nano,
                                "end": s.end_time_unix_nano,
                            }
                        )
        data = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def _value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


@pytest.fixture(scope="module")
def traced_app(tmp_path_factory):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = free_port()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}/v1/traces"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "VLLM_NO_USAGE_STATS": "1",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "200",
        "RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH": "deployments.observability.tracing:otlp_span_processors",
        "RAY_SERVE_TRACING_SAMPLING_RATIO": "1",
        # vLLM's own request spans too (its OTLP exporter over HTTP, to the same receiver)
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
        "TRACING_APP_OVERRIDES": json.dumps({"engine": {"extra": {"otlp_traces_endpoint": endpoint}}}),
    }
    env.pop("RAY_ADDRESS", None)
    log = tmp_path_factory.mktemp("tracing") / "app.log"
    proc = spawn([sys.executable, str(REPO / "tests" / "tracing_app.py"), str(port)], log, env)
    try:

        def died():
            if proc.poll() is not None:
                raise RuntimeError(f"tracing app exited {proc.returncode}: {log_tail(log)}")

        if wait_for_process(lambda: "READY" in log.read_text(errors="replace"), 300, 1.0, died) is None:
            raise TimeoutError(f"tracing app not ready: {log_tail(log)}")
        yield f"http://127.0.0.1:{port}"
    finally:
        # SIGTERM to the app alone: it shuts Serve and Ray down in order; only then whatever is
        # left of its session. (SIGTERM to every process at once stopped the Raylet and the GCS
        # under its `serve.shutdown()`, which then waited out the whole grace period.)
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        kill_sessions({proc.pid}, grace_s=10)
        server.shutdown()
        server.server_close()


def _engine_spans(request_id: str) -> list[dict]:
    with _Receiver.lock:
        return [
            s for s in _Receiver.spans if s["name"] == "llm.engine" and s["attrs"].get("llm.request_id") == request_id
        ]


def _trace_of(request_id: str, timeout_s: float = 60) -> list[dict]:
    """The spans of the request's trace once every process's spans have arrived (each exporter
    sends on its own schedule): a root, the ingress, tokenizer, model replica and engine spans,
    vLLM's span, and every parent present."""

    def complete():
        engine = _engine_spans(request_id)
        if not engine:
            return None
        with _Receiver.lock:
            spans = [s for s in _Receiver.spans if s["trace_id"] == engine[0]["trace_id"]]
        names = [s["name"] for s in spans]
        ids = {s["span_id"] for s in spans}
        parts = (
            any(s["parent"] is None for s in spans),
            any("Ingress" in n for n in names),
            any("Tokenizer" in n for n in names),
            any("ModelReplica" in n for n in names),
            "llm_request" in names,
            all(s["parent"] is None or s["parent"] in ids for s in spans),
        )
        return spans if all(parts) else None

    try:
        return wait_until(complete, timeout_s, 0.5, f"a complete trace for {request_id}")
    except AssertionError:
        with _Receiver.lock:
            seen = sorted({s["name"] for s in _Receiver.spans})
        engine = _engine_spans(request_id)
        mine = (
            []
            if not engine
            else [(s["name"], s["parent"]) for s in _Receiver.spans if s["trace_id"] == engine[0]["trace_id"]]
        )
        raise AssertionError(
            f"no complete trace for {request_id} within {timeout_s} s: its spans {mine}; "
            f"all span names received: {seen}"
        ) from None


@pytest.mark.parametrize("stream", [False, True])
def test_one_connected_trace_per_request(traced_app, stream):
    body = {"prompt": "the central bank", "max_tokens": 4, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    r = httpx.post(f"{traced_app}/v1/completions", timeout=60, json=body)
    assert r.status_code == 200, r.text
    if stream:
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        rid, usage = events[0]["id"], events[-1]["usage"]
    else:
        rid, usage = r.json()["id"], r.json()["usage"]
    spans = _trace_of(rid)
    names = [s["name"] for s in spans]
    print(names)
    by_id = {s["span_id"]: s for s in spans}
    roots = [s for s in spans if s["parent"] is None]
    assert len(roots) == 1, names
    for s in spans:  # connected: every other span's parent is in this trace
        assert s["parent"] is None or s["parent"] in by_id, (s["name"], names)

    def chain(span):
        out = []
        while span is not None:
            out.append(span["name"])
            span = by_id.get(span["parent"])
        return out

    engine = next(s for s in spans if s["name"] == "llm.engine")
    path = chain(engine)
    assert path[-1].startswith("proxy"), path  # the HTTP proxy's span is the root
    assert any("ModelReplica" in n for n in path), path
    assert any("LLMIngress" in n or "Ingress" in n for n in path), path
    assert any("Tokenizer" in n for n in names), names
    tok = next(s for s in spans if "Tokenizer" in s["name"])
    assert any("Ingress" in n for n in chain(tok)), chain(tok)
    assert engine["attrs"]["llm.request_id"] == rid
    # the engine span's counts are the response's usage (EOS may come before max_tokens)
    assert engine["attrs"]["llm.prompt_tokens"] == usage["prompt_tokens"] > 0
    assert engine["attrs"]["llm.completion_tokens"] == usage["completion_tokens"] > 0
    assert len({s["trace_id"] for s in spans}) == 1
    vllm_spans = [s for s in spans if s["name"] == "llm_request"]  # vLLM's own, under ours
    assert vllm_spans and vllm_spans[0]["parent"] == engine["span_id"], names


def test_a_clients_traceparent_continues_its_trace(traced_app):
    """W3C `traceparent` from the client: Serve's proxy makes the request part of that trace."""
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    r = httpx.post(
        f"{traced_app}/v1/completions",
        timeout=60,
        json={"prompt": "markets", "max_tokens": 2},
        headers={"traceparent": f"00-{trace_id}-{parent}-01"},
    )
    assert r.status_code == 200, r.text
    engine = wait_until(lambda: _engine_spans(r.json()["id"]), 60, 0.5, "the request's engine span")
    assert engine[0]["trace_id"] == trace_id
