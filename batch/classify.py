"""Classify a whole archive offline on Ray: the batch counterpart of ``POST /v1/classify``.

    python -m batch.classify ../shared/data/tnews/test.json --text-field sentence --out out/tnews
    python -m batch.classify 's3://bucket/news/*.parquet' --text-field title --id-field id \\
        --model news-lora --out s3://bucket/labels/

Input: JSON lines, CSV or Parquet (a file, a folder or a glob, on any fsspec filesystem). Output,
under ``--out``: ``parts/`` (rows ``id``, ``label`` and every label's probability, in the
input's format), ``rejects/`` (JSON lines: source, row, id, reason, detail, raw; nothing is
dropped: rows in = rows out + rejects), ``done/`` (one marker per finished shard: a re-run after
an interruption skips those shards) and ``_summary.json``. Exit status: 0 all rows labelled,
2 done with rejects, 1 failed or incomplete, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).

Progress is durable per shard, written by the workers: the worker that classifies a shard
writes its part, its rejects and then its done marker (each file atomically: a temporary name in
the same folder, then a rename) before it hands the shard's statistics back. The driver only
counts and summarizes: Ray Data hands results back to it late (workers have written shards the
driver has not heard of yet), so a driver that wrote the output would lose, when interrupted or
killed, work already computed. This needs ``--out`` to be the same folder for every worker: a filesystem shared by
all nodes at the same path (the RayJob's ReadWriteMany volume at ``/data``) or an object store
(``s3://``, ``gs://``); a local path is right on one machine. A worker that does not see the
driver's ``_job.json`` under ``--out`` fails at start with that explanation (no driver-side
writing mode: it would make progress depend on the driver again).

Each worker is a stateful actor holding one vLLM engine (one GPU on a GPU cluster, the CPU
engine here) built from the service config, fed whole shards; the scoring is the service's own
(``batch/worker.py``). With Ray Data installed (``ray[data]``: pandas, pyarrow) the
shards flow through ``ray.data`` ``map_batches`` with an actor pool; without it through a Ray
``ActorPool`` of the same actors (``--pool``). ``ray.init()`` joins ``RAY_ADDRESS`` when set
(a RayJob, ``ray job submit``), else starts a local cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from batch import dataio

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "serve_config.yaml"
BATCH_ARGS_ENV = "LLM_SERVE_BATCH_ARGS"


def service_config(path: Path | None, app: str = "llm"):
    """The application's ServiceConfig (its YAML args, then LLM_SERVE__* variables, as `serve
    run`). Without a path: the args in ``LLM_SERVE_BATCH_ARGS`` (JSON; the RayJob sets it from
    the RayService's config), else configs/serve_config.yaml."""
    import yaml

    from deployments.config_env import load_config

    if path is None and os.environ.get(BATCH_ARGS_ENV):
        return load_config(json.loads(os.environ[BATCH_ARGS_ENV]))
    doc = yaml.safe_load((path or DEFAULT_CONFIG).read_text())
    args = next(a for a in doc["applications"] if a["name"] == app).get("args") or {}
    return load_config(args)


def resolve_labels(cfg, spec: str | None) -> list[str]:
    """The configured label set (as the service's), or the subset `spec` names (comma list or a
    labels file)."""
    from deployments.classification import labels_for_model, load_labels

    label_set = list(cfg.classification.labels or labels_for_model(cfg.model.resolved_source()))
    if not spec:
        return label_set
    labels = load_labels(spec) if Path(spec).exists() else [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [x for x in labels if x not in label_set]
    if unknown or len(set(labels)) != len(labels) or not labels:
        raise ValueError(f"--labels must be distinct labels of the set {label_set}; unknown: {unknown}")
    return labels


def plan(args, fs, files: list[str], fmt: str) -> list[dataio.Shard]:
    shards = []
    for i, f in enumerate(files):
        label = "" if len(files) == 1 else f.rsplit("/", 1)[-1]
        shards += dataio.plan_file(fs, f, fmt, i, args.shard_rows, label)
    return shards


def check_job(out_fs, out: str, job: dict[str, Any], overwrite: bool) -> None:
    """Record the job's parameters in ``_job.json``; a re-run must match them (resume), or pass
    --overwrite to start again."""
    path = f"{out}/_job.json"
    if out_fs.exists(path):
        with out_fs.open(path, "rb") as f:
            old = json.loads(f.read())
        if old == job:
            return
        if not overwrite:
            raise SystemExit(
                f"{out} holds another job's output (inputs or parameters differ); "
                "pass --overwrite to replace it, or another --out"
            )
    if overwrite and out_fs.exists(out):
        out_fs.rm(out, recursive=True)
    out_fs.makedirs(out, exist_ok=True)
    dataio.put(out_fs, path, json.dumps(job, indent=1).encode())


def run_pool(
    args,
    cfg,
    model: str,
    labels: list[str],
    out: str,
    pending: list[dataio.Shard],
    on_done,
    job: dict[str, Any] | None = None,
) -> str:
    """Classify the pending shards on a pool of engine actors; `on_done(stats)` per shard, as
    its statistics come back (the workers have written the shard by then). Returns the pool
    kind used."""
    import ray

    from batch.worker import ShardClassifier

    gpus = ray.cluster_resources().get("GPU", 0)
    num_gpus = (1 if gpus else 0) if args.num_gpus is None else args.num_gpus
    size = args.concurrency or max(1, int(gpus) if num_gpus else 1)
    size = min(size, len(pending))
    ctor = dict(
        config=cfg.model_dump(mode="json"),
        model=model,
        labels=labels,
        out=out,
        text_field=args.text_field,
        id_field=args.id_field,
        batch_size=args.batch_size,
        num_cpus=args.num_cpus,
        merge_adapter=args.merge_adapter,
        job=job,
    )
    kind = args.pool
    if kind == "auto":
        try:
            import ray.data

            kind = "data"
        except ImportError:
            kind = "actors"
    if kind == "data":
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = ctx.print_on_execution_start = False  # ours counts rows
        # One shard per block: a task Ray retries holds one shard (and skips it if written).
        ds = ray.data.from_items([{"shard": s.to_json()} for s in pending], override_num_blocks=len(pending))
        ds = ds.map_batches(
            ShardClassifier,
            fn_constructor_kwargs=ctor,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=size),
            num_cpus=args.num_cpus,
            num_gpus=num_gpus,
        )
        for row in ds.iter_rows():
            on_done(json.loads(row["stats"]))
        return kind
    from ray.util import ActorPool

    actor = ray.remote(num_cpus=args.num_cpus, num_gpus=num_gpus)(ShardClassifier)
    actors = [actor.remote(**ctor) for _ in range(size)]
    try:
        ray.get([a.ready.remote() for a in actors])
        pool = ActorPool(actors)
        for stats in pool.map_unordered(lambda a, s: a.process.remote(s.to_json()), pending):
            on_done(stats)
    finally:
        for a in actors:
            ray.kill(a)
    return kind


def summarize(
    shards: list[dataio.Shard], done: dict[str, dict[str, Any]], run_rows: int, seconds: float, engine_seconds: float
) -> dict[str, Any]:
    keys = [s.key for s in shards]
    finished = [done[k] for k in keys if k in done]
    labels: Counter = Counter()
    reasons: Counter = Counter()
    for d in finished:
        labels.update(d["labels"])
        reasons.update(d["reasons"])
    return {
        "rows_in": sum(s.n_rows for s in shards),
        "shards": len(shards),
        "shards_done": len(finished),
        "rows_out": sum(d["rows_out"] for d in finished),
        "rejects": sum(d["rejects"] for d in finished),
        "rows_this_run": run_rows,
        "seconds": round(seconds, 2),
        "rows_per_s": round(run_rows / seconds, 2) if seconds else None,
        "rows_per_s_classifying": round(run_rows / engine_seconds, 2) if engine_seconds else None,
        "labels": dict(labels.most_common()),
        "reject_reasons": dict(reasons.most_common()),
    }


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"rows in {s['rows_in']}  =  out {s['rows_out']}  +  rejects {s['rejects']}"
        f"   ({s['shards_done']}/{s['shards']} shards done)",
        f"this run: {s['rows_this_run']} rows in {s['seconds']} s = {s['rows_per_s']} rows/s "
        f"({s['rows_per_s_classifying']} rows/s once the engines were up)",
    ]
    total = max(1, s["rows_out"])
    lines += [f"  {k:<24}{v:>8}  {100 * v / total:5.1f} %" for k, v in s["labels"].items()]
    if s["reject_reasons"]:
        lines.append("rejects: " + ", ".join(f"{k} {v}" for k, v in s["reject_reasons"].items()))
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("input", help="JSON lines, CSV or Parquet: a file, folder or glob (any fsspec filesystem)")
    ap.add_argument("--out", required=True, help="output folder (parts/, rejects/, done/, _summary.json)")
    ap.add_argument(
        "--format",
        choices=sorted(set(dataio.FORMATS.values())),
        default=None,
        help="input format (default: from the file names)",
    )
    ap.add_argument("--text-field", default="text", help="the field (column) holding the text")
    ap.add_argument("--id-field", default=None, help="the field holding each row's id (default: its row number)")
    ap.add_argument(
        "--model", default=None, help="base model or adapter (default: classification.model, as the service)"
    )
    ap.add_argument("--labels", default=None, help="a subset of the label set: comma list or labels file")
    ap.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"Serve config holding the service config (default: ${BATCH_ARGS_ENV}, else {DEFAULT_CONFIG.name})",
    )
    ap.add_argument("--app", default="llm", help="the application in --config")
    ap.add_argument("--shard-rows", type=int, default=500, help="records per shard (the unit of resume)")
    ap.add_argument("--batch-size", type=int, default=256, help="texts submitted to an engine at once")
    ap.add_argument("--concurrency", type=int, default=None, help="engine actors (default: one per GPU, else 1)")
    ap.add_argument("--num-cpus", type=float, default=1, help="CPUs per engine actor")
    ap.add_argument(
        "--num-gpus", type=float, default=None, help="GPUs per engine actor (default: 1 when the cluster has GPUs)"
    )
    ap.add_argument(
        "--merge-adapter",
        action="store_true",
        help="merge the adapter into the base once per engine and run without LoRA (the same "
        "model up to float rounding; several times faster on the CPU engine)",
    )
    ap.add_argument(
        "--pool",
        choices=["auto", "data", "actors"],
        default="auto",
        help="Ray Data map_batches, or a plain ActorPool (auto: Ray Data when installed)",
    )
    ap.add_argument("--overwrite", action="store_true", help="replace another job's output in --out")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if args.shard_rows < 1 or args.batch_size < 1:
        ap.error("--shard-rows and --batch-size must be positive")

    cfg = service_config(args.config, args.app)
    model = args.model or cfg.classification.model or cfg.model.model_id
    model = cfg.model.aliases.get(model, model)
    labels = resolve_labels(cfg, args.labels)
    fs, files, fmt = dataio.list_inputs(args.input, args.format)
    out_fs, (out,) = dataio.filesystem(args.out)
    job = {
        "inputs": dataio.fingerprint(fs, files),
        "format": fmt,
        "text_field": args.text_field,
        "id_field": args.id_field,
        "model": model,
        "labels": labels,
        "shard_rows": args.shard_rows,
        "merge_adapter": args.merge_adapter,
        "config": cfg.model_dump(mode="json", include={"model", "lora", "classification"}),
    }
    check_job(out_fs, out, job, args.overwrite)
    shards = plan(args, fs, files, fmt)
    done = dataio.done_shards(out_fs, out)
    pending = [s for s in shards if s.key not in done]
    total = sum(s.n_rows for s in shards)
    print(
        f"{len(files)} file(s), {total} rows in {len(shards)} shards; {len(shards) - len(pending)} shards "
        f"already done, {len(pending)} to classify with {model} ({len(labels)} labels)",
        file=sys.stderr,
    )

    t0 = time.monotonic()
    first = [None]
    run_rows = 0
    if pending:
        import ray
        from tqdm import tqdm

        signals: list[int] = []

        def terminate(signum, _frame):  # SIGTERM (kill, a stopped RayJob) ends as Ctrl-C does
            signals.append(signum)
            raise KeyboardInterrupt

        main_thread = threading.current_thread() is threading.main_thread()
        old_term: list[Any] = []
        bar = tqdm(
            total=sum(s.n_rows for s in pending),
            unit="rows",
            disable=args.no_progress,
            desc="classify",
            file=sys.stderr,
        )

        def on_done(stats: dict[str, Any]) -> None:
            nonlocal run_rows
            bar.update(stats["rows_in"])
            if stats.get("skipped"):  # written before this run reached it: not redone
                return
            if first[0] is None:
                first[0] = time.monotonic() - stats["seconds"]
            run_rows += stats["rows_in"]

        try:
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            ray.init(ignore_reinit_error=True, logging_level="WARNING", log_to_driver=False)
            if main_thread:  # after ray.init: its core worker installs a SIGTERM handler of its own
                old_term.append(signal.signal(signal.SIGTERM, terminate))
            kind = run_pool(args, cfg, model, labels, out, pending, on_done, job)
        except KeyboardInterrupt:
            bar.close()
            ray.shutdown()  # this driver's workers stop: what they wrote is all there is
            written = len(dataio.done_shards(out_fs, out))  # written by the workers, not what came back
            print(
                f"{'terminated' if signals else 'interrupted'}: {written}/{len(shards)} shards done and "
                "written; re-run the same command to resume",
                file=sys.stderr,
            )
            return 128 + (signals[0] if signals else signal.SIGINT)
        finally:
            if old_term:
                signal.signal(signal.SIGTERM, signal.SIG_DFL if old_term[0] is None else old_term[0])
        bar.close()
        print(f"pool: {kind}", file=sys.stderr)
    dataio.remove_temp(out_fs, out)  # no worker writes now: what interrupted writes left
    seconds = time.monotonic() - t0
    engine_seconds = time.monotonic() - first[0] if first[0] is not None else 0.0
    done = dataio.done_shards(out_fs, out)
    summary = summarize(shards, done, run_rows, seconds, engine_seconds)
    dataio.put(out_fs, f"{out}/_summary.json", json.dumps(summary, indent=1, ensure_ascii=False).encode())
    print(format_summary(summary))
    if summary["shards_done"] != summary["shards"] or summary["rows_out"] + summary["rejects"] != summary["rows_in"]:
        print("INCOMPLETE: not every row is accounted for", file=sys.stderr)
        return 1
    return 2 if summary["rejects"] else 0


if __name__ == "__main__":
    sys.exit(main())
