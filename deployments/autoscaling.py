"""LLM-aware autoscaling of the model deployment (docs/scale-out.md, "LLM-aware autoscaling").

Serve's default policy counts requests: `ceil(ongoing / target_ongoing_requests)`. For an LLM
that misses the cost of a request: a few long ones (long prompts, long generations) fill an
engine's KV cache, queue in its scheduler and stretch everyone's time to first token while
the request count still looks idle. This policy keeps Serve's request count as one signal and
adds the engine's own, from vLLM's stat loggers in each model replica:

* **KV-cache pressure**: the replicas' KV-cache usage summed, over `kv_cache_target` (the
  usage one replica should run at) — replicas needed to hold the KV that is in use.
* **Engine waiting requests**: requests the engine has accepted but cannot batch (KV cache
  or batch full). Above `engine_waiting_per_replica` on average, the demand (running +
  waiting) over what one replica runs now.
* **TTFT**: the engines' mean time to first token over the look-back window. Above
  `ttft_target_s`: one replica more; above `ttft_scale_in_ratio` x the target: no fewer than
  now (latency close to the target is no time to give a GPU back); below: no opinion.

The decision is the largest of these (`decide`), on the signals Serve averages over
`look_back_period_s`. Serve's wrapper of custom policies then applies, as for its own policy,
`min_replicas`/`max_replicas`, `upscale_delay_s`/`downscale_delay_s` (the guard against
flapping) and the scaling factors. The KV and request signals are conserved quantities (they
do not drop because a replica was added), so scaling in happens only when the remaining
replicas would still be below target.

Two halves, one module:

* in the model replica, `engine_autoscaling_stats()` is what its `record_autoscaling_stats`
  returns: Serve calls it periodically and ships the figures to its controller;
* in the Serve controller, `LLMAutoscalingPolicy` (a class: Serve instantiates it once with
  `policy_kwargs`) turns them into a replica count.

The controller runs the policy from Serve's cloudpickle of this module, so this module
imports only the standard library at the top (vLLM lazily, in the replica half).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

logger = logging.getLogger("ray.serve")

POLICY_FUNCTION = "deployments.autoscaling:LLMAutoscalingPolicy"

# The custom metrics a model replica reports (Serve's `record_autoscaling_stats`).
KV = "llm_kv_cache_usage"  # 0-1, gauge
WAITING = "llm_engine_waiting"  # requests in the engine's scheduler queue, gauge
RUNNING = "llm_engine_running"  # requests in the engine's batch, gauge
TTFT_SUM = "llm_ttft_seconds_sum"  # the engine's TTFT histogram: cumulative sum ...
TTFT_COUNT = "llm_ttft_count"  # ... and count (windowed mean from their deltas)

# Policy parameters (`policy_kwargs`) and their defaults; `autoscaling.*` in the service
# config (deployments/config.py) documents each.
DEFAULTS: dict[str, Any] = {
    "kv_cache_target": 0.75,
    "engine_waiting_per_replica": 0.5,
    "ttft_target_s": 0.5,
    "ttft_scale_in_ratio": 0.5,
}

_EPS = 1e-6  # a signal of 2.0000001 replicas is 2, not 3


# ----------------------------------------------------------------------------- replica half


def engine_autoscaling_stats(snapshot: Iterable[Any] | None = None) -> dict[str, float]:
    """The replica's engine figures for Serve's controller, from vLLM's stat loggers (read with
    vLLM's own reader, ~1 ms). `snapshot`: vLLM `Metric`s (for tests); None reads them now."""
    if snapshot is None:
        from vllm.v1.metrics.reader import get_metrics_snapshot

        snapshot = get_metrics_snapshot()
    out = {KV: 0.0, WAITING: 0.0, RUNNING: 0.0, TTFT_SUM: 0.0, TTFT_COUNT: 0.0}
    gauges = {
        "vllm:kv_cache_usage_perc": KV,
        "vllm:num_requests_waiting": WAITING,
        "vllm:num_requests_running": RUNNING,
    }
    for m in snapshot:
        if m.name in gauges:
            out[gauges[m.name]] += float(m.value)
        elif m.name == "vllm:time_to_first_token_seconds":
            out[TTFT_SUM] += float(m.sum)
            out[TTFT_COUNT] += float(m.count)
    return out


def uses_llm_policy(autoscaling_config: Mapping[str, Any] | None) -> bool:
    """Whether a deployment's `autoscaling_config` (an options dict) selects this policy."""
    policy = (autoscaling_config or {}).get("policy")
    if isinstance(policy, Mapping):
        policy = policy.get("policy_function")
    if not isinstance(policy, str):  # a callable
        policy = f"{getattr(policy, '__module__', '')}:{getattr(policy, '__qualname__', '')}"
    return policy.replace(":", ".") == POLICY_FUNCTION.replace(":", ".")


# ----------------------------------------------------------------------------- decision


def windowed_mean_ttft(
    sums: Iterable[list[tuple[float, float]]], counts: Iterable[list[tuple[float, float]]]
) -> float | None:
    """Mean TTFT of the first tokens produced within the window: per replica, the growth of
    the cumulative sum over the growth of the count (each a list of (timestamp, value));
    None when no first token was produced."""
    dsum = dcount = 0.0
    for s, c in zip(sums, counts):
        if len(s) >= 2 and len(c) >= 2:
            ds, dc = s[-1][1] - s[0][1], c[-1][1] - c[0][1]
            if dc > 0 and ds >= 0:
                dsum, dcount = dsum + ds, dcount + dc
    return dsum / dcount if dcount > 0 else None


def decide(
    current: int,
    total_requests: float,
    target_ongoing: float,
    kv: Mapping[Any, float] | None = None,
    waiting: Mapping[Any, float] | None = None,
    running: Mapping[Any, float] | None = None,
    ttft_s: float | None = None,
    **params: Any,
) -> tuple[int, dict[str, float | None]]:
    """Replicas wanted (before Serve's bounds and delays) and each signal's own answer.

    `current`: running replicas (> 0); `total_requests`: Serve's ongoing + queued requests,
    averaged over the look-back window; `kv`, `waiting`, `running`: per replica, averaged over
    the window; `ttft_s`: the window's mean engine TTFT (None: no first token in it)."""
    p = {**DEFAULTS, **params}
    signals: dict[str, float | None] = {
        "requests": total_requests / target_ongoing,
        "kv": None,
        "waiting": None,
        "ttft": None,
    }
    if kv:
        signals["kv"] = sum(kv.values()) / p["kv_cache_target"]
    if waiting:
        n = len(waiting)
        total_waiting = sum(waiting.values())
        if total_waiting / n > p["engine_waiting_per_replica"]:
            total_running = sum((running or {}).get(r, 0.0) for r in waiting)
            per_replica = total_running / n
            # demand (running + waiting) over what a replica runs now; nothing runs: one more
            signals["waiting"] = (total_running + total_waiting) / per_replica if per_replica > 0 else current + 1
    target_s = p["ttft_target_s"]
    if target_s and ttft_s is not None:
        if ttft_s > target_s:
            signals["ttft"] = current + 1
        elif ttft_s > target_s * p["ttft_scale_in_ratio"]:
            signals["ttft"] = current
    wanted = max(v for v in signals.values() if v is not None)
    return max(0, math.ceil(wanted - _EPS)), signals


# ----------------------------------------------------------------------------- Serve policy


class LLMAutoscalingPolicy:
    """Serve custom autoscaling policy (deployment scope), selected with
    `autoscaling.policy: llm` in the service config, which sets

        autoscaling_config.policy = {"policy_function": POLICY_FUNCTION, "policy_kwargs": {...}}

    Serve instantiates it once per deployment with `policy_kwargs` (`DEFAULTS`' keys) and calls
    it with an `AutoscalingContext` on every control-loop tick; its answer then goes through
    Serve's bounds, delays and scaling factors. A decision that differs from the last one is
    logged to the controller's log as `llm-autoscaling:`, with every signal's answer."""

    def __init__(self, **kwargs: Any):
        unknown = set(kwargs) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"unknown LLMAutoscalingPolicy arguments: {sorted(unknown)}")
        self.params = {**DEFAULTS, **kwargs}

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        state = dict(ctx.policy_state or {})
        current = ctx.current_num_replicas
        if current == 0:  # Serve's cold start (requests waiting) is handled by its wrapper
            return ctx.target_num_replicas, state
        metrics = ctx.aggregated_metrics or {}
        raw = ctx.raw_metrics or {}
        replicas = [r for r in (metrics.get(KV) or {})]
        ttft = windowed_mean_ttft(
            [_pairs(raw.get(TTFT_SUM, {}).get(r)) for r in replicas],
            [_pairs(raw.get(TTFT_COUNT, {}).get(r)) for r in replicas],
        )
        desired, signals = decide(
            current,
            ctx.total_num_requests,
            ctx.config.get_target_ongoing_requests(),
            kv=metrics.get(KV),
            waiting=metrics.get(WAITING),
            running=metrics.get(RUNNING),
            ttft_s=ttft,
            **self.params,
        )
        present = {k: v for k, v in signals.items() if v is not None}
        lead = max(present, key=present.__getitem__)
        if desired != state.get("llm_desired"):
            logger.info(
                "llm-autoscaling: %s wants %d replicas (running %d, target %d; lead %s; %s)",
                ctx.deployment_name,
                desired,
                current,
                ctx.target_num_replicas,
                lead,
                ", ".join(f"{k}={'-' if v is None else f'{v:.2f}'}" for k, v in signals.items())
                + (f", ttft_mean={ttft:.3f}s" if ttft is not None else ""),
            )
        state.update(
            llm_desired=desired, llm_lead=lead, llm_signals={k: v for k, v in signals.items() if v is not None}
        )
        return desired, state


def _pairs(series: Any) -> list[tuple[float, float]]:
    """Serve's TimeSeries ([TimeStampedValue(timestamp, value)]) as (timestamp, value)."""
    return [(p.timestamp, p.value) for p in series or ()]
