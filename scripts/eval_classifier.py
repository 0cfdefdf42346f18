"""Evaluate the served news classifier on a labelled JSON-lines file.

Calls a running service (``POST /v1/classify``, or ``--mode chat``: ``/v1/chat/completions``
at temperature 0 with the classification prompt of ``deployments/classification.py``) and
prints accuracy, macro-F1, per-class precision/recall/F1, the confusion matrix and the number
of invalid labels, with a 95 % (Wilson) interval for the accuracy and the calibration of the
label probabilities (expected calibration error, 15 equal-width bins of the top probability);
``--batch-output DIR`` evaluates a batch job's output (``batch/classify.py``) instead of
calling the service, with the same code and figures. Writes an HTML report (and a PNG confusion matrix with ``--png`` when
matplotlib is installed) and the metrics as JSON.

    python scripts/eval_classifier.py                          # held-out TNEWS slice, http://127.0.0.1:8000
    python scripts/eval_classifier.py --model tiny-qwen3 --report reports/eval-base.html   # the base, no adapter
    python scripts/eval_classifier.py --data my.jsonl --labels my_labels.json --mode chat
    python scripts/eval_classifier.py --batch-output out/tnews     # a batch job over ../shared/data/tnews/test.json

Rows need ``sentence`` (or ``text``/``input``) and ``label_desc`` (or ``label``). The default
data is the held-out slice of ``../shared/data/tnews/test.json`` (its last 1,000 lines), which
training never sees. The service's per-client rate limit (10/minute by default) throttles an
evaluation run: the script waits out 429s, but start the server with
``RATE_LIMIT_PER_MINUTE=0 RATE_LIMIT_PER_HOUR=0`` (or ``rate_limit.enabled: false``) for speed.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from deployments import classification as clf

REPO = Path(__file__).resolve().parents[1]

INVALID = "(invalid)"
ECE_BINS = 15


# ---------------------------------------------------------------------------- metrics


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion k/n."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def calibration(correct: Sequence[bool], confidence: Sequence[float], bins: int = ECE_BINS) -> dict[str, Any]:
    """Expected calibration error: the mean |accuracy - confidence| over equal-width bins of the
    top probability, weighted by the bin's share of the examples; and the bins."""
    table = [[0, 0, 0.0] for _ in range(bins)]  # n, correct, sum of confidences
    for ok, c in zip(correct, confidence):
        b = table[min(bins - 1, int(c * bins))]
        b[0] += 1
        b[1] += int(ok)
        b[2] += c
    n = sum(b[0] for b in table)
    ece = sum(abs(b[1] - b[2]) for b in table) / n if n else float("nan")
    return {
        "ece": ece,
        "bins": [
            {
                "lo": i / bins,
                "hi": (i + 1) / bins,
                "n": b[0],
                "accuracy": b[1] / b[0] if b[0] else None,
                "confidence": b[2] / b[0] if b[0] else None,
            }
            for i, b in enumerate(table)
        ],
    }


def compute_metrics(
    y_true: Sequence[str],
    y_pred: Sequence[str | None],
    labels: Sequence[str],
    confidence: Sequence[float | None] | None = None,
) -> dict[str, Any]:
    """Classification metrics. ``confidence``: each prediction's probability (the top label
    probability), for the calibration; examples without one are left out of it. ``y_pred`` entries that are None or not in ``labels`` are
    invalid: counted wrong and shown in an extra ``(invalid)`` confusion-matrix column.

    Macro-F1 averages the per-class F1 over the classes that occur in ``y_true`` or among the
    valid predictions (scikit-learn's default label set); a class with no predictions has
    precision 0.
    """
    if len(y_true) != len(y_pred):
        raise ValueError("y_true and y_pred differ in length")
    labels = list(labels)
    index = {label: i for i, label in enumerate(labels)}
    unknown_gold = sorted({y for y in y_true if y not in index})
    if unknown_gold:
        raise ValueError(f"gold labels outside the label set: {unknown_gold[:5]}")
    n = len(labels)
    cm = [[0] * (n + 1) for _ in range(n)]  # rows: gold; columns: predicted (+ invalid)
    invalid = 0
    for t, p in zip(y_true, y_pred):
        if p in index:
            cm[index[t]][index[p]] += 1
        else:
            cm[index[t]][n] += 1
            invalid += 1
    total = len(y_true)
    correct = sum(cm[i][i] for i in range(n))
    per_class: dict[str, dict[str, float | int]] = {}
    f1s = []
    for i, label in enumerate(labels):
        tp = cm[i][i]
        support = sum(cm[i])
        predicted = sum(cm[r][i] for r in range(n))
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": support,
            "predicted": predicted,
        }
        if support or predicted:
            f1s.append(f1)
    cal = None
    if confidence is not None:
        pairs = [(t == p, c) for t, p, c in zip(y_true, y_pred, confidence) if c is not None]
        cal = calibration([ok for ok, _ in pairs], [c for _, c in pairs]) if pairs else None
    return {
        "n": total,
        "accuracy": correct / total if total else float("nan"),
        "accuracy_ci95": list(wilson_interval(correct, total)),
        "ece": cal["ece"] if cal else None,
        "calibration": cal["bins"] if cal else None,
        "macro_f1": sum(f1s) / len(f1s) if f1s else float("nan"),
        "invalid": invalid,
        "labels": labels,
        "per_class": per_class,
        "confusion_matrix": cm,
        "confusion_columns": labels + [INVALID],
    }


def format_text(metrics: dict[str, Any]) -> str:
    lo, hi = metrics.get("accuracy_ci95") or (float("nan"), float("nan"))
    ece = metrics.get("ece")
    lines = [
        f"examples: {metrics['n']}   accuracy: {metrics['accuracy']:.4f} (95 % CI {lo:.4f}-{hi:.4f})   "
        f"macro-F1: {metrics['macro_f1']:.4f}   invalid labels: {metrics['invalid']}"
        + (f"   ECE: {ece:.4f}" if ece is not None else ""),
        "",
        f"{'class':<22}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}",
    ]
    for label, m in metrics["per_class"].items():
        lines.append(f"{label:<22}{m['precision']:>10.3f}{m['recall']:>10.3f}{m['f1']:>10.3f}{m['support']:>9d}")
    labels = metrics["labels"]
    short = [_short(c) for c in metrics["confusion_columns"]]
    width = max(5, max(len(s) for s in short) + 1)
    lines += [
        "",
        "confusion matrix (rows: gold, columns: predicted)",
        " " * 22 + "".join(f"{s:>{width}}" for s in short),
    ]
    for label, row in zip(labels, metrics["confusion_matrix"]):
        lines.append(f"{label:<22}" + "".join(f"{v:>{width}d}" for v in row))
    return "\n".join(lines)


def _short(label: str) -> str:
    return label[5:] if label.startswith("news_") else label


# ---------------------------------------------------------------------------- report


def html_report(metrics: dict[str, Any], meta: dict[str, Any], errors: list[dict[str, Any]]) -> str:
    e = html.escape
    cm = metrics["confusion_matrix"]
    cols = metrics["confusion_columns"]
    peak = max([max(r) for r in cm] + [1])

    def cell(v: int, diag: bool) -> str:
        a = v / peak
        color = f"rgba(31,119,180,{a:.3f})" if diag else f"rgba(214,39,40,{a:.3f})"
        fg = "#fff" if a > 0.55 else "#000"
        return f'<td style="background:{color};color:{fg}">{v or ""}</td>'

    rows_cm = "".join(
        f"<tr><th>{e(label)}</th>" + "".join(cell(v, i == j) for j, v in enumerate(row)) + "</tr>"
        for i, (label, row) in enumerate(zip(metrics["labels"], cm))
    )
    rows_pc = "".join(
        f"<tr><td>{e(label)}</td><td>{m['precision']:.3f}</td><td>{m['recall']:.3f}</td>"
        f"<td>{m['f1']:.3f}</td><td>{m['support']}</td><td>{m['predicted']}</td>"
        f"<td><div class=bar style='width:{100 * m['f1']:.0f}px'></div></td></tr>"
        for label, m in metrics["per_class"].items()
    )
    rows_meta = "".join(f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>" for k, v in meta.items())
    rows_err = "".join(
        f"<tr><td>{x['index']}</td><td>{e(x['text'])}</td><td>{e(x['gold'])}</td><td>{e(str(x['pred']))}</td></tr>"
        for x in errors[:50]
    )
    rows_cal = "".join(
        f"<tr><td>{b['lo']:.2f}&ndash;{b['hi']:.2f}</td><td>{b['n']}</td><td>{b['accuracy']:.3f}</td>"
        f"<td>{b['confidence']:.3f}</td></tr>"
        for b in (metrics.get("calibration") or [])
        if b["n"]
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Classifier evaluation</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222 }}
table {{ border-collapse: collapse; margin: 1em 0 }}
td, th {{ border: 1px solid #ddd; padding: 3px 7px; text-align: right; font-size: 13px }}
th {{ background: #f5f5f5; text-align: left }}
.cm td {{ min-width: 2.2em; text-align: center }}
.cm thead th {{ writing-mode: vertical-rl; transform: rotate(180deg); text-align: left }}
.big {{ font-size: 1.6em; margin-right: 1.5em }}
.bar {{ height: 10px; background: #1f77b4 }}
</style></head><body>
<h1>Classifier evaluation</h1>
<p><span class=big>accuracy <b>{metrics["accuracy"]:.2%}</b>
<small>(95 % CI {metrics["accuracy_ci95"][0]:.1%}&ndash;{metrics["accuracy_ci95"][1]:.1%})</small></span>
<span class=big>ECE <b>{"n/a" if metrics.get("ece") is None else format(metrics["ece"], ".3f")}</b></span>
<span class=big>macro-F1 <b>{metrics["macro_f1"]:.3f}</b></span>
<span class=big>invalid labels <b>{metrics["invalid"]}</b></span>
<span class=big>examples <b>{metrics["n"]}</b></span></p>
<h2>Run</h2><table>{rows_meta}</table>
<h2>Per class</h2>
<table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th><th>predicted</th><th></th></tr>{rows_pc}</table>
<h2>Confusion matrix</h2><p>Rows: gold label; columns: predicted label.</p>
<table class=cm><thead><tr><th></th>{"".join(f"<th>{e(c)}</th>" for c in cols)}</tr></thead>{rows_cm}</table>
<h2>Calibration</h2><p>Top-label probability in {ECE_BINS} bins: accuracy vs mean probability.</p>
<table><tr><th>probability</th><th>n</th><th>accuracy</th><th>mean probability</th></tr>{rows_cal}</table>
<h2>Some errors</h2>
<table><tr><th>#</th><th>text</th><th>gold</th><th>predicted</th></tr>{rows_err}</table>
</body></html>
"""


def save_png(metrics: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cm = metrics["confusion_matrix"]
    cols = [_short(c) for c in metrics["confusion_columns"]]
    fig, ax = plt.subplots(figsize=(9, 8))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right")
    ax.set_yticks(range(len(metrics["labels"])), [_short(c) for c in metrics["labels"]])
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    for i, row in enumerate(cm):
        for j, v in enumerate(row):
            if v:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=7)
    ax.set_title(f"accuracy {metrics['accuracy']:.1%}, macro-F1 {metrics['macro_f1']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------- client


class Client:
    def __init__(self, url: str, api_key: str | None, timeout: float, max_wait_s: float):
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self.max_wait_s = max_wait_s
        self.warned = False

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST with retries on 429/503 (honouring Retry-After) up to ``max_wait_s`` in total."""
        waited = 0.0
        while True:
            r = self.http.post(path, json=body)
            if r.status_code in (429, 503) and waited < self.max_wait_s:
                delay = _retry_after(r) or 1.0
                if r.status_code == 429 and not self.warned:
                    self.warned = True
                    print(
                        "note: rate-limited (429); waiting it out. Start the server with "
                        "RATE_LIMIT_PER_MINUTE=0 RATE_LIMIT_PER_HOUR=0 to evaluate faster.",
                        file=sys.stderr,
                    )
                time.sleep(delay)
                waited += delay
                continue
            if r.status_code != 200:
                raise RuntimeError(f"POST {path}: HTTP {r.status_code}: {r.text[:500]}")
            return r.json()


def _retry_after(r) -> float | None:
    try:
        return max(0.1, float(r.headers.get("retry-after", "")))
    except ValueError:
        return None


def classify_batches(
    client: Client,
    texts: list[str],
    model: str | None,
    labels: list[str] | None,
    batch_size: int,
    concurrency: int,
    progress: bool,
) -> tuple[list[str | None], list[dict | None]]:
    batches = [list(range(i, min(i + batch_size, len(texts)))) for i in range(0, len(texts), batch_size)]
    preds: list[str | None] = [None] * len(texts)
    scores: list[dict | None] = [None] * len(texts)

    def run(idx: list[int]) -> None:
        body: dict[str, Any] = {"input": [texts[i] for i in idx]}
        if model:
            body["model"] = model
        if labels is not None:
            body["labels"] = labels
        data = client.post("/v1/classify", body)["data"]
        for item in data:
            k = idx[item["index"]]
            preds[k] = item.get("label")
            scores[k] = item.get("scores")

    _run_all(run, batches, concurrency, progress, unit="batch")
    return preds, scores


def chat_batches(
    client: Client,
    texts: list[str],
    model: str | None,
    labels: list[str],
    concurrency: int,
    progress: bool,
    max_tokens: int,
) -> tuple[list[str | None], list[str]]:
    preds: list[str | None] = [None] * len(texts)
    raw: list[str] = [""] * len(texts)

    def run(i: int) -> None:
        body: dict[str, Any] = {"messages": clf.build_messages(texts[i]), "temperature": 0, "max_tokens": max_tokens}
        if model:
            body["model"] = model
        answer = client.post("/v1/chat/completions", body)["choices"][0]["message"]["content"] or ""
        raw[i] = answer
        preds[i] = clf.parse_answer(_strip_think(answer), labels)

    _run_all(run, list(range(len(texts))), concurrency, progress, unit="text")
    return preds, raw


def _strip_think(answer: str) -> str:
    if "</think>" in answer:
        answer = answer.split("</think>", 1)[1]
    return answer.strip()


def _run_all(fn, items: list, concurrency: int, progress: bool, unit: str) -> None:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    bar = tqdm(total=len(items), unit=unit, disable=not progress, dynamic_ncols=True) if tqdm else None
    with ThreadPoolExecutor(max(1, concurrency)) as pool:
        for _ in pool.map(fn, items):
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()


def confidences(preds: list[str | None], scores: list[dict | None] | None) -> list[float | None] | None:
    """Each prediction's probability (None without scores)."""
    if scores is None:
        return None
    return [sc.get(p) if sc and p is not None else None for p, sc in zip(preds, scores)]


def _first_line(data: Path | None, limit: int | None) -> int:
    """The line number (1-based, blank lines skipped, as the batch job counts) of the first
    evaluated row: the held-out slice starts after the training lines."""
    if data is not None:
        return 1
    return len(clf.read_jsonl(clf.DEFAULT_DATA_FILE)) - clf.HELDOUT_LAST_N + 1


def batch_predictions(
    out: str, rows: list[dict[str, Any]], id_field: str | None, first_line: int = 1
) -> tuple[list[str | None], list[dict | None]]:
    """The batch job's label and scores for each row (None for a row it rejected or lacks)."""
    from batch.dataio import read_output

    by_id = {str(r["id"]): r for r in read_output(out)[0]}
    keys = [str(r.get(id_field)) if id_field else str(first_line + i) for i, r in enumerate(rows)]
    found = [by_id.get(k) for k in keys]
    return [f["label"] if f else None for f in found], [f["scores"] if f else None for f in found]


# ---------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument(
        "--url", default=os.environ.get("LLM_SERVE_URL", "http://127.0.0.1:8000"), help="base URL of the service"
    )
    ap.add_argument(
        "--data", type=Path, default=None, help="labelled JSON-lines file (default: the held-out TNEWS slice)"
    )
    ap.add_argument(
        "--labels",
        default=None,
        help="labels file (sent with each request); default: the service's label set, "
        "checked against the shared TNEWS labels",
    )
    ap.add_argument(
        "--model",
        default=None,
        help="model or adapter name (default: the service's classification.model, else its base model)",
    )
    ap.add_argument(
        "--mode",
        choices=["classify", "chat"],
        default="classify",
        help="classify: POST /v1/classify; chat: /v1/chat/completions, temperature 0",
    )
    ap.add_argument("--batch-size", type=int, default=32, help="texts per /v1/classify request")
    ap.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    ap.add_argument("--max-tokens", type=int, default=32, help="chat mode: tokens for the answer")
    ap.add_argument("--limit", type=int, default=None, help="only the first N rows")
    ap.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer key when auth is on")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds per request")
    ap.add_argument("--max-wait", type=float, default=3600.0, help="seconds to wait out 429/503 in total")
    ap.add_argument("--report", type=Path, default=REPO / "reports" / "eval_classifier.html", help="HTML report")
    ap.add_argument("--json", type=Path, default=None, help="metrics JSON (default: next to the report)")
    ap.add_argument("--png", action="store_true", help="also a PNG confusion matrix (needs matplotlib)")
    ap.add_argument(
        "--batch-output",
        default=None,
        help="evaluate this batch job's output folder (batch/classify.py) instead of calling "
        "the service: its rows are matched to --data by --id-field, else by line number",
    )
    ap.add_argument("--id-field", default=None, help="with --batch-output: the id field of --data's rows")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    rows, source = clf.load_split(args.data, args.limit, "heldout")
    if not rows:
        print("error: no rows", file=sys.stderr)
        return 2
    labels_sent = clf.load_labels(args.labels) if args.labels else None
    labels = labels_sent or clf.load_labels()
    texts = [clf.example_text(r) for r in rows]
    gold = [clf.example_label(r) for r in rows]
    t0 = time.monotonic()
    scores: list[dict | None] | None = None
    if args.batch_output:
        preds, scores = batch_predictions(
            args.batch_output, rows, args.id_field, first_line=_first_line(args.data, args.limit)
        )
        args.mode, args.url = "batch", args.batch_output
    elif args.mode == "classify":
        client = Client(args.url, args.api_key, args.timeout, args.max_wait)
        preds, scores = classify_batches(
            client, texts, args.model, labels_sent, args.batch_size, args.concurrency, not args.no_progress
        )
    else:
        client = Client(args.url, args.api_key, args.timeout, args.max_wait)
        preds, _ = chat_batches(
            client, texts, args.model, labels, args.concurrency, not args.no_progress, args.max_tokens
        )
    seconds = time.monotonic() - t0
    metrics = compute_metrics(gold, preds, labels, confidences(preds, scores))
    meta = {
        "url": args.url,
        "mode": args.mode,
        "model": args.model or "(service default)",
        "data": source,
        "labels": len(labels),
        "seconds": round(seconds, 1),
        "texts_per_second": round(len(texts) / seconds, 2) if seconds else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print(format_text(metrics))
    print(f"\n{len(texts)} texts in {seconds:.1f} s")
    errors = [
        {"index": i, "text": t, "gold": g, "pred": p} for i, (t, g, p) in enumerate(zip(texts, gold, preds)) if g != p
    ]
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(html_report(metrics, meta, errors), encoding="utf-8")
    json_path = args.json or args.report.with_suffix(".json")
    json_path.write_text(
        json.dumps({"meta": meta, "metrics": _finite(metrics)}, ensure_ascii=False, indent=1), encoding="utf-8"
    )
    print(f"report: {args.report}  metrics: {json_path}")
    if args.png:
        png = args.report.with_suffix(".png")
        print(f"png: {png}" if save_png(metrics, png) else "png: matplotlib not installed, skipped")
    return 0


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


if __name__ == "__main__":
    sys.exit(main())
