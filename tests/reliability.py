"""Helpers for the reliability tests (faults, fuzzing, redeploy, soak): an HTTP client that
classifies how every request ended, a printed summary, and ways to find the Ray processes
behind a Serve deployment (by pid, from Ray's actor table — never by process name).

Outcome of one request (`Outcome.result`):

* ``ok``          200 and a complete answer (a stream that ends with a finish_reason and [DONE])
* ``http_error``  a non-200 answer whose body is an OpenAI error object
* ``sse_error``   a 200 stream that carried an OpenAI error event followed by ``data: [DONE]``
* ``conn_closed`` the server closed the connection mid-answer (the client sees an error)
* ``malformed``   anything else the server sent (a non-JSON error body, a stream cut without
                  [DONE] but closed cleanly, an error event without [DONE]) — a failure
* ``hang``        no end within the client's deadline — a failure
* ``cancelled``   the test itself cancelled the request (client disconnect)
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

MODEL = "tiny-qwen3"
WELL_FORMED = {"ok", "http_error", "sse_error", "conn_closed"}


@dataclass
class Outcome:
    label: str
    stream: bool
    status: int | None = None
    result: str = "pending"
    code: Any = None  # OpenAI error code (HTTP error body or SSE error event)
    latency: float = 0.0  # seconds from send to end
    chunks: int = 0  # content events received (streams)
    tokens: int = 0  # completion tokens (usage on the chunks, when sent)
    first_chunk_s: float | None = None
    detail: str = ""
    t_start: float = 0.0
    t_end: float = 0.0

    @property
    def well_formed(self) -> bool:
        return self.result in WELL_FORMED


def is_openai_error(obj: Any) -> bool:
    err = obj.get("error") if isinstance(obj, dict) else None
    return isinstance(err, dict) and {"message", "type", "param", "code"} <= set(err)


def chat_body(i: int = 0, max_tokens: int = 16, stream: bool = False, **extra) -> dict[str, Any]:
    return {
        "model": MODEL,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        "messages": [{"role": "user", "content": f"第{i}条新闻：央行宣布降息25个基点"}],
        **extra,
    }


async def request(
    client: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    *,
    label: str = "",
    deadline_s: float = 120.0,
    on_chunk: asyncio.Event | None = None,
    chunks_before_event: int = 1,
    path: str = "/v1/chat/completions",
) -> Outcome:
    """POST `body` and classify how it ended. `deadline_s`: the client gives up (→ `hang`); it
    also bounds each read of this request, whatever the client's own timeout (a read that waits
    past it is a `hang` too, never an exception out of here). `on_chunk` is set once
    `chunks_before_event` content events arrived (streams)."""
    stream = bool(body.get("stream"))
    out = Outcome(label=label, stream=stream)
    out.t_start = time.monotonic()
    try:
        async with asyncio.timeout(deadline_s):
            await _do(client, url + path, body, out, on_chunk, chunks_before_event, deadline_s)
    except (TimeoutError, httpx.TimeoutException):
        out.result, out.detail = "hang", f"no end within {deadline_s:.0f} s"
    except asyncio.CancelledError:
        out.result = "cancelled"
        out.t_end = time.monotonic()
        out.latency = out.t_end - out.t_start
        raise
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
        out.result, out.detail = "conn_closed", f"{type(exc).__name__}: {exc}"
    except httpx.ConnectError as exc:
        out.result, out.detail = "malformed", f"connect failed: {exc}"
    out.t_end = time.monotonic()
    out.latency = out.t_end - out.t_start
    return out


async def _do(client, url, body, out: Outcome, on_chunk, chunks_before_event, deadline_s: float) -> None:
    timeout = httpx.Timeout(deadline_s + 1, connect=min(30.0, deadline_s + 1))
    async with client.stream("POST", url, json=body, timeout=timeout) as r:
        out.status = r.status_code
        if r.status_code != 200 or not out.stream:
            raw = await r.aread()
            try:
                obj = json.loads(raw)
            except ValueError:
                out.result, out.detail = "malformed", f"non-JSON body: {raw[:200]!r}"
                return
            if r.status_code == 200:
                ok = isinstance(obj, dict) and obj.get("choices")
                out.tokens = ((obj.get("usage") or {}).get("completion_tokens") or 0) if ok else 0
                out.result = "ok" if ok else "malformed"
                return
            if is_openai_error(obj):
                out.result, out.code = "http_error", obj["error"]["code"]
            else:
                out.result, out.detail = "malformed", f"not an OpenAI error: {raw[:200]!r}"
            return
        finished = done = False
        error_event = None
        async for line in r.aiter_lines():
            if not line:
                continue
            if not line.startswith("data: "):
                out.result, out.detail = "malformed", f"not an SSE data line: {line[:100]!r}"
                return
            data = line[6:]
            if data == "[DONE]":
                done = True
                continue
            if done:
                out.result, out.detail = "malformed", "event after [DONE]"
                return
            obj = json.loads(data)
            if is_openai_error(obj):
                error_event = obj["error"]
                continue
            if obj.get("usage"):
                out.tokens = obj["usage"].get("completion_tokens") or out.tokens
            for ch in obj.get("choices") or ():
                if ch.get("finish_reason"):
                    finished = True
                delta = ch.get("delta", {}).get("content") if "delta" in ch else ch.get("text")
                if delta:
                    out.chunks += 1
                    if out.first_chunk_s is None:
                        out.first_chunk_s = time.monotonic() - out.t_start
                    if on_chunk is not None and out.chunks >= chunks_before_event:
                        on_chunk.set()
        if error_event is not None:
            out.code = error_event.get("code")
            out.result = "sse_error" if done else "malformed"
            if not done:
                out.detail = "error event without [DONE]"
        elif done and finished:
            out.result = "ok"
        else:
            out.result, out.detail = "malformed", f"stream ended (done={done}, finish_reason={finished})"


def summarize(label: str, outcomes: Iterable[Outcome]) -> dict[str, Any]:
    outs = list(outcomes)
    by_status = collections.Counter(str(o.status) if o.status is not None else "-" for o in outs)
    by_result = collections.Counter(o.result for o in outs)
    by_code = collections.Counter(str(o.code) for o in outs if o.code is not None)
    answered = sum(1 for o in outs if o.well_formed)
    worst = max((o.latency for o in outs), default=0.0)
    s = {
        "sent": len(outs),
        "answered": answered,
        "by_status": dict(by_status),
        "by_result": dict(by_result),
        "error_codes": dict(by_code),
        "max_latency_s": round(worst, 2),
    }
    print(
        f"\n[{label}] sent={s['sent']} answered={answered} by_status={s['by_status']} "
        f"by_result={s['by_result']} error_codes={s['error_codes']} max_latency={worst:.2f}s"
    )
    for o in outs:
        if not o.well_formed and o.result != "cancelled":
            print(f"    {o.label}: {o.result} status={o.status} {o.detail}")
    return s


def new_client(n: int = 32, timeout_s: float = 180.0) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=30.0), limits=limits)


# --------------------------------------------------------------------------- waiting


def wait_until(
    predicate,
    timeout_s: float,
    interval_s: float = 0.5,
    what: str = "condition",
    ignore: tuple[type[BaseException], ...] = (),
) -> Any:
    """Poll `predicate()` every `interval_s` until it returns something truthy (returned) or
    `timeout_s` passes: then an AssertionError naming `what` and the last value seen (or the
    last exception of a type in `ignore`, which count as "not yet")."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        try:
            last = predicate()
        except ignore as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout_s:g} s (last: {last!r})")
        time.sleep(interval_s)


# --------------------------------------------------------------------------- service state


def running_requests(url: str) -> dict[str, Any]:
    """Running/waiting counts from /metrics (needs no model slot). The stats actor bounds
    `running` by what the ingress still waits for: use `engine_unfinished` to see engine work
    that nobody waits for any more."""
    m = httpx.get(f"{url}/metrics", timeout=15).json()
    return {"running": m["num_running_requests"], "waiting": m["num_waiting_requests"]}


def engine_unfinished(url: str, deadline_s: float = 20.0) -> int | None:
    """vLLM's own count of unfinished requests on the (single) model replica, via /health
    (this needs a free model slot; None when the replica did not answer in time).

    Only a reading taken after this call began counts: /health answers from a check up to
    `health.cache_s` old (2 s on the faults app), and a cached count from before an abort or a
    request would make a wait pass or fail on a past state. A cached answer is retried once
    the cache has expired."""
    from conftest import ADMIN  # /health's details need an admin key

    end = time.monotonic() + deadline_s
    while True:
        asked = time.time()
        try:
            h = httpx.get(f"{url}/health", headers=ADMIN, timeout=max(1.0, end - time.monotonic())).json()
        except (httpx.HTTPError, ValueError):
            return None
        # a check that finished after we asked (callers here ask one at a time: one we started)
        if h.get("checked_at", 0) >= asked:
            return (h.get("replica") or {}).get("num_unfinished_requests")
        if time.monotonic() >= end:
            return None
        time.sleep(0.1)


# --------------------------------------------------------------------------- Ray processes


def replica_actors(app: str, deployment: str, state: str = "ALIVE") -> list[dict[str, Any]]:
    """Actor-table rows (ActorID, Pid, Name, State, ...) of a Serve deployment's replicas,
    from the GCS (works without the dashboard, which the test cluster does not start)."""
    import ray

    class_name = f"ServeReplica:{app}:{deployment}"
    rows = ray._private.state.actors().values()  # GCS actor table: includes the worker pid
    return [r for r in rows if r.get("ActorClassName") == class_name and r.get("State") == state]


def replica_pids(app: str, deployment: str) -> list[int]:
    return sorted(int(r["Pid"]) for r in replica_actors(app, deployment) if r.get("Pid"))


def replica_ongoing(app: str, deployment: str) -> dict[int, int | str]:
    """Each replica's own count of the requests it holds (Serve's `get_num_ongoing_requests`,
    what Serve's router probes to fill its `max_ongoing_requests`), by pid; a replica that does
    not answer within 10 s shows the error's name."""
    import ray

    out: dict[int, int | str] = {}
    for row in replica_actors(app, deployment):
        try:
            actor = ray.get_actor(row["Name"], namespace="serve")
            out[int(row.get("Pid") or 0)] = ray.get(actor.get_num_ongoing_requests.remote(), timeout=10)
        except Exception as exc:  # gone meanwhile, or not answering
            out[int(row.get("Pid") or 0)] = type(exc).__name__
    return out


def controller_log(app: str, deployment: str, last: int = 40) -> str:
    """The Serve controller's last `last` log lines about one deployment (replicas started,
    failed health checks, constructor errors): what a failed recovery assertion shows."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    needle = f"deployment='{deployment}', app='{app}'"
    lines = [
        line[:300]
        for f in sorted(logs.glob("controller_*.log"))
        for line in f.read_text(errors="replace").splitlines()
        if needle in line or f"name='{deployment}', app='{app}'" in line
    ]
    return "\n".join(lines[-last:])


def descendant_pids(pid: int) -> list[int]:
    """Every process below `pid` (vLLM's EngineCore, its workers, resource trackers)."""
    import psutil

    try:
        return sorted(c.pid for c in psutil.Process(pid).children(recursive=True))
    except psutil.NoSuchProcess:
        return []


def wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    """Wait until none of `pids` is alive; the ones still alive after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    alive = [p for p in pids if pid_alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.5)
        alive = [p for p in alive if pid_alive(p)]
    return alive


def kill_pid(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def pid_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
