"""Prometheus exposition: the histograms the stats actor fills and the text format (0.0.4)
of every family in families.py. prometheus_client is imported only when rendering."""

from __future__ import annotations

import bisect
from typing import Any, Mapping

from deployments.observability.families import BUCKETS, COUNTERS, GAUGES, HISTOGRAMS, LEGACY_GAUGES

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class HistogramCounts:
    """Bucket counts and sum of one histogram family (rendered by HistogramMetricFamily).
    Not prometheus_client's Histogram: no n-at-once observe (a k-token chunk), `_created` series."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # last: above the largest bound (+Inf only)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, n: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += n
        self.sum += value * n
        self.count += n

    def cumulative(self) -> list[tuple[str, float]]:
        from prometheus_client.utils import floatToGoString

        out, acc = [], 0
        for bound, c in zip(self.bounds, self.counts):
            acc += c
            out.append((floatToGoString(bound), acc))
        out.append(("+Inf", self.count))
        return out


def new_histograms() -> dict[str, HistogramCounts]:
    """One empty histogram per family in `HISTOGRAMS`."""
    return {k: HistogramCounts(BUCKETS[k]) for k in HISTOGRAMS}


def metric_families(totals: Mapping[tuple[str, tuple], float], gauges: Mapping[str, int],
                    hists: Mapping[str, HistogramCounts], metrics: Mapping[str, Any] | None = None) -> list[Any]:
    """The families as prometheus_client objects, from the cluster-wide counter totals
    (`(counter, labels) -> value`), gauges and histograms; with `metrics` (the /metrics JSON)
    the replaced service's `LEGACY_GAUGES` too."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    fams: list[Any] = []
    for counter, (name, doc, label_names, always) in COUNTERS.items():
        series: dict[tuple, float] = {labels: 0.0 for labels in always}
        for (n, labels), value in totals.items():
            if n == counter:
                series[labels] = series.get(labels, 0) + value
        fam = CounterMetricFamily(name, doc, labels=list(label_names))
        for labels, value in sorted(series.items()):
            fam.add_metric(list(labels), value)
        fams.append(fam)
    for key, (name, doc) in GAUGES.items():
        fams.append(GaugeMetricFamily(name, doc, value=gauges[key]))
    for key, (name, doc) in HISTOGRAMS.items():
        h = hists[key]
        fams.append(HistogramMetricFamily(name, doc, buckets=h.cumulative(), sum_value=h.sum))
    for name, (doc, path) in LEGACY_GAUGES.items() if metrics is not None else ():
        value: Any = metrics
        for key in path:
            value = value.get(key) if isinstance(value, Mapping) else None
        fam = GaugeMetricFamily(name, doc)
        if value is not None:
            fam.add_metric([], value)
        fams.append(fam)
    return fams


class _Families:
    """A collector that yields fixed families (all `generate_latest` asks of a registry)."""

    def __init__(self, fams: list[Any]):
        self._fams = fams

    def collect(self):
        return iter(self._fams)


def prometheus_text(fams: list[Any]) -> str:
    """Prometheus text exposition (format 0.0.4) of `fams`."""
    from prometheus_client import generate_latest

    return generate_latest(_Families(fams)).decode("utf-8")
