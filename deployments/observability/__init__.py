"""Cluster-wide request statistics and metrics: `/stats`, `/metrics`, `/metrics/prometheus`
and the same families in Ray's own metrics export. What they mean, how the figures are
gathered and how replicas record them: monitoring/README.md.

Files (recording side first, then the actor's):

* ``config.py``     — ``ObservabilityConfig``, ``REJECTION_REASONS``, ``rejection_reason``
* ``traces.py``     — ``RequestTrace`` (ingress) and ``EngineTrace`` (model replica): one request's times
* ``recorder.py``   — ``StatsRecorder``: each replica's buffer, its background push, the queries
* ``aggregator.py`` — ``ServiceStatsActor``: the named actor every recorder pushes to, exactly once
* ``families.py``   — every metric family: name, help, labels, buckets
* ``exposition.py`` — Prometheus text (``PROMETHEUS_CONTENT_TYPE``) and the histograms behind it
* ``ray_mirror.py`` — the families through ``ray.util.metrics`` (``ray_llm_*``)
* ``stats.py``      — ``mean`` and ``percentile``, shared with the tools
* ``engine_metrics.py`` — vLLM's stat loggers for a model replica's engine and the snapshot of
  their figures its recorder pushes (per-replica ``vllm:*`` families, the /metrics ``engine`` section)
* ``tracing.py``    — OpenTelemetry: the OTLP exporter for Ray Serve's tracing, the engine's span

Importing the package loads neither Ray nor vLLM nor prometheus_client.
"""

from deployments.observability.aggregator import ServiceStatsActor
from deployments.observability.config import REJECTION_REASONS, ObservabilityConfig, rejection_reason
from deployments.observability.exposition import PROMETHEUS_CONTENT_TYPE
from deployments.observability.recorder import StatsRecorder
from deployments.observability.traces import EngineTrace, RequestTrace

__all__ = [
    "PROMETHEUS_CONTENT_TYPE",
    "REJECTION_REASONS",
    "EngineTrace",
    "ObservabilityConfig",
    "RequestTrace",
    "ServiceStatsActor",
    "StatsRecorder",
    "rejection_reason",
]
