"""The chaos suite's parts: the service as `make run` starts it (its own Ray cluster, Serve's fast
path with our HAProxy), a steady mixed load, the service's processes found by what they are, and
one fault at a time with what it did to the answers and to the state afterwards.

Processes are found among the `make run` session's own processes (`cluster.processes`) by the
title Ray gives an actor's worker (`ray::<actor class>`), never by matching names machine-wide,
and killed by pid with SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml
from reliability import Outcome, new_client, request

from cluster.processes import free_port, kill_sessions, session_processes

REPO = Path(__file__).resolve().parents[1]
ADAPTER = "news-lora"


# ----------------------------------------------------------------------------- the service


@dataclass
class Service:
    url: str
    sid: int
    log: Path

    def processes(self) -> set[int]:
        return session_processes({self.sid})


def launch_make_run(
    tmp: Path, args_overrides: dict[str, Any] | None = None, env_extra: dict[str, str] | None = None
) -> tuple[subprocess.Popen, str, Path]:
    """`make run CONFIG=<the shipped config with `args_overrides`, on a free port>` as a user
    types it, in its own session, its output in `tmp/make_run.log`: (process, URL, log). The
    caller stops it (its session, by pid)."""
    from deployments.config import deep_merge

    port = free_port()
    doc = yaml.safe_load((REPO / "configs" / "serve_config.yaml").read_text())
    doc.setdefault("http_options", {}).update({"host": "127.0.0.1", "port": port})
    for app in doc["applications"]:
        app["args"] = deep_merge(app["args"], args_overrides or {})
    cfg = tmp / "serve_config.yaml"
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RATE_LIMIT_", "LLM_SERVE__"))}
    env.update({"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", **(env_extra or {})})
    log_path = tmp / "make_run.log"
    with log_path.open("wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            ["make", "--no-print-directory", "run", f"CONFIG={cfg}"],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc, f"http://127.0.0.1:{port}", log_path


def wait_serving(proc: subprocess.Popen, url: str, log_path: Path, timeout_s: float = 300, poll_s: float = 1) -> None:
    """Until `url`/health answers 200; a RuntimeError with the log's tail if `make run` exits or
    does not serve within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"make run did not serve: {log_path.read_text()[-3000:]}")
        time.sleep(poll_s)


@contextlib.contextmanager
def make_run(tmp: Path, args_overrides: dict[str, Any], env_extra: dict[str, str]) -> Iterator[Service]:
    """`launch_make_run` until it serves; on exit Ctrl-C as a user stops it, then whatever is
    left of the session by pid."""
    proc, url, log_path = launch_make_run(tmp, args_overrides, env_extra)
    try:
        wait_serving(proc, url, log_path)
        yield Service(url, proc.pid, log_path)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=120)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        kill_sessions({proc.pid}, grace_s=20)


# ----------------------------------------------------------------------------- finding processes


def _title(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


def actor_pids(service: Service, actor_class: str) -> list[int]:
    """Workers of `service` running an actor of this class (Ray titles them `ray::<class>` or
    `ray::<class>.<method>`)."""
    out = []
    for pid in service.processes():
        title = _title(pid)
        if title.startswith("ray::") and title[5:].split(".", 1)[0].split(" ", 1)[0] == actor_class:
            out.append(pid)
    return sorted(out)


def replica_pids(service: Service, deployment: str, app: str = "llm") -> list[int]:
    return actor_pids(service, f"ServeReplica:{app}:{deployment}")


def engine_pids(service: Service) -> list[int]:
    from deployments.engine import engine_core_pids

    return [p for r in replica_pids(service, "ModelReplica") for p in engine_core_pids(r)]


def haproxy_pids(service: Service) -> list[int]:
    """The HAProxy process(es) Serve started (the real binary our `llm-serve-haproxy` executes)."""
    out = []
    for pid in service.processes():
        try:
            p = psutil.Process(pid)
            if p.name() == "haproxy" or os.path.basename(p.exe()) == "haproxy":
                out.append(pid)
        except psutil.Error:
            continue
    return sorted(out)


# ----------------------------------------------------------------------------- the load


@dataclass
class Kind:
    """One kind of request in the mixed load."""

    name: str
    path: str
    body: dict[str, Any]

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))


def mixed_kinds(runtime_adapter: str | None) -> list[Kind]:
    msg = [{"role": "user", "content": "央行宣布降息25个基点，股市应声上涨"}]
    kinds = [
        Kind("chat, no model", "/v1/chat/completions", {"messages": msg, "max_tokens": 12}),
        Kind(
            "chat stream, news-lora",
            "/v1/chat/completions",
            {"model": ADAPTER, "messages": msg, "max_tokens": 24, "stream": True, "ignore_eos": True},
        ),
        Kind("completion, base", "/v1/completions", {"model": "tiny-qwen3", "prompt": "央行", "max_tokens": 12}),
        Kind(
            "completion stream, base",
            "/v1/completions",
            {"model": "tiny-qwen3", "prompt": "股市", "max_tokens": 24, "stream": True, "ignore_eos": True},
        ),
        Kind("classify, no model", "/v1/classify", {"input": ["詹姆斯带领湖人队赢得总冠军", "央行降准"]}),
    ]
    if runtime_adapter:
        kinds.append(
            Kind(
                f"chat, {runtime_adapter}",
                "/v1/chat/completions",
                {"model": runtime_adapter, "messages": msg, "max_tokens": 8},
            )
        )
    return kinds


async def send(client: httpx.AsyncClient, url: str, kind: Kind, deadline_s: float, label: str = "") -> Outcome:
    """One request of `kind`; a refused connection (the proxy restarting) is its own outcome."""
    if kind.path == "/v1/classify":
        out = Outcome(label=label or kind.name, stream=False)
        out.t_start = time.monotonic()
        try:
            async with asyncio.timeout(deadline_s):
                r = await client.post(url + kind.path, json=kind.body)
            out.status = r.status_code
            try:
                obj = r.json()
            except ValueError:
                obj = None
            if r.status_code == 200 and isinstance(obj, dict) and obj.get("data"):
                out.result = "ok"
            elif r.status_code != 200 and isinstance(obj, dict) and isinstance(obj.get("error"), dict):
                out.result, out.code = "http_error", obj["error"].get("code")
            else:
                out.result, out.detail = "malformed", r.text[:200]
        except TimeoutError:
            out.result, out.detail = "hang", f"no end within {deadline_s:.0f} s"
        except httpx.ConnectError as exc:
            out.result, out.detail = "refused", str(exc)
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            out.result, out.detail = "conn_closed", f"{type(exc).__name__}: {exc}"
        out.t_end = time.monotonic()
        out.latency = out.t_end - out.t_start
        return out
    out = await request(client, url, kind.body, label=label or kind.name, deadline_s=deadline_s, path=kind.path)
    if out.result == "malformed" and out.detail.startswith("connect failed"):
        out.result = "refused"
    return out


class Load:
    """`workers` clients, each sending the kinds in turn, until stopped; every outcome kept."""

    def __init__(self, url: str, kinds: list[Kind], workers: int, deadline_s: float, pause_s: float = 0.05):
        self.url, self.kinds, self.workers, self.deadline_s, self.pause_s = url, kinds, workers, deadline_s, pause_s
        self.outcomes: list[tuple[str, Outcome]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.deadline_s + 30)

    async def _worker(self, client: httpx.AsyncClient, w: int) -> None:
        i = w
        while not self._stop.is_set():
            kind = self.kinds[i % len(self.kinds)]
            i += 1
            out = await send(client, self.url, kind, self.deadline_s)
            self.outcomes.append((kind.name, out))
            # a refused connection (the proxy restarting) is retried after a breath, not at once
            await asyncio.sleep(0.5 if out.result == "refused" else self.pause_s)

    async def _main(self) -> None:
        async with new_client(self.workers + 4, timeout_s=self.deadline_s + 10) as client:
            await asyncio.gather(*(self._worker(client, w) for w in range(self.workers)))

    def between(self, t0: float, t1: float) -> list[tuple[str, Outcome]]:
        """Requests that were in flight at some time in [t0, t1]."""
        return [(k, o) for k, o in list(self.outcomes) if o.t_start <= t1 and o.t_end >= t0]


# ----------------------------------------------------------------------------- faults


@dataclass
class Fault:
    name: str
    find: Callable[[Service], list[int]]
    # outcomes a client may see while this part is down, besides 200, 503 and 504
    in_flight_may_see: frozenset[str] = frozenset()
    long: bool = False  # an engine restart: only in the long (opt-in) run


@dataclass
class FaultResult:
    fault: str
    killed: list[int]
    recovery_s: float | None
    requests: int
    statuses: dict[str, int] = field(default_factory=dict)
    results: dict[str, int] = field(default_factory=dict)
    hung: int = 0
    server_errors: int = 0  # 5xx other than 503/504
    bad: list[str] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)

    def row(self) -> str:
        rec = f"{self.recovery_s:.1f}" if self.recovery_s is not None else "never"
        statuses = ", ".join(f"{k}×{v}" for k, v in sorted(self.statuses.items()))
        others = ", ".join(f"{k}×{v}" for k, v in sorted(self.results.items()) if k not in ("ok", "http_error"))
        return (
            f"| {self.fault} | {self.requests} | {statuses} | {others or '—'} | {self.server_errors} | "
            f"{self.hung} | {rec} | {'; '.join(f'{k}: {v}' for k, v in self.state.items())} |"
        )


TABLE_HEADER = (
    "| fault | requests in the window | HTTP statuses | other ends | 5xx (not 503/504) | hung | "
    "time to full service (s) | state afterwards |\n|---|---|---|---|---|---|---|---|"
)


async def probe_all(url: str, kinds: list[Kind], deadline_s: float) -> list[Outcome]:
    async with new_client(len(kinds) + 2, timeout_s=deadline_s + 5) as client:
        return list(await asyncio.gather(*(send(client, url, k, deadline_s) for k in kinds)))


def wait_full_service(url: str, kinds: list[Kind], timeout_s: float, deadline_s: float = 30.0) -> float | None:
    """Seconds until every kind of request answers 200 twice in a row; None past `timeout_s`."""
    t0 = time.monotonic()
    good = 0
    while time.monotonic() - t0 < timeout_s:
        outs = asyncio.run(probe_all(url, kinds, deadline_s))
        good = good + 1 if all(o.result == "ok" for o in outs) else 0
        if good >= 2:
            return time.monotonic() - t0
        time.sleep(0.5)
    return None


def judge(fault: Fault, outs: list[tuple[str, Outcome]]) -> FaultResult:
    res = FaultResult(fault.name, [], None, len(outs))
    for kind, o in outs:
        key = str(o.status) if o.status is not None else "-"
        res.statuses[key] = res.statuses.get(key, 0) + 1
        res.results[o.result] = res.results.get(o.result, 0) + 1
        if o.result == "hang":
            res.hung += 1
            res.bad.append(f"{kind}: hung ({o.detail})")
        elif o.status is not None and o.status >= 500 and o.status not in (503, 504):
            res.server_errors += 1
            res.bad.append(f"{kind}: {o.status} {o.code} {o.detail}")
        elif o.status is not None and 400 <= o.status < 500 and o.status != 429:
            res.bad.append(f"{kind}: {o.status} {o.code} (a client error for a valid request)")
        elif o.result == "malformed":
            res.bad.append(f"{kind}: malformed ({o.detail})")
        elif o.result in ("conn_closed", "refused") and o.result not in fault.in_flight_may_see:
            res.bad.append(f"{kind}: {o.result} ({o.detail})")
    return res
