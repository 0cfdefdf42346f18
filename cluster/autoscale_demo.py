#!/usr/bin/env python3
"""Watch the model deployment scale across the local cluster's (logical) GPUs, and back.

    cluster/local_cluster.py start                 # head + 2 workers, one logical GPU each
    .venv/bin/python cluster/autoscale_demo.py     # deploy, load, watch, unload, watch
    cluster/local_cluster.py stop

It deploys configs/serve_config.yaml to the running local cluster the way `serve deploy` and
KubeRay do (PUT of the Serve config to the dashboard's REST API), with `accelerator: gpu`, a
free HTTP port and short autoscaling delays (`--fast`, the default; `--no-fast` keeps the
production delays: 15 s up, 300 s down), then drives `--users` concurrent chat requests for
`--load-s` seconds (and until 2 replicas run), printing the model deployment's replicas (state,
node, GPU id) whenever they change, then waits for the scale-down. `serve status -a $RAY_DASHBOARD_ADDRESS` shows the same.

    .venv/bin/python cluster/autoscale_demo.py --policy llm --long --users 1

shows the LLM-aware policy (deployments/autoscaling.py): one client with long requests keeps
half of `target_ongoing_requests` in flight, yet fills the engine's KV cache; the deployment
scales out on that (the controller's log says why: `llm-autoscaling:` lines) and back after.

It only talks HTTP (dashboard + the app), so it never joins the cluster. tests/test_autoscaling.py
uses the same pieces and asserts on what they observe.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import secrets
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

from cluster import local_cluster as lc
from cluster.processes import free_port

REPO = Path(__file__).resolve().parents[1]
APP = "llm"
# /health's details (which replica answered, its GPU ids) need an admin key, with auth off too:
# the demo's app gets this one (LLM_SERVE_ADMIN_KEYS in the ingress's environment), new per run.
ADMIN_KEY = f"sk-demo-admin-{secrets.token_hex(8)}"
MODEL_DEPLOYMENT = "ModelReplica"
# Short delays so that a demo (and the test) sees both directions within a minute or two.
# metrics_interval_s is deprecated in Ray 2.60 but still sets how often handles and replicas
# push autoscaling metrics (default 10 s); production keeps the default.
FAST_AUTOSCALING = {
    "upscale_delay_s": 2,
    "downscale_delay_s": 6,
    "look_back_period_s": 4,
    "metrics_interval_s": 1,
}


def retry(fn: Callable[[], Any], timeout_s: float = 120.0, every_s: float = 1.0) -> Any:
    """`fn()` until it returns without an HTTP error (a busy machine answers late)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return fn()
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(every_s)


# `--policy llm --long`: the LLM-aware policy (deployments/autoscaling.py) against a load of few,
# long requests. The tiny model's whole context is a few MB of KV, so the engine gets a small
# cache (9 blocks of 128 tokens, one of them vLLM's null block: a long request grows from 4 to
# 7 of the 8; one client's back-to-back requests kept it 0.43-0.72 full (window means, from run
# to run of the loaded test machine)) and the policy a KV target below that: 2 replicas, at
# times 3 asked for (the 3rd then pends, as no GPU is left).
LLM_POLICY_ARGS: dict[str, Any] = {
    "autoscaling": {"policy": "llm", "kv_cache_target": 0.35},
    "engine": {"extra": {"num_gpu_blocks_override": 9}},
}
LONG_MAX_TOKENS = 500  # + a ~380-token prompt: ~7 KV blocks per request, within max_model_len


def long_prompt(user: int, i: int) -> str:
    """~380 prompt tokens with the tiny model's tokenizer, distinct from the first token (no
    prefix-cache sharing between requests)."""
    head = f"用户{user}的第{i}条长新闻："
    return head + "，".join(f"第{k}段关于经济与体育的长篇报道" for k in range(30))[: 480 - len(head)]


def demo_serve_config(
    http_port: int, autoscaling: dict[str, Any] | None = None, fast: bool = True, args: dict[str, Any] | None = None
) -> dict[str, Any]:
    """configs/serve_config.yaml as deployed on the local GPU cluster; `args` deep-merges over
    its application args (e.g. `LLM_POLICY_ARGS`)."""
    from ray.serve.schema import ServeDeploySchema

    from deployments.config import ServiceConfig, deep_merge

    cfg = yaml.safe_load((REPO / "configs" / "serve_config.yaml").read_text())
    cfg["http_options"] = {**cfg.get("http_options", {}), "host": "127.0.0.1", "port": http_port}
    app = next(a for a in cfg["applications"] if a["name"] == APP)
    auto = {**(FAST_AUTOSCALING if fast else {}), **(autoscaling or {})}
    app["args"] = deep_merge(
        app["args"],
        {
            "accelerator": "gpu",
            "model": {"model_source": str(REPO / "models" / "tiny-qwen3")},
            "deployments": {
                "model": {"autoscaling_config": auto},
                "ingress": {"ray_actor_options": {"runtime_env": {"env_vars": {"LLM_SERVE_ADMIN_KEYS": ADMIN_KEY}}}},
            },
            # Several CPU engines share this host's cores: let the OS place their threads instead
            # of vLLM pinning each engine to the same core (its `auto` binding on a small machine).
            "engine_env": {"VLLM_CPU_OMP_THREADS_BIND": "nobind"},
        },
    )
    app["args"] = deep_merge(app["args"], args or {})
    if "rate_limit" in ServiceConfig.model_fields:  # all the load comes from one client address
        app["args"]["rate_limit"] = {**app["args"].get("rate_limit", {}), "enabled": False}
    ServiceConfig.model_validate(app["args"])
    ServeDeploySchema.model_validate(cfg)  # what `serve deploy` checks
    return cfg


def deploy(dashboard: str, cfg: dict[str, Any]) -> None:
    r = httpx.put(f"{dashboard}/api/serve/applications/", json=cfg, timeout=60)
    r.raise_for_status()


class Watcher:
    """Reads the cluster through the dashboard (Serve REST API + state API) and the app."""

    def __init__(self, dashboard: str, base_url: str):
        self.dash = httpx.Client(base_url=dashboard, timeout=30)
        self.base_url = base_url
        self.gpu_of_node: dict[str, str] = {}  # node id -> the GPU id a replica there reported
        self.t0 = time.monotonic()
        self.timeline: list[str] = []

    def note(self, msg: str) -> None:
        line = f"[{time.monotonic() - self.t0:6.1f}s] {msg}"
        self.timeline.append(line)
        print(line, flush=True)

    def _app(self) -> dict[str, Any] | None:
        r = self.dash.get("/api/serve/applications/")
        r.raise_for_status()
        return r.json().get("applications", {}).get(APP)

    def app_status(self) -> str | None:
        app = self._app()
        return None if app is None else app["status"]

    def actors(self) -> list[dict[str, Any]]:
        """Ray actors of the model replicas (ALIVE / PENDING_CREATION / ..., node)."""
        r = self.dash.get(
            "/api/v0/actors",
            params={
                "filter_keys": "class_name",
                "filter_predicates": "=",
                "filter_values": f"ServeReplica:{APP}:{MODEL_DEPLOYMENT}",
                "limit": 100,
            },
        )
        r.raise_for_status()
        return [a for a in r.json()["data"]["result"]["result"] if a["state"] != "DEAD"]

    def snapshot(self) -> dict[str, Any]:
        app = self._app() or {}
        dep = app.get("deployments", {}).get(MODEL_DEPLOYMENT) or {}
        replicas = dep.get("replicas", [])
        actors = self.actors()
        return {
            "target": dep.get("target_num_replicas"),
            "status": dep.get("status"),
            "states": dict(collections.Counter(r["state"] for r in replicas)),
            "running": [r for r in replicas if r["state"] == "RUNNING"],
            "actor_states": dict(collections.Counter(a["state"] for a in actors)),
            "pending_actors": [a for a in actors if a["state"] == "PENDING_CREATION"],
        }

    def describe(self, snap: dict[str, Any]) -> str:
        where = sorted(
            f"node {r['node_id'][:8]}/gpu {self.gpu_of_node.get(r['node_id'], '?')}" for r in snap["running"]
        )
        return f"target={snap['target']} replicas={snap['states']} running on {where} actors={snap['actor_states']}"

    def wait_for(
        self, what: str, pred: Callable[[dict[str, Any]], bool], timeout_s: float, every_s: float = 1.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            try:
                snap = self.snapshot()
            except httpx.HTTPError as exc:
                self.note(f"(dashboard: {type(exc).__name__}, retrying)")
                time.sleep(every_s)
                continue
            desc = self.describe(snap)
            if desc != last:
                self.note(desc)
                last = desc
            if pred(snap):
                self.note(f"reached: {what}")
                return snap
            time.sleep(every_s)
        raise TimeoutError(f"not reached within {timeout_s:.0f}s: {what}\n" + "\n".join(self.timeline))

    def health(self) -> dict[str, Any]:
        """GET /health; a non-JSON answer (the proxy's plain 500 while the app starts) raises
        an httpx error, so `retry` tries again."""
        r = httpx.get(f"{self.base_url}/health", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)
        if "json" not in r.headers.get("content-type", ""):
            raise httpx.HTTPStatusError(f"GET /health: {r.status_code} {r.text[:200]!r}", request=r.request, response=r)
        return r.json()

    def learn_gpu_ids(self, snap: dict[str, Any]) -> None:
        """Map a newly running replica's node to the GPU id it reports (GET /health does not
        say which node answered, so this works one new node at a time)."""
        unknown = [r["node_id"] for r in snap["running"] if r["node_id"] not in self.gpu_of_node]
        if len(unknown) != 1:
            return
        new_ids = [i for i in self.sample_gpu_ids(len(snap["running"])) if i not in self.gpu_of_node.values()]
        if len(new_ids) == 1:
            self.gpu_of_node[unknown[0]] = new_ids[0]

    def sample_gpu_ids(self, want: int, deadline_s: float = 120.0, every_s: float = 2.2) -> dict[str, str | None]:
        """ray.get_gpu_ids() -> CUDA_VISIBLE_DEVICES as the replicas report them, until `want`
        replicas have answered or `deadline_s` passed. GET /health reaches one replica per
        check and the router spreads the checks; the ingress answers /health from one check per
        `health.cache_s` (2 s), so the calls are `every_s` apart — faster ones read the same."""
        seen: dict[str, str | None] = {}
        end = time.monotonic() + deadline_s
        while True:
            rep = retry(self.health).get("replica", {})
            if rep.get("ray_gpu_ids"):
                seen[",".join(rep["ray_gpu_ids"])] = rep.get("cuda_visible_devices")
            if len(seen) >= want or time.monotonic() > end:
                return seen
            time.sleep(every_s)


class Load:
    """`users` clients in a loop on /v1/chat/completions, in a background thread. `prompt(u, i)`:
    the i-th message of user u (default: a short news title)."""

    def __init__(
        self, base_url: str, users: int, max_tokens: int = 128, prompt: Callable[[int, int], str] | None = None
    ):
        self.url = f"{base_url}/v1/chat/completions"
        self.users = users
        self.max_tokens = max_tokens
        self.prompt = prompt or (lambda u, i: f"用户{u}的第{i}条新闻")
        self.results: list[tuple[float, int, float]] = []  # (t_end, status, latency)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=150)

    async def _user(self, client: httpx.AsyncClient, u: int) -> None:
        i = 0
        while not self._stop.is_set():
            body = {
                "model": "tiny-qwen3",
                "max_tokens": self.max_tokens,
                "temperature": 0,
                "ignore_eos": True,
                "messages": [{"role": "user", "content": self.prompt(u, i)}],
            }
            t = time.monotonic()
            try:
                status = (await client.post(self.url, json=body)).status_code
            except httpx.HTTPError:
                status = -1
            self.results.append((time.monotonic(), status, time.monotonic() - t))
            i += 1

    async def _run(self) -> None:
        limits = httpx.Limits(max_connections=self.users + 2)
        async with httpx.AsyncClient(timeout=httpx.Timeout(130.0), limits=limits) as client:
            await asyncio.gather(*[self._user(client, u) for u in range(self.users)])

    def statuses(self, since: float = 0.0) -> collections.Counter:
        return collections.Counter(s for t, s, _ in list(self.results) if t >= since)

    def latencies(self) -> list[float]:
        return sorted(l for _, s, l in list(self.results) if s == 200)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--state-dir", type=Path, default=None, help="local_cluster.py's state dir")
    p.add_argument("--port", type=int, default=0, help="HTTP port of the app (default: a free one)")
    p.add_argument("--users", type=int, default=6, help="concurrent clients (default 6 = 2 GPUs x 3 slots)")
    p.add_argument("--load-s", type=float, default=60, help="seconds of load (default 60)")
    p.add_argument("--max-replicas", type=int, default=3, help="model max_replicas (default 3)")
    p.add_argument("--no-fast", dest="fast", action="store_false", help="keep the production delays")
    p.add_argument(
        "--policy",
        choices=("ongoing_requests", "llm"),
        default="ongoing_requests",
        help="model autoscaling policy; llm: the LLM-aware one, with a small KV cache "
        "and KV target for the tiny model (LLM_POLICY_ARGS)",
    )
    p.add_argument(
        "--long",
        action="store_true",
        help=f"long requests (~380 prompt tokens, max_tokens {LONG_MAX_TOKENS}); "
        "with --users 1 the request count alone stays at one replica",
    )
    a = p.parse_args(argv)

    state = lc.load_state(a.state_dir or lc.DEFAULT_STATE_DIR)
    if not state or not state.get("dashboard_url"):
        print("no local cluster with a dashboard: run `cluster/local_cluster.py start` first", file=sys.stderr)
        return 1
    port = a.port or free_port()
    base_url = f"http://127.0.0.1:{port}"
    cfg = demo_serve_config(
        port, {"max_replicas": a.max_replicas}, fast=a.fast, args=LLM_POLICY_ARGS if a.policy == "llm" else None
    )
    w = Watcher(state["dashboard_url"], base_url)
    deploy(state["dashboard_url"], cfg)
    w.note(f"deployed to {state['dashboard_url']}; app at {base_url}")
    snap = w.wait_for("1 model replica running", lambda s: len(s["running"]) >= 1, 600)
    w.learn_gpu_ids(snap)
    for ids, cvd in w.sample_gpu_ids(1).items():
        w.note(f"replica reports ray.get_gpu_ids()=['{ids}'] CUDA_VISIBLE_DEVICES={cvd}")
    load = Load(base_url, a.users, LONG_MAX_TOKENS, long_prompt) if a.long else Load(base_url, a.users)
    with load:
        w.note(f"load: {a.users} concurrent clients for {a.load_s:.0f}s, and until 2 replicas run")
        t0 = time.monotonic()
        last = None
        while True:
            snap = retry(w.snapshot)
            w.learn_gpu_ids(snap)
            desc = w.describe(snap)
            if desc != last:
                w.note(desc)
                last = desc
            elapsed = time.monotonic() - t0
            if elapsed >= a.load_s and (len(snap["running"]) >= 2 or elapsed > 600):
                break
            time.sleep(2)
    counts = load.statuses()
    lat = load.latencies()
    w.note(
        f"load done: {sum(counts.values())} requests {dict(counts)}"
        + (f", p50 {lat[len(lat) // 2]:.2f}s" if lat else "")
    )
    w.wait_for(
        "back to min_replicas", lambda s: s["target"] == 1 and len(s["running"]) == 1 and not s["pending_actors"], 900
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
