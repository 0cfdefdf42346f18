"""The `observability` settings and how an unsuccessful request maps to a rejection reason."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from deployments.actors import DEFAULT_NAMESPACE

REJECTION_REASONS = ("queue_full", "rate_limited", "invalid", "timeout", "unauthorized", "unavailable")


class ObservabilityConfig(BaseModel):
    """Cluster-wide statistics (`/stats`, `/metrics`, `/metrics/prometheus`, Ray metrics)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        True, description="Record statistics. false: the endpoints report zeros and nothing is pushed."
    )
    flush_interval_s: float = Field(
        1.0, gt=0, le=60, description="How often each replica pushes its buffer to the stats actor."
    )
    window_s: float = Field(
        300.0, gt=0, description="SLO percentiles cover requests finished in the last `window_s` seconds."
    )
    max_samples: int = Field(10_000, gt=0, description="At most this many recent requests in the SLO window.")
    gauge_ttl_s: float = Field(
        10.0, gt=0, description="A replica silent for this long no longer counts in waiting/running/replicas (it died)."
    )
    join_ttl_s: float = Field(
        10.0,
        gt=0,
        description="How long the actor waits for the model replica's record of a request "
        "(queue time, engine time, overhead) before finishing it without.",
    )
    ray_metrics: bool = Field(True, description="Mirror every family into Ray's metrics export (`ray_llm_*`).")
    engine_metrics: bool = Field(
        True,
        description="Export vLLM's own engine metrics per model replica (KV-cache usage, engine running/waiting, "
        "preemptions, prefix cache, tokens, engine queue time, step sizes; GPU memory and utilization by NVML): "
        "`vllm:*` and `llm_gpu_*` families labelled `replica` in /metrics/prometheus, the /metrics `engine` "
        "section, and (with `ray_metrics`) vLLM's Ray logger on Ray's metrics port (`ray_vllm_*`).",
    )
    actor_name: str | None = Field(None, description="Name of the stats actor; default `service_stats.<app name>`.")
    namespace: str = Field(DEFAULT_NAMESPACE, description="Ray namespace of the stats actor.")

    def actor_settings(self) -> dict[str, Any]:
        return {
            "window_s": self.window_s,
            "max_samples": self.max_samples,
            "gauge_ttl_s": self.gauge_ttl_s,
            "join_ttl_s": self.join_ttl_s,
        }


def rejection_reason(status: int, code: str | int | None = None) -> str | None:
    """Reason label of an unsuccessful request (None: not a rejection, e.g. 2xx, 500, 499)."""
    if status < 400:
        return None
    if code == "queue_full":
        return "queue_full"
    if status == 429:
        return "rate_limited"
    if status in (401, 403):
        return "unauthorized"
    if status in (408, 504) or code == "timeout":
        return "timeout"
    if status == 499:
        return None  # client went away: counted in llm_requests_total{status="499"} only
    if status == 503:
        return "unavailable"
    if status < 500:
        return "invalid"
    return None
