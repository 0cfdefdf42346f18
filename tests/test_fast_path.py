"""The default request path (`make run`): Serve's fast path with each client's own address.

Unit tests of the pieces (our HAProxy binary's config rewrite, the client-address decision,
the start line), then the user's command itself: `make run CONFIG=<a copy of the shipped
config on a free port>`, driven as the replaced service's clients would: one client, 12
requests → 10 × 200 then 2 × 429 (its 10/minute limit); the same client forging
`X-Forwarded-For` and our own header → still limited; a second client (another loopback
address) → served; a process that connects to the ingress replica's own port (behind HAProxy)
and names an address without the cluster's HAProxy secret → still limited.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import statistics
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from chaos import Fault, Service, judge, launch_make_run, mixed_kinds, replica_pids, send, wait_serving
from reliability import kill_pid, wait_gone

from cluster.haproxy_wrapper import (
    MAX_CONNS_ENV,
    SUFFIX,
    TIMEOUT_ENV,
    add_rules,
    fast_path_env,
    real_binary,
    rewrite_args,
    rules,
)
from cluster.processes import free_port, kill_sessions, session_processes
from deployments.admission.client_address import (
    CLIENT_ADDR_HEADER,
    PROXY_SECRET_ENV,
    PROXY_SECRET_HEADER,
    ClientAddress,
    client_key,
    disable_uvicorn_forwarding,
    proxy_secret,
    startup_report,
)
from deployments.admission.middleware import _forwarded_for

REPO = Path(__file__).resolve().parents[1]

# The shape Ray Serve 2.60 writes (ray/serve/_private/haproxy_templates.py), abridged.
RAY_CONFIG = """global
    maxconn 4096
defaults
    mode http
frontend prometheus
    bind :9101
frontend http_frontend
    bind 127.0.0.1:8000
    acl healthcheck path -i /-/healthz
backend http-default
    server SERVE_REPLICA_a 127.0.0.1:30000 check
"""


def test_the_rules_go_into_the_http_frontend_only():
    added = rules({})
    out = add_rules(RAY_CONFIG, added)
    lines = out.splitlines()
    bind = lines.index("    bind 127.0.0.1:8000")
    assert f"    http-request set-header {CLIENT_ADDR_HEADER} %[src]" in lines[bind + 1 : bind + 5]
    assert out.replace(added, "") == RAY_CONFIG and out.index(added) > out.index("frontend http_frontend")
    assert "timeout http-request 10s" in added and "sc0_conn_cur gt 100" in added  # the defaults
    with pytest.raises(ValueError):
        add_rules(RAY_CONFIG.replace("frontend http_frontend", "frontend other"), added)


SECRET = "s" * 40


def test_the_secret_is_passed_by_reference_and_checked():
    added = rules({PROXY_SECRET_ENV: SECRET})
    assert f'http-request set-header {PROXY_SECRET_HEADER} "${{{PROXY_SECRET_ENV}}}"' in added
    assert SECRET not in added  # HAProxy reads it from its environment
    assert f"http-request del-header {PROXY_SECRET_HEADER}" in rules({})  # none: a client's copy removed
    for bad in ("short", "x" * 40 + '"; evil', "x" * 40 + " y"):
        with pytest.raises(SystemExit, match=PROXY_SECRET_ENV):
            rules({PROXY_SECRET_ENV: bad})
    assert proxy_secret({}) is None and proxy_secret({PROXY_SECRET_ENV: f" {SECRET} "}) == SECRET


def test_slow_client_settings():
    added = rules({TIMEOUT_ENV: "3", MAX_CONNS_ENV: "0"})
    assert "timeout http-request 3s" in added and "stick-table" not in added  # 0: no cap
    for bad in ({TIMEOUT_ENV: "0"}, {TIMEOUT_ENV: "soon"}, {MAX_CONNS_ENV: "-1"}):
        with pytest.raises(SystemExit, match=next(iter(bad))):
            rules(bad)


def test_haproxy_accepts_the_rewritten_config(tmp_path):
    """The real HAProxy binary (`haproxy -c`) checks the config with our rules in it."""
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(
        add_rules(
            RAY_CONFIG.replace(":9101", f":{free_port()}").replace(":8000", f":{free_port()}"),
            rules({TIMEOUT_ENV: "3", MAX_CONNS_ENV: "50", PROXY_SECRET_ENV: SECRET}),
        )
    )
    r = subprocess.run(
        [real_binary(), "-c", "-f", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, PROXY_SECRET_ENV: SECRET},
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_rewrite_args_writes_beside_rays_file_and_keeps_the_rest(tmp_path, capsys):
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(RAY_CONFIG)
    args = ["-db", "-f", str(cfg), "-dR", "-sf", "123"]
    out = rewrite_args(args)
    assert out == ["-db", "-f", str(cfg) + SUFFIX, "-dR", "-sf", "123"]
    assert CLIENT_ADDR_HEADER in Path(out[2]).read_text() and cfg.read_text() == RAY_CONFIG
    assert rewrite_args(out) == out  # a reload of our own file: unchanged
    cfg.write_text("global\n")  # another shape: HAProxy on Ray's file, said so
    assert rewrite_args(args) == args and "unchanged" in capsys.readouterr().err


def test_fast_path_env_names_our_binary():
    env = fast_path_env()
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and env["FORWARDED_ALLOW_IPS"] == ""
    binary = Path(env["RAY_SERVE_HAPROXY_BINARY_PATH"])
    assert binary.name == "llm-serve-haproxy" and binary.is_absolute() and os.access(binary, os.X_OK)
    assert proxy_secret(env) and env[PROXY_SECRET_ENV] != fast_path_env()[PROXY_SECRET_ENV]  # a new one each
    out = subprocess.run([str(binary), "--new-secret"], capture_output=True, text=True, check=True).stdout.strip()
    assert proxy_secret({PROXY_SECRET_ENV: out}) == out


def test_the_client_address_decision():
    hdr = {CLIENT_ADDR_HEADER.lower(): "198.51.100.7"}
    python_proxy = ClientAddress(fast_path=False)
    assert python_proxy.peer("127.0.0.1", hdr) == "127.0.0.1"  # nobody sets it there: ignored
    fast = ClientAddress(fast_path=True, cluster_addresses=["10.0.0.5"], secret=SECRET)
    vouched = {**hdr, PROXY_SECRET_HEADER.lower(): SECRET}
    assert fast.peer("127.0.0.1", vouched) == "198.51.100.7"  # HAProxy on this node
    assert fast.peer("::ffff:10.0.0.5", vouched) == "198.51.100.7"  # HAProxy on another node
    assert fast.peer("10.0.0.9", vouched) == "10.0.0.9"  # not a Ray node
    assert fast.peer("127.0.0.1", hdr) == "127.0.0.1"  # a local process, no secret
    assert fast.peer("127.0.0.1", {**hdr, PROXY_SECRET_HEADER.lower(): SECRET[:-1] + "t"}) == "127.0.0.1"
    assert fast.peer("127.0.0.1", {}) == "127.0.0.1"
    no_secret = ClientAddress(fast_path=True, cluster_addresses=["10.0.0.5"])  # never believed
    assert no_secret.peer("127.0.0.1", vouched) == "127.0.0.1"
    # then ours: X-Forwarded-For only from a configured proxy, read right to left
    assert client_key(None, "198.51.100.7", "203.0.113.9", ["10.0.0.0/8"]) == "ip:198.51.100.7"
    assert client_key(None, "10.1.2.3", "203.0.113.9, 10.1.1.1", ["10.0.0.0/8"]) == "ip:203.0.113.9"


def test_every_forwarded_for_line_counts():
    scope = {"headers": [(b"x-forwarded-for", b"203.0.113.9"), (b"host", b"x"), (b"x-forwarded-for", b"10.1.1.1")]}
    assert _forwarded_for(scope) == "203.0.113.9, 10.1.1.1" and _forwarded_for({"headers": []}) is None


def test_uvicorn_forwarding_is_switched_off_and_reported():
    env = {"FORWARDED_ALLOW_IPS": "127.0.0.1"}
    assert disable_uvicorn_forwarding(env) == "127.0.0.1" and env["FORWARDED_ALLOW_IPS"] == ""
    level, line = startup_report({}, inherited_forwarding=None)
    assert level == logging.WARNING and "Python proxy" in line and "make run" in line and "FORWARDED_ALLOW_IPS" in line
    level, line = startup_report({"RAY_SERVE_ENABLE_HA_PROXY": "1"}, inherited_forwarding="")
    assert level == logging.WARNING and "llm-serve-haproxy" in line  # fast path, Ray's own HAProxy
    fast = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_HAPROXY_BINARY_PATH": "/x/bin/llm-serve-haproxy"}
    level, line = startup_report(fast, inherited_forwarding="")
    assert level == logging.WARNING and PROXY_SECRET_ENV in line  # no secret: said so
    fast[PROXY_SECRET_ENV] = SECRET
    assert startup_report(fast, inherited_forwarding="") == (
        logging.INFO,
        "request path: Serve's fast path (HAProxy direct ingress, configs/fast-path.env)",
    )


# ----------------------------------------------------------------------------- `make run`


@pytest.fixture(scope="module")
def make_run(tmp_path_factory):
    """`make run CONFIG=...` as a user types it (the shipped config on a free port), in its own
    session; everything it started is stopped by pid at the end."""
    tmp = tmp_path_factory.mktemp("make_run")
    env_extra = {
        # a gateway's fixed max_tokens above the cap is served at the cap (issue 15)
        "LLM_SERVE__LIMITS__MAX_TOKENS_OVER_CAP": "clamp",
        # slow clients: 408 after 3 s, at most 50 connections per address
        "LLM_SERVE_HAPROXY_REQUEST_TIMEOUT_S": "3",
        "LLM_SERVE_HAPROXY_MAX_CONNS_PER_CLIENT": "50",
    }
    proc, url, log_path = launch_make_run(tmp, env_extra=env_extra)
    try:
        try:
            wait_serving(proc, url, log_path, poll_s=2)
        except RuntimeError as exc:
            pytest.fail(str(exc))
        yield Service(url, proc.pid, log_path)
    finally:
        t0 = time.monotonic()
        try:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C, as a user stops it
            proc.wait(timeout=180)  # Serve drains and stops Ray (slow on a loaded machine)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        waited = time.monotonic() - t0
        deadline = time.monotonic() + 60
        while (left := session_processes({proc.pid})) and time.monotonic() < deadline:
            time.sleep(2)
        names = sorted({_name(pid) for pid in left})
        kill_sessions({proc.pid}, grace_s=20)  # whatever is left of it, by pid
        print(f"\nmake run after Ctrl-C: exited in {waited:.0f} s; {len(left)} process(es) left 60 s later {names}")
        if left:  # seen in fresh-clone runs after the module's 3,000-connection flood: open finding
            import warnings

            warnings.warn(
                f"{len(left)} process(es) of `make run` still running 60 s after it exited "
                f"({waited:.0f} s after Ctrl-C): {names}; killed by pid",
                stacklevel=1,
            )


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()[-60:]
    except OSError:
        return "?"


def _post(url: str, source: str = "127.0.0.1", headers=None, **body) -> httpx.Response:
    transport = httpx.HTTPTransport(local_address=source)
    with httpx.Client(transport=transport, timeout=120) as c:
        return c.post(
            url + "/v1/chat/completions",
            headers=headers or {},
            json={"messages": [{"role": "user", "content": "体育新闻"}], "max_tokens": 1, **body},
        )


def _chat(url: str, source: str = "127.0.0.1", **headers) -> int:
    return _post(url, source, headers).status_code


def test_make_run_limits_each_client_by_its_own_address(make_run):
    url, log = make_run.url, make_run.log
    assert "fast path" in log.read_text()
    codes = [_chat(url) for _ in range(12)]
    assert codes == [200] * 10 + [429] * 2, codes
    forged = {"X-Forwarded-For": "203.0.113.9", CLIENT_ADDR_HEADER: "203.0.113.10"}
    assert [_chat(url, **forged) for _ in range(2)] == [429, 429]
    assert [_chat(url, source="127.0.0.2") for _ in range(2)] == [200, 200]  # a second client


def _ingress_port(haproxy_port: int) -> int:
    """The ingress replica's own HTTP port, from the HAProxy config `make run` wrote."""
    import re

    for cfg in sorted(Path("/tmp/haproxy-serve").glob("*/haproxy.cfg" + SUFFIX), key=lambda p: -p.stat().st_mtime):
        text = cfg.read_text()
        if re.search(rf"^\s*bind \S*:{haproxy_port}\s*$", text, re.M):
            m = re.search(r"server SERVE_REPLICA_\S*IngressRouter\S* [\d.]+:(\d+)", text)
            if m:
                return int(m.group(1))
    pytest.fail(f"no HAProxy config serving port {haproxy_port} with an ingress replica")


def test_a_direct_connection_to_the_ingress_cannot_name_an_address(make_run):
    """Another process on the node connects to the ingress replica's own port (HAProxy's
    backend) and sets the address header, with a wrong secret or none: not believed — its
    requests count against its own address, which has spent its 10/minute."""
    url = make_run.url
    direct = f"http://127.0.0.1:{_ingress_port(int(url.rsplit(':', 1)[1]))}"
    assert [_chat(url, source="127.0.0.9") for _ in range(10)] == [200] * 10
    named = {CLIENT_ADDR_HEADER: "203.0.113.50"}
    assert _chat(direct, source="127.0.0.9", **named) == 429
    assert _chat(direct, source="127.0.0.9", **named, **{PROXY_SECRET_HEADER: "x" * 43}) == 429
    assert _chat(url, source="127.0.0.9", **named, **{PROXY_SECRET_HEADER: "x" * 43}) == 429  # via HAProxy


def test_make_run_reads_the_environment_max_tokens_over_the_cap_is_clamped(make_run):
    """`LLM_SERVE__LIMITS__MAX_TOKENS_OVER_CAP=clamp` in `make run`'s environment: a gateway's
    max_tokens 2000 is served with the cap (512), not refused."""
    url = make_run.url
    r = _post(url, source="127.0.0.3", max_tokens=2000, ignore_eos=True, temperature=0)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 512


def _latency_ms(url: str, source: str) -> float:
    with httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=60) as c:
        t = time.perf_counter()
        assert c.get(url + "/v1/models").status_code == 200
        return 1000 * (time.perf_counter() - t)


def test_slow_clients_get_408_and_one_address_cannot_hold_the_server(make_run):
    """3,000 connections from one address send headers and half a body, then stall (issue 18's
    measurement: before, all stayed open and a normal request took 21.8 s). Now HAProxy keeps at
    most 50 of them (the per-address cap), answers those 408 after the 3 s request timeout and
    closes every one; a normal client is served meanwhile. Latencies are printed, not asserted
    tightly (the machine is shared): the figures go in the note."""
    url = make_run.url
    port = int(url.rsplit(":", 1)[1])
    idle = statistics.median(_latency_ms(url, "127.0.0.7") for _ in range(7))
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"messages": ['
    )
    socks, refused = [], 0
    t0 = time.monotonic()
    try:
        for _ in range(3000):
            s = socket.socket()
            s.bind(("127.0.0.5", 0))
            s.settimeout(5)
            try:
                s.connect(("127.0.0.1", port))
                s.sendall(head)
                socks.append(s)
            except OSError:
                refused += 1
                s.close()
        during = statistics.median(_latency_ms(url, "127.0.0.7") for _ in range(7))
        answers: dict[str, int] = {}
        for s in socks:  # every connection ends by itself: 408, or closed at once (over the cap)
            s.settimeout(max(1.0, 3 + 15 - (time.monotonic() - t0)))
            try:
                data = s.recv(64)
                key = data.split(b"\r\n", 1)[0].decode() if data else "closed"
            except ConnectionResetError:
                key = "reset"
            except TimeoutError:
                key = "still open"
            answers[key] = answers.get(key, 0) + 1
    finally:
        for s in socks:
            s.close()
    print(
        f"\nslow clients: idle {idle:.1f} ms, during the flood {during:.1f} ms "
        f"({during / idle:.2f}x); connections: {answers}, refused at connect {refused}"
    )
    assert "still open" not in answers, answers
    got_408 = sum(n for k, n in answers.items() if " 408" in k)
    assert 1 <= got_408 <= 50, answers
    assert during < 2000, (idle, during)


def test_make_run_answers_the_replaced_services_clients(make_run):
    """The replaced service's documented client against `make run` as shipped (issue 15): no
    `model`, max_tokens 50, temperature 0.3, 3 worker threads, timeout 30 s; the fields its
    clients and health checks read (../shared/LEGACY_API.md)."""
    from concurrent.futures import ThreadPoolExecutor

    url = make_run.url
    titles = ["央行宣布下调存款准备金率", "国足客场战平对手", "新款手机发布会定于下月举行"]

    def call(title: str) -> dict:
        with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.8"), timeout=30) as c:
            r = c.post(
                url + "/v1/chat/completions",
                json={
                    "messages": [{"role": "user", "content": f"分类：{title}"}],
                    "max_tokens": 50,
                    "temperature": 0.3,
                },
            )
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(max_workers=3) as pool:
        bodies = list(pool.map(call, titles))
    for body in bodies:  # the shipped config answers a model-less request with the fine-tuned adapter
        assert body["model"] == "news-lora" and isinstance(body["choices"][0]["message"]["content"], str)
        assert body["choices"][0]["finish_reason"] in ("stop", "length") and body["usage"]["total_tokens"] > 0
    health = httpx.get(url + "/health", timeout=30).json()
    assert health["status"] == "healthy" and "gpu" in health
    assert {"max_concurrent_requests", "max_queue_size", "rate_limit"} <= set(health["limits"])
    assert health["limits"]["max_concurrent_requests"] == 3 and health["limits"]["max_queue_size"] == 10


def test_an_ingress_replica_killed_under_load_is_replaced_and_nothing_else_is_lost(make_run):
    """The ingress replica of `make run` (behind HAProxy) killed under a mixed load of chat,
    completions and classify, streamed and not, from eight clients (each its own address, within
    its 10 requests a minute): requests in flight on it may see their connection closed, every
    other answer is a 200 (or 503/504), none hangs, and Serve's replacement serves every kind
    again. (`-m soak -k chaos`: every part of the service in turn, with the state afterwards.)"""
    import asyncio
    import threading

    url = make_run.url
    kinds = [k for k in mixed_kinds(None)]
    outcomes: list = []
    stop = threading.Event()

    async def client(addr: str, start: int) -> None:
        transport = httpx.AsyncHTTPTransport(local_address=addr)
        async with httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(70, connect=10)) as c:
            for i in range(8):  # under the address's 10 a minute
                if stop.is_set():
                    return
                kind = kinds[(start + i) % len(kinds)]
                outcomes.append((kind.name, await send(c, url, kind, deadline_s=60)))
                await asyncio.sleep(1.0)

    async def load() -> None:
        await asyncio.gather(*(client(f"127.0.6.{w + 1}", w) for w in range(8)))

    def answers_every_kind(round_: int) -> bool:
        async def probe():
            transport = httpx.AsyncHTTPTransport(local_address=f"127.0.7.{round_ % 250 + 1}")
            async with httpx.AsyncClient(transport=transport, timeout=60) as c:
                return await asyncio.gather(*(send(c, url, k, deadline_s=60) for k in kinds))

        return all(o.result == "ok" for o in asyncio.run(probe()))

    old = replica_pids(make_run, "IngressRouter")
    assert len(old) == 1, old
    runner = threading.Thread(target=lambda: asyncio.run(load()))
    runner.start()
    time.sleep(2)  # requests in flight when it dies
    t_kill = time.monotonic()
    kill_pid(old[0])
    assert not wait_gone(old, 30), "the ingress replica is still alive after SIGKILL"
    rounds, good, back = 0, 0, None
    while time.monotonic() - t_kill < 120 and back is None:
        rounds += 1
        good = good + 1 if answers_every_kind(rounds) else 0
        back = time.monotonic() - t_kill if good >= 2 else None
        time.sleep(0.5)
    runner.join(timeout=150)
    stop.set()
    res = judge(Fault("ingress replica", lambda s: old, frozenset({"conn_closed", "refused"})), outcomes)
    print(f"\ningress replica killed: back in {back} s; {res.row()}")
    assert back is not None, "not every kind of request answered again within 120 s"
    assert res.hung == 0 and res.server_errors == 0 and not res.bad, res.bad[:10]
    assert res.results.get("ok", 0) >= len(outcomes) // 2, res.results
    new = replica_pids(make_run, "IngressRouter")
    assert new and not set(new) & set(old), (old, new)
