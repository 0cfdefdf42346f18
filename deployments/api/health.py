"""GET /health: healthy only when the model deployment has a running replica whose engine
answers. Our fields, and beside them the replaced Flask service's (docs/migration.md):
`gpu` `{"allocated_gb", "reserved_gb", "free_gb"}` (NVML, null on CPU) and, under `limits`,
`max_concurrent_requests`, `max_queue_size`, `rate_limit`. `compat.legacy_health_status`
makes `status` say "ok" (the old word) instead of "healthy".

Who sees what (docs/security.md S5): with auth on, the public answer is `status` and the
replaced service's fields its health checks read (`gpu`, and `limits` with
`max_concurrent_requests`, `max_queue_size`, `rate_limit`) — no pids, node ids, GPU ids,
paths or deployment states; an admin key gets the whole report. With auth off everyone is
an admin (as every route is open) and gets the whole report."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi.responses import JSONResponse

from deployments.admission.capacity import ModelCalls
from deployments.admission.rate_limit import RateLimiter
from deployments.config import ServiceConfig


class ServingHealth:
    """One per ingress replica: the model handle and what the limits report reads."""

    def __init__(
        self,
        model,
        config: ServiceConfig,
        model_options: dict[str, Any],
        calls: ModelCalls,
        limiter: RateLimiter,
        auth_enabled: bool,
    ):
        self.model, self.config, self.model_options = model, config, model_options
        self.calls, self.limiter, self.auth_enabled = calls, limiter, auth_enabled
        self.ok_word = "ok" if config.compat.legacy_health_status else "healthy"

    PUBLIC_LIMITS = ("max_concurrent_requests", "max_queue_size", "rate_limit")

    async def health(self, detailed: bool = True) -> JSONResponse:
        report: dict[str, Any] = {"model": self.config.model.model_id, "limits": self.limits_report()}
        ok = True
        try:
            report["replica"] = await asyncio.wait_for(self.model.health.remote(), timeout=5.0)
            ok = report["replica"].get("engine") == "ok"
        except Exception as exc:
            report["replica"], ok = replica_state(exc)
        report["deployments"] = deployment_states()
        model_state = report["deployments"].get("ModelReplica")
        if model_state is not None and model_state.get("running_replicas", 0) == 0:
            ok = False
        report["status"] = self.ok_word if ok else "unhealthy"
        replica = report.get("replica") or {}
        report["accelerator_memory_gb"] = replica.get("accelerator_memory_gb")
        report["gpu"] = replica.get("gpu")  # the replaced service's field: null on CPU
        if not detailed:
            report = {
                "status": report["status"],
                "gpu": _public_gpu(report["gpu"]),
                "limits": {k: report["limits"][k] for k in self.PUBLIC_LIMITS},
            }
        return JSONResponse(report, status_code=200 if ok else 503)

    def limits_report(self) -> dict[str, Any]:
        opts, limits = self.model_options, self.config.limits
        return {
            "max_ongoing_requests": opts.get("max_ongoing_requests"),
            "max_queued_requests": opts.get("max_queued_requests"),
            "autoscaling": bool(opts.get("autoscaling_config")),
            # this ingress replica's capacity gate: requests it has in flight to the model
            # deployment against the most Serve admits from it (None: Serve alone decides)
            **self.calls.report(),
            "max_tokens_cap": limits.max_tokens_cap,
            "max_model_len": self.config.engine.max_model_len,
            "request_timeout_s": limits.request_timeout_s,
            "default_temperature": limits.default_temperature,
            "rate_limits": self.limiter.describe(),
            # the replaced service's names for the same limits (per model replica)
            "max_concurrent_requests": opts.get("max_ongoing_requests"),
            "max_queue_size": opts.get("max_queued_requests"),
            "rate_limit": self.limiter.summary("API key, else IP" if self.auth_enabled else "IP"),
        }


def _public_gpu(gpu: Any) -> Any:
    """The replaced service's three memory figures only (no device list)."""
    if not isinstance(gpu, dict):
        return gpu
    return {k: gpu.get(k) for k in ("allocated_gb", "reserved_gb", "free_gb")}


def replica_state(exc: Exception) -> tuple[dict[str, Any], bool]:
    """/health's `replica` entry when the model replica's deep health call did not answer."""
    from ray.serve.exceptions import BackPressureError

    if isinstance(exc, BackPressureError):
        return {"engine": "busy (all slots and queue places taken)"}, True
    if isinstance(exc, asyncio.TimeoutError):
        return {"engine": "busy (no answer within 5 s)"}, True
    return {"engine": f"unavailable: {type(exc).__name__}"}, False


def deployment_states() -> dict[str, Any]:
    try:
        from ray import serve

        app_name = serve.get_replica_context().app_name
        status = serve.status().applications[app_name]
    except Exception as exc:  # outside Serve, or the controller is briefly unreachable
        return {"error": f"{type(exc).__name__}"}
    out = {}
    for name, dep in status.deployments.items():
        states = {str(k.value if hasattr(k, "value") else k): v for k, v in dep.replica_states.items()}
        out[name] = {
            "status": str(dep.status.value if hasattr(dep.status, "value") else dep.status),
            "replica_states": states,
            "running_replicas": states.get("RUNNING", 0),
        }
    return out
