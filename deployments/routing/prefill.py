"""The prefill speed a model replica reports to the routers (Serve's routing stats).

`CacheAffinityRouter` lets a request wait for the replica that holds its prefix for at most the
time a prefill of that prefix would take there. That time is the engine's, under its load: on a
GPU a few thousand tokens take a fraction of a second, on a CPU engine seconds. So each model
replica measures it from vLLM's own counters and reports it through Serve's
`record_routing_stats` hook (the controller asks every `request_routing_stats_period_s`; each
router then reads it as `RunningReplica.routing_stats`).

The figure: prompt tokens the engine computed (`vllm:prompt_tokens` less
`vllm:prompt_tokens_cached`) per second of request prefill time (the sum of
`vllm:request_prefill_time_seconds`), over the window since the previous report — the token-
weighted speed at which a request's prefill proceeds with the other requests in the batch.

Invariants: a window with too little prefill in it (under `MIN_PREFILL_S` seconds or
`MIN_REQUESTS` requests) keeps the previous figure; before the first full window, and with the
engine's metrics off, there is none and the routers use `routing.prefill_tokens_per_s`.
"""

from __future__ import annotations

from dataclasses import dataclass

STAT = "prefill_tokens_per_s"  # the key in the replica's routing stats


@dataclass(frozen=True)
class PrefillTotals:
    prompt_tokens: float = 0.0
    cached_tokens: float = 0.0
    prefill_s: float = 0.0
    requests: float = 0.0


def read_totals() -> PrefillTotals | None:
    """This process's vLLM counters (summed over engines); None when vLLM records none."""
    from vllm.v1.metrics.reader import Histogram, get_metrics_snapshot

    values: dict[str, float] = {}
    found = False
    for m in get_metrics_snapshot():
        if m.name == "vllm:request_prefill_time_seconds" and isinstance(m, Histogram):
            values["prefill_s"] = values.get("prefill_s", 0.0) + m.sum
            values["requests"] = values.get("requests", 0.0) + m.count
            found = True
        elif m.name in ("vllm:prompt_tokens", "vllm:prompt_tokens_cached"):
            key = "prompt_tokens" if m.name == "vllm:prompt_tokens" else "cached_tokens"
            values[key] = values.get(key, 0.0) + float(getattr(m, "value", 0.0))
    return PrefillTotals(**values) if found else None


class PrefillSpeed:
    MIN_PREFILL_S = 0.05
    MIN_REQUESTS = 5

    def __init__(self) -> None:
        self._last: PrefillTotals | None = None
        self.tokens_per_s: float | None = None

    def update(self, now: PrefillTotals | None) -> float | None:
        """The figure after a new reading of the totals."""
        if now is None:
            return self.tokens_per_s
        last = self._last or PrefillTotals()
        seconds, requests = now.prefill_s - last.prefill_s, now.requests - last.requests
        if seconds < 0 or requests < 0:  # the counters restarted (a new engine): a new window
            self._last = now
            return self.tokens_per_s
        if seconds >= self.MIN_PREFILL_S and requests >= self.MIN_REQUESTS:
            computed = (now.prompt_tokens - last.prompt_tokens) - (now.cached_tokens - last.cached_tokens)
            self.tokens_per_s = max(computed, 0.0) / seconds
            self._last = now
        return self.tokens_per_s

    def routing_stats(self) -> dict[str, float]:
        """`record_routing_stats`' answer: the figure after reading vLLM's counters now (a
        failed reading keeps the last figure: the routers fall back, never the replica)."""
        try:
            rate = self.update(read_totals())
        except Exception:  # a routing hint must not fail Serve's stats call
            rate = self.tokens_per_s
        return {STAT: rate} if rate else {}
