"""The load client: OpenAI-compatible requests over aiohttp (SSE parsed as it arrives), driven
as a closed loop (fixed concurrency), an open loop (Poisson arrivals) or one burst."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import sys
import time
from collections.abc import Sequence
from typing import Any

from scripts.bench.stats import RequestResult


@dataclasses.dataclass
class LoadSpec:
    """What every request of a run looks like (identical for every target)."""

    endpoint: str = "chat"  # chat | completions
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


def handle_sse_line(
    r: RequestResult, line: bytes, chat: bool, t_send: float, state: dict[str, Any], now: float
) -> bool:
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
        async with session.post(
            base_url + spec.path,
            data=body,
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {spec.api_key}"},
            timeout=aiohttp.ClientTimeout(total=spec.timeout_s),
        ) as resp:
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
    except TimeoutError:
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

    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, ttl_dns_cache=300), timeout=aiohttp.ClientTimeout(total=None)
    )


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)
    except ImportError:
        return None


async def closed_loop(
    base_url: str,
    spec: LoadSpec,
    prompts: Sequence[str],
    concurrency: int,
    max_duration_s: float,
    warmup: int = 0,
    progress: bool = True,
    desc: str = "",
) -> tuple[list[RequestResult], float]:
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


async def open_loop(
    base_url: str,
    spec: LoadSpec,
    prompts: Sequence[str],
    rate: float,
    max_duration_s: float,
    seed: int = 0,
    warmup: int = 0,
    progress: bool = True,
    desc: str = "",
) -> tuple[list[RequestResult], float]:
    """Poisson arrivals at `rate` req/s, whatever the answers, until `len(prompts)` requests
    were sent or `max_duration_s` of arrivals passed; then waits for the ones in flight."""
    arrivals = poisson_arrivals(rate, len(prompts), seed)
    async with _session() as session:
        if warmup:
            await asyncio.gather(
                *(
                    send_request(session, base_url, spec, prompts[i % len(prompts)], time.perf_counter())
                    for i in range(warmup)
                )
            )
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
