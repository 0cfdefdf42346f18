"""vLLM's own engine metrics of one model replica (monitoring/README.md, "Engine metrics").

Nothing here measures: vLLM's stat loggers do, on every engine step.

* `engine_stat_loggers` — the `stat_loggers` the replica's `AsyncLLM` gets: vLLM's
  `PrometheusStatLogger` (the process's prometheus_client registry, which vLLM's server would
  serve) and, with Ray metrics on, vLLM's `RayPrometheusStatLogger` (the same families through
  `ray.util.metrics`, tagged `ReplicaId`: Ray's metrics port shows them as `ray_vllm_*`, as
  Ray Serve LLM's `log_engine_metrics` does).
* `EngineMetrics.snapshot` — the families in `ENGINE_FAMILIES`, read back with vLLM's own reader
  (`vllm.v1.metrics.reader.get_metrics_snapshot`), plus the replica's start time and its GPUs'
  NVML figures: what the replica's recorder pushes to the stats actor with each flush.

vLLM and Ray are imported only when called.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from deployments.observability.families import ENGINE_FAMILIES


def engine_stat_loggers(ray_metrics: bool = True) -> list[Any]:
    """`AsyncLLM(..., stat_loggers=...)`. Ray's logger first: the constructor of every
    `PrometheusStatLogger` (Ray's is one) unregisters the `vllm:` collectors of the process's
    registry, which the plain one then registers."""
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    loggers: list[Any] = []
    if ray_metrics:
        try:
            import ray
            from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

            if ray.is_initialized():
                loggers.append(RayPrometheusStatLogger)
        except ImportError:  # no Ray: the process registry alone
            pass
    return loggers + [PrometheusStatLogger]


def serve_replica_id() -> str | None:
    """This Serve replica's id (Ray's `ReplicaId` tag on `ray_vllm_*`); None outside Serve."""
    serve = sys.modules.get("ray.serve")
    try:
        return serve.get_replica_context().replica_id.unique_id if serve is not None else None
    except Exception:
        return None


class EngineMetrics:
    """The replica's engine figures for its recorder's pushes (`rec.engine_source = em.snapshot`)."""

    def __init__(self, on_cpu: bool, replica: str | None = None, started: float | None = None):
        from deployments.engine.gpu_memory import GpuUsage  # lazily: deployments.engine imports the config

        self.replica = replica or serve_replica_id() or f"pid-{os.getpid()}"
        self.started = time.time() if started is None else started
        self._gpu = GpuUsage(on_cpu)
        self._gpu.read()  # NVML's initialisation (~80 ms on an H200) here, not in a push

    def snapshot(self) -> dict[str, Any]:
        """`{"replica", "started", "metrics": [(name, labels, value)], gpu_*...}`: `labels` as
        sorted (key, value) pairs; `value` a float, or `(count, sum, [(le, cumulative count)])`
        for a histogram."""
        from vllm.v1.metrics.reader import Histogram, get_metrics_snapshot

        metrics: list[tuple[str, tuple, Any]] = []
        for m in get_metrics_snapshot():
            if m.name not in ENGINE_FAMILIES:
                continue
            labels = tuple(sorted(m.labels.items()))
            if isinstance(m, Histogram):
                buckets = sorted(m.buckets.items(), key=lambda kv: float(kv[0]))
                metrics.append((m.name, labels, (m.count, m.sum, buckets)))
            else:
                metrics.append((m.name, labels, float(m.value)))
        out: dict[str, Any] = {"replica": self.replica, "started": self.started, "metrics": metrics}
        out.update(self._gpu.read() or {})
        return out
