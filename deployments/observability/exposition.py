"""Prometheus exposition: the histograms the stats actor fills and the text format (0.0.4)
of every family in families.py. prometheus_client is imported only when rendering."""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from typing import Any

from deployments.observability.families import (
    BUCKETS,
    COUNTERS,
    ENGINE_FAMILIES,
    GAUGES,
    HISTOGRAMS,
    LEGACY_GAUGES,
    REPLICA_GAUGES,
)

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class HistogramCounts:
    """Bucket counts and sum of one histogram family (rendered by HistogramMetricFamily).
    Not prometheus_client's Histogram: no n-at-once observe (a k-token chunk), `_created` series."""

    __slots__ = ("bounds", "count", "counts", "sum")

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

        out: list[tuple[str, float]] = []
        acc = 0
        for bound, c in zip(self.bounds, self.counts):
            acc += c
            out.append((floatToGoString(bound), acc))
        out.append(("+Inf", self.count))
        return out


def new_histograms() -> dict[str, HistogramCounts]:
    """One empty histogram per family in `HISTOGRAMS`."""
    return {k: HistogramCounts(BUCKETS[k]) for k in HISTOGRAMS}


def metric_families(
    totals: Mapping[tuple[str, tuple], float],
    gauges: Mapping[str, int],
    hists: Mapping[str, HistogramCounts],
    metrics: Mapping[str, Any] | None = None,
) -> list[Any]:
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
        found: Any = metrics
        for key in path:
            found = found.get(key) if isinstance(found, Mapping) else None
        gauge = GaugeMetricFamily(name, doc)
        if found is not None:
            gauge.add_metric([], found)
        fams.append(gauge)
    return fams


def engine_families(engines: Sequence[Mapping[str, Any]]) -> list[Any]:
    """vLLM's engine families (`ENGINE_FAMILIES`) and the per-replica gauges (`REPLICA_GAUGES`)
    from the live model replicas' snapshots (`engine_metrics.EngineMetrics.snapshot`): vLLM's
    names and labels, `replica` added. Every family is present, without samples when no
    replica reports it (the CPU platform has no GPU figures)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    by_name: dict[str, list[tuple[str, dict[str, str], Any]]] = {name: [] for name in ENGINE_FAMILIES}
    for e in engines:
        for name, labels, value in e.get("metrics", ()):
            if name in by_name:
                by_name[name].append((str(e["replica"]), dict(labels), value))
    fams: list[Any] = []
    for name, (kind, doc, _key) in ENGINE_FAMILIES.items():
        samples = by_name[name]
        label_names = ["replica"] + sorted({k for _, labels, _ in samples for k in labels} - {"replica"})
        cls = {"gauge": GaugeMetricFamily, "counter": CounterMetricFamily, "histogram": HistogramMetricFamily}[kind]
        fam = cls(name, doc, labels=label_names)
        for replica, labels, value in sorted(samples, key=lambda s: (s[0], sorted(s[1].items()))):
            values = [replica] + [labels.get(k, "") for k in label_names[1:]]
            if kind == "histogram":
                _count, total, buckets = value
                fam.add_metric(values, buckets=[(le, float(c)) for le, c in buckets], sum_value=total)
            else:
                fam.add_metric(values, value)
        fams.append(fam)
    for key, (name, doc) in REPLICA_GAUGES.items():
        fam = GaugeMetricFamily(name, doc, labels=["replica"])
        for e in sorted(engines, key=lambda e: str(e["replica"])):
            if e.get(key) is not None:
                fam.add_metric([str(e["replica"])], e[key])
        fams.append(fam)
    return fams


def engine_summary(e: Mapping[str, Any]) -> dict[str, Any]:
    """One replica's entry in the /metrics JSON `engine` section: each `ENGINE_FAMILIES` key,
    gauges and counters summed over their label sets (KV-cache usage: the highest engine's),
    histograms as `{"count", "sum", "mean"}`; the prefix-cache hit rate; the GPU figures."""
    out: dict[str, Any] = {}
    for name, _labels, value in e.get("metrics", ()):
        if name not in ENGINE_FAMILIES:
            continue
        kind, _doc, key = ENGINE_FAMILIES[name]
        if kind == "histogram":
            h = out.setdefault(key, {"count": 0, "sum": 0.0})
            h["count"] += int(value[0])
            h["sum"] += float(value[1])
        elif key == "kv_cache_usage":
            out[key] = max(out.get(key, 0.0), float(value))
        else:
            out[key] = out.get(key, 0) + value
    for key, v in out.items():
        if isinstance(v, dict):
            v["mean"] = v["sum"] / v["count"] if v["count"] else None
        elif key != "kv_cache_usage" and float(v).is_integer():
            out[key] = int(v)
    queries = out.get("prefix_cache_queries") or 0
    out["prefix_cache_hit_rate"] = (out.get("prefix_cache_hits", 0) / queries) if queries else None
    for key in REPLICA_GAUGES:
        out[key] = e.get(key)
    return out


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
