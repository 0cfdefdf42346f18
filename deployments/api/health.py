"""GET /health: healthy only when the model deployment has a running replica whose engine
answers. Our fields, and beside them the replaced Flask service's (docs/migration.md):
`gpu` `{"allocated_gb", "reserved_gb", "free_gb"}` (NVML, null on CPU) and, under `limits`,
`max_concurrent_requests`, `max_queue_size`, `rate_limit`. `compat.legacy_health_status`
makes `status` say "ok" (the old word) instead of "healthy".

Who sees what (docs/security.md S5): with auth on, the public answer is `status` and the
replaced service's fields its health checks read (`gpu`, and `limits` with
`max_concurrent_requests`, `max_queue_size`, `rate_limit`) — no pids, node ids, GPU ids,
paths or deployment states; an admin key gets the whole report. The same with auth off: the
details follow the admin routes' rule (an admin key, `auth.admin_env_var` or `role: admin`;
without one configured, nobody gets them)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, NamedTuple

from fastapi.responses import JSONResponse

from deployments.admission.capacity import ModelCalls, deployment_states
from deployments.admission.rate_limit import RateLimiter
from deployments.api.errors import is_unavailable
from deployments.config import ServiceConfig

logger = logging.getLogger("ray.serve")

# The probes' routes: public whatever `auth.public_paths` says (they disclose a status only).
PROBE_PATHS = frozenset({"/health/live", "/health/ready"})


class ServingHealth:
    """One per ingress replica: the model handle and what the limits report reads.

    Cheap and honest (docs/reliability.md): `/health/live` answers from this process alone;
    `/health` and `/health/ready` read one check (`_check`: the model replica's engine, Serve's
    deployment states in a worker thread, the adapter registry — each under
    `health.check_timeout_s`, all at once) that every caller within `health.cache_s` shares,
    so a flood of health calls costs one check per period and nothing ever blocks the event
    loop."""

    def __init__(
        self,
        model,
        config: ServiceConfig,
        model_options: dict[str, Any],
        calls: ModelCalls,
        limiter: RateLimiter,
        auth_enabled: bool,
        adapters: Any = None,
    ):
        self.model, self.config, self.model_options = model, config, model_options
        self.calls, self.limiter, self.auth_enabled = calls, limiter, auth_enabled
        self.adapters = adapters  # the adapter registry client (`get`/`list`); None: not checked
        self.ok_word = "ok" if config.compat.legacy_health_status else "healthy"
        self.cache_s = config.health.cache_s
        self.timeout_s = config.health.check_timeout_s
        self._last: dict[str, Any] | None = None  # the latest check's result
        self._checked_m = 0.0  # when it finished (monotonic)
        self._checking: asyncio.Task | None = None  # the check under way, shared by every caller
        self._status_call: asyncio.Future | None = None  # serve.status() in its thread
        self.checks_done = 0

    PUBLIC_LIMITS = ("max_concurrent_requests", "max_queue_size", "rate_limit")

    async def health(self, detailed: bool = True) -> JSONResponse:
        """The replaced service's /health (status, gpu, limits) and, for admins, the whole
        report. Healthy = ready: every part a request needs can serve it."""
        check = await self.current()
        ok = check["ready"]
        report: dict[str, Any] = {"model": self.config.model.model_id, "limits": self.limits_report()}
        report["replica"] = check["replica"]
        report["deployments"] = check["deployments"]
        report["status"] = self.ok_word if ok else "unhealthy"
        replica = report.get("replica") or {}
        report["accelerator_memory_gb"] = replica.get("accelerator_memory_gb")
        report["gpu"] = replica.get("gpu")  # the replaced service's field: null on CPU
        report["checks"] = check["checks"]
        report["checked_at"] = check["checked_at"]
        report["age_s"] = round(max(0.0, time.monotonic() - self._checked_m), 3)
        if not detailed:
            report = {
                "status": report["status"],
                "gpu": _public_gpu(report["gpu"]),
                "limits": {k: report["limits"][k] for k in self.PUBLIC_LIMITS},
            }
        return JSONResponse(report, status_code=200 if ok else 503, headers=self._retry(ok))

    def live(self) -> JSONResponse:
        """Liveness: this ingress process runs its event loop. No call to anything."""
        return JSONResponse({"status": "alive"})

    async def ready(self, detailed: bool = True) -> JSONResponse:
        """Readiness: 200 when a request of every kind the config promises can be served now
        (the model deployment, the tokenizer, the default model and every configured adapter);
        503 naming what is missing (the names for admins only)."""
        check = await self.current()
        ok = check["ready"]
        body: dict[str, Any] = {"status": "ready" if ok else "not_ready"}
        if detailed:
            body.update(
                checks=check["checks"],
                reasons=check["reasons"],
                checked_at=check["checked_at"],
                age_s=round(max(0.0, time.monotonic() - self._checked_m), 3),
            )
        return JSONResponse(body, status_code=200 if ok else 503, headers=self._retry(ok))

    def _retry(self, ok: bool) -> dict[str, str]:
        return {} if ok else {"Retry-After": str(max(1, round(self.cache_s or 1)))}

    async def current(self) -> dict[str, Any]:
        """The latest check when younger than `cache_s`, else a new one — one at a time,
        shared by every caller and not cancelled when one of them goes away."""
        if self._last is not None and time.monotonic() - self._checked_m < self.cache_s:
            return self._last
        task = self._checking
        if task is None or task.done():
            task = self._checking = asyncio.get_running_loop().create_task(self._check())
        return await asyncio.shield(task)

    async def _check(self) -> dict[str, Any]:
        state, states, registered = await asyncio.gather(
            self._replica(), self._deployment_states(), self._registered_adapters()
        )
        replica = state.entry
        checks: dict[str, Any] = {}
        reasons: list[str] = []
        checks["engine"] = replica.get("engine")
        if not state.ok:
            reasons.append(f"model engine {replica.get('engine')}")
        if "error" in states:
            checks["deployments"] = f"unknown ({states['error']})"
        for name, what in (("ModelReplica", "model"), ("PromptTokenizer", "tokenizer")):
            dep = states.get(name)
            if dep is None:
                continue
            running = int(dep.get("running_replicas", 0))
            checks[f"{what}_replicas"] = running
            if running == 0:
                reasons.append(f"no running {what} replica")
                if what == "model" and state.busy:
                    # the call waited for a replica, not behind busy ones
                    replica["engine"] = checks["engine"] = "no running replica"
        wanted = self.required_adapters()
        if wanted:
            if isinstance(registered, str):
                checks["adapters"] = registered
                reasons.append(f"adapter registry {registered}")
            else:
                missing = sorted(wanted - registered)
                checks["adapters"] = {name: name in registered for name in sorted(wanted)}
                reasons += [f"adapter {name} is not registered" for name in missing]
        result = {
            "ready": not reasons,
            "reasons": reasons,
            "checks": checks,
            "replica": replica,
            "deployments": states,
            "checked_at": time.time(),
        }
        self._last, self._checked_m = result, time.monotonic()
        self.checks_done += 1
        if reasons:
            logger.warning("not ready: %s", "; ".join(reasons))
        return result

    async def _replica(self) -> ReplicaState:
        try:
            report = dict(await asyncio.wait_for(self.model.health.remote(), timeout=self.timeout_s))
        except Exception as exc:
            if is_unavailable(exc):
                self.calls.lost()
            return replica_state(exc, self.calls.replica_lost())
        ok = report.get("engine") == "ok"  # else "dead: …" (model_replica.health)
        if ok:
            self.calls.answered()
        else:
            self.calls.lost()  # that replica ends itself: what answers next is not "busy"
        return ReplicaState(report, ok, False)

    async def _deployment_states(self) -> dict[str, Any]:
        """Serve's status (a controller call, blocking) in a worker thread; never two at once:
        a call still hanging from an earlier check is awaited again, not doubled."""
        call = self._status_call
        if call is None or call.done():
            call = self._status_call = asyncio.ensure_future(asyncio.to_thread(deployment_states))
        try:
            return await asyncio.wait_for(asyncio.shield(call), self.timeout_s)
        except TimeoutError:
            return {"error": "TimeoutError"}

    def required_adapters(self) -> set[str]:
        """Adapter names the config promises: `lora.adapters`, and what `model.default_model`,
        `classification.model` and the aliases name, when that is not the base model."""
        cfg = self.config
        if self.adapters is None or not cfg.lora.engine_enabled():
            return set()
        names = set(cfg.lora.adapters)
        aliases = cfg.model.aliases
        for name in (cfg.model.default_model, cfg.classification.model, *aliases.values()):
            if name:
                names.add(aliases.get(name, name))
        names.discard(cfg.model.model_id)
        return names

    async def _registered_adapters(self) -> set[str] | str:
        """Names in the adapter registry, or what went wrong (a string)."""
        if not self.required_adapters():
            return set()
        try:
            refs = await asyncio.wait_for(self.adapters.list(), self.timeout_s)
        except Exception as exc:
            return f"unavailable ({type(exc).__name__})"
        return {ref.name for ref in refs}

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


class ReplicaState(NamedTuple):
    """The model replica's state as this ingress replica's deep health call found it."""

    entry: dict[str, Any]  # /health's `replica` entry: the replica's own report, or why there is none
    ok: bool  # healthy
    busy: bool  # no answer because every slot is taken, as far as this replica can tell


def replica_state(exc: Exception, replica_lost: bool = False) -> ReplicaState:
    """/health's `replica` entry when the model replica's deep health call did not answer.
    No answer in time is "busy" (healthy: every slot taken by long generations), unless a model
    replica died under a call and none has answered since (`replica_lost`): Serve's router then
    holds the call because no replica runs."""
    from ray.serve.exceptions import BackPressureError

    if isinstance(exc, BackPressureError):
        return ReplicaState({"engine": "busy (all slots and queue places taken)"}, True, True)
    if isinstance(exc, asyncio.TimeoutError):
        if replica_lost:
            return ReplicaState({"engine": "unavailable (a model replica died; none has answered since)"}, False, False)
        return ReplicaState({"engine": "busy (no answer within the check's timeout)"}, True, True)
    return ReplicaState({"engine": f"unavailable: {type(exc).__name__}"}, False, False)
