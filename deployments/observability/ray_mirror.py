"""The stats actor's copy of every family through `ray.util.metrics`, which Ray exports on each
node's metrics port as `ray_<name>` (the port KubeRay's Prometheus scrapes)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from deployments.observability.families import BUCKETS, COUNTERS, GAUGES, HISTOGRAMS

logger = logging.getLogger("ray.serve")


class RayMirror:
    """Ray metrics for the families; `ok` is False (and every call a no-op) without Ray."""

    def __init__(self):
        self.ok = False
        self._mirrored: dict[tuple[str, tuple], float] = {}  # counter totals already exported
        try:
            import ray
            from ray.util.metrics import Counter, Gauge, Histogram

            if not ray.is_initialized():
                return
            # Ray appends `_total` to counters itself: register without the suffix.
            self.counters = {
                k: (Counter(n, description=f"{n} (mirror of /metrics/prometheus)", tag_keys=tags), tags)
                for k, (n, _doc, tags, _always) in COUNTERS.items()
            }
            self.gauge_objs = {
                k: Gauge(n, description=f"{n} (mirror of /metrics/prometheus)") for k, (n, _doc) in GAUGES.items()
            }
            self.hists = {
                k: Histogram(name, description=doc, boundaries=list(BUCKETS[k]))
                for k, (name, doc) in HISTOGRAMS.items()
            }
            self.ok = True
        except Exception as exc:  # metrics are optional; never fail the actor over them
            logger.warning("Ray metrics mirror disabled: %s", exc)

    def sync(self, totals: Mapping[tuple[str, tuple], float], gauges: Mapping[str, int]) -> None:
        """Bring the counters up to the cluster-wide `totals` (Ray counters only increase:
        export the growth since the last sync) and set the gauges."""
        if not self.ok:
            return
        for key, value in totals.items():
            delta = value - self._mirrored.get(key, 0)
            if delta > 0:
                self.inc(key[0], key[1], delta)
                self._mirrored[key] = value
        self.gauges(gauges)

    def inc(self, name: str, labels: tuple, value: float) -> None:
        entry = self.counters.get(name) if self.ok else None
        if entry is None:
            return
        counter, tags = entry
        counter.inc(value, tags=dict(zip(tags, labels)) if tags else None)

    def gauges(self, g: Mapping[str, int]) -> None:
        if self.ok:
            for k, gauge in self.gauge_objs.items():
                gauge.set(g[k])

    def observe(self, name: str, value: float, n: int) -> None:
        if self.ok:
            h = self.hists[name]
            for _ in range(n):  # a coalesced chunk of k tokens: k equal gaps
                h.observe(value)
