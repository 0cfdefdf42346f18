"""Batch path vs HTTP path: rows/s of ``batch/classify.py`` and of ``POST /v1/classify``
through the Serve application, on the same titles, config and engine (one engine each).

    python -m scripts.bench_classify --n 400            # first 400 TNEWS titles

The HTTP side starts the application of ``configs/serve_config.yaml`` on a local Ray cluster
(rate limit off, one replica each, as the tests run it), sends ``--request-size`` titles per
request with ``--concurrency`` requests in flight (the replica's ``max_ongoing_requests``) and
times them after a warm-up request. The batch side runs the batch job in a subprocess on the
same titles. Both report rows/s once their engine is up; the labels of the two paths are
compared too. Prints a JSON summary (and writes it with ``--json``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from deployments import classification as clf

REPO = Path(__file__).resolve().parents[1]


def http_path(titles: list[str], request_size: int, concurrency: int) -> dict[str, Any]:
    import httpx
    import ray
    import yaml
    from ray import serve

    from cluster.processes import free_port
    from deployments.config import deep_merge
    from serve_app import build_app

    doc = yaml.safe_load((REPO / "configs" / "serve_config.yaml").read_text())
    args = deep_merge(
        next(a for a in doc["applications"] if a["name"] == "llm")["args"],
        {
            "rate_limit": {"enabled": False},
            "deployments": {
                "model": {"autoscaling_config": None},
                "tokenizer": {"autoscaling_config": None, "ray_actor_options": {"num_cpus": 0.1}},
                "ingress": {"autoscaling_config": None, "ray_actor_options": {"num_cpus": 0.1}},
            },
        },
    )
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "VLLM_NO_USAGE_STATS": "1"}},
    )
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(args), name="llm", route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        http = httpx.Client(base_url=url, timeout=300)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if http.get("/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        http.post("/v1/classify", json={"input": titles[:request_size]}).raise_for_status()  # warm-up
        chunks = [titles[i : i + request_size] for i in range(0, len(titles), request_size)]
        labels: list[str] = []

        def post(chunk: list[str]) -> list[str]:
            r = http.post("/v1/classify", json={"input": chunk})
            r.raise_for_status()
            return [d["label"] for d in r.json()["data"]]

        t0 = time.monotonic()
        with ThreadPoolExecutor(concurrency) as pool:
            for got in pool.map(post, chunks):
                labels += got
        seconds = time.monotonic() - t0
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return {
        "rows": len(titles),
        "seconds": round(seconds, 2),
        "rows_per_s": round(len(titles) / seconds, 2),
        "request_size": request_size,
        "concurrency": concurrency,
        "labels": labels,
    }


def batch_path(titles: list[str], extra: list[str]) -> dict[str, Any]:
    from batch.dataio import read_output

    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "titles.jsonl"
        src.write_text("".join(json.dumps({"sentence": t}, ensure_ascii=False) + "\n" for t in titles))
        t0 = time.monotonic()
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "batch.classify",
                str(src),
                "--out",
                f"{d}/out",
                "--text-field",
                "sentence",
                "--no-progress",
                *extra,
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        wall = time.monotonic() - t0
        if r.returncode != 0:
            raise SystemExit(f"batch job failed ({r.returncode}):\n{r.stderr[-3000:]}")
        summary = json.loads((Path(d) / "out" / "_summary.json").read_text())
        rows = sorted(read_output(f"{d}/out")[0], key=lambda x: x["id"])
    return {
        "rows": summary["rows_out"],
        "rows_per_s": summary["rows_per_s_classifying"],
        "rows_per_s_with_start": round(len(titles) / wall, 2),
        "wall_seconds": round(wall, 2),
        "labels": [x["label"] for x in rows],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400, help="titles (the first N of the shared TNEWS file)")
    ap.add_argument("--request-size", type=int, default=32, help="titles per /v1/classify request")
    ap.add_argument("--concurrency", type=int, default=3, help="HTTP requests in flight")
    ap.add_argument(
        "--batch-args",
        default="--shard-rows 100",
        help="extra arguments of the batch job (e.g. '--batch-size 256 --num-cpus 1')",
    )
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    titles = [r["sentence"] for r in clf.read_jsonl(clf.DEFAULT_DATA_FILE)[: args.n]]
    batch = batch_path(titles, args.batch_args.split())
    http = http_path(titles, args.request_size, args.concurrency)
    same = sum(a == b for a, b in zip(batch.pop("labels"), http.pop("labels")))
    out = {
        "titles": len(titles),
        "http": http,
        "batch": batch,
        "speedup": round(batch["rows_per_s"] / http["rows_per_s"], 2),
        "same_labels": f"{same}/{len(titles)}",
    }
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
