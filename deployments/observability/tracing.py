"""OpenTelemetry traces of a request across the deployments (monitoring/README.md, "Traces").

Ray Serve traces its own hops when its tracing is on (`tracing_config` at the top of the Serve
config, or `serve.start(tracing_config=...)`): the proxy's HTTP span, then one span per
deployment call (`replica_handle_request <Deployment> <method>`: the ingress, the tokenizer,
the model replica), each the child of its caller's, the trace context travelling in Serve's
request metadata. This module adds what Serve cannot see:

* `otlp_span_processors` — Serve's `exporter_import_path`: spans go over OTLP/HTTP (protobuf)
  to `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (or `OTEL_EXPORTER_OTLP_ENDPOINT` + /v1/traces), the
  standard OpenTelemetry variables, set in the Ray nodes' environment so the proxy has them too;
* `engine_span` — the model replica's span around one engine request (`llm.engine`), with the
  OpenAI request id, prompt and generated token counts, and the W3C headers that make vLLM's
  own request span (vLLM's `otlp_traces_endpoint`, `engine.extra`) its child.

Off (Serve's tracing off, the default), `engine_span` is one boolean test and the request path
imports nothing from OpenTelemetry.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

TRACER_NAME = "llm_serve"


def otlp_span_processors() -> list[Any]:
    """Span processors for Ray Serve's tracing (`exporter_import_path:
    deployments.observability.tracing:otlp_span_processors`): batched OTLP/HTTP export."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    return [BatchSpanProcessor(OTLPSpanExporter())]


def tracing_enabled() -> bool:
    """Serve set up tracing in this process (its module is loaded only where Serve runs)."""
    utils = sys.modules.get("ray.serve._private.tracing_utils")
    return bool(utils is not None and utils.is_tracing_enabled())


class EngineSpan:
    """One engine request's span; `headers` carry it to vLLM (`trace_headers`)."""

    __slots__ = ("headers", "span")

    def __init__(self, span: Any, headers: dict[str, str] | None):
        self.span, self.headers = span, headers

    def set(self, key: str, value: Any) -> None:
        if self.span is not None:
            self.span.set_attribute(key, value)


_OFF = EngineSpan(None, None)


@contextlib.contextmanager
def engine_span(request_id: str | None, prompt_tokens: int, with_headers: bool = False) -> Iterator[EngineSpan]:
    """`with engine_span(rid, n, vllm_traces) as s: engine.generate(..., trace_headers=s.headers)`:
    the child of the current (Serve replica) span. Not attached as the current span: the
    engine loop is an async generator, resumed by its consumer."""
    if not tracing_enabled():
        yield _OFF
        return
    from opentelemetry import trace
    from opentelemetry.propagate import inject
    from opentelemetry.trace import Status, StatusCode

    span = trace.get_tracer(TRACER_NAME).start_span("llm.engine", kind=trace.SpanKind.INTERNAL)
    span.set_attribute("llm.request_id", request_id or "")
    span.set_attribute("llm.prompt_tokens", prompt_tokens)
    headers: dict[str, str] | None = None
    if with_headers:
        headers = {}
        inject(headers, context=trace.set_span_in_context(span))
    try:
        yield EngineSpan(span, headers)
    except BaseException as exc:
        span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        raise
    finally:
        span.end()
