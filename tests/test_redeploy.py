"""Graceful shutdown and redeploy under load (slow): while clients keep sending requests,
`serve.run` the same application name again with a changed config — new `args`
(limits.default_temperature changed, so every deployment's replicas are replaced, the model
replica's engine included) and the ingress scaled 1 -> 2. Zero failed requests: the requests in
flight on the old replicas finish (they drain: graceful_shutdown_* options), the ones that arrive
while the new engine starts wait for it.

On conftest's `faults_app` (route prefix /faults), as its last user (`REDEPLOYS`: conftest
orders it after tests/test_control_plane_state.py and tests/test_faults.py, and deletes the app
after it): the app this test replaces is running already, so the suite starts one engine fewer.
"""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
from conftest import ADMIN, FAULTS_TIMEOUT_S, faults_args, wait_healthy
from reliability import chat_body, new_client, replica_pids, request, summarize, wait_gone

pytestmark = pytest.mark.slow

APP = "faults"  # conftest.faults_app
REDEPLOYS = "faults_app"  # conftest: run after the app's other users
CLIENTS = 3  # concurrent client loops (below the model's 3 slots + 10 queue places)
TAIL_S = 5.0  # keep the load running this long after the new version is up
OLD_T, NEW_T = 0.7, 0.3  # limits.default_temperature before (the shipped default) and after


def ingress_grace_s() -> float:
    """The old ingress replicas' drain time (serve_app.app_options derives it from the
    request deadline): their requests may wait for the new model replica's engine."""
    from ray.serve._private.constants import DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S

    from deployments.config import ServiceConfig
    from serve_app import app_options

    opts = app_options(ServiceConfig.model_validate(new_args()))["ingress"]
    return float(opts.get("graceful_shutdown_timeout_s", DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S))


def new_args() -> dict:
    return faults_args(limits={"default_temperature": NEW_T}, deployments={"ingress": {"num_replicas": 2}})


@pytest.fixture(scope="module")
def url(faults_app):
    return faults_app


def test_redeploy_changed_config_under_load_has_zero_failures(url):
    from ray import serve

    from serve_app import build_app

    # an old ingress replica is not killed while a request it holds may still be answered
    assert ingress_grace_s() >= FAULTS_TIMEOUT_S, ingress_grace_s()
    before = httpx.get(f"{url}/health", headers=ADMIN, timeout=30).json()
    assert before["limits"]["default_temperature"] == OLD_T
    assert before["deployments"]["IngressRouter"]["running_replicas"] == 1
    old = {d: replica_pids(APP, d) for d in ("IngressRouter", "PromptTokenizer", "ModelReplica")}
    done = threading.Event()
    marks: dict[str, float] = {}

    def redeploy():
        marks["start"] = time.monotonic()
        serve.run(build_app(new_args()), name=APP, route_prefix=f"/{APP}", blocking=False)
        marks["running"] = time.monotonic()  # serve.run returns once the app is RUNNING again
        done.set()

    async def client_loop(c, k: int, outs: list, stop: asyncio.Event):
        i = 0
        while not stop.is_set():
            stream = (i + k) % 2 == 0
            body = chat_body(1000 * k + i, 48, stream, ignore_eos=True)
            if stream:
                body["stream_options"] = {"include_usage": True}
            outs.append(await request(c, url, body, label=f"c{k}-{i}", deadline_s=FAULTS_TIMEOUT_S + 30))
            i += 1
            await asyncio.sleep(0.2)

    async def run():
        outs: list = []
        long_outs: list = []
        stop = asyncio.Event()
        async with new_client() as c:
            loops = [asyncio.create_task(client_loop(c, k, outs, stop)) for k in range(CLIENTS)]
            await asyncio.sleep(3)
            # two long streams in flight on the old replicas when the update starts
            started = asyncio.Event()
            longs = [
                asyncio.create_task(
                    request(
                        c,
                        url,
                        chat_body(9000 + j, 1500, True, ignore_eos=True, stream_options={"include_usage": True}),
                        label=f"long{j}",
                        on_chunk=started,
                        deadline_s=FAULTS_TIMEOUT_S + 30,
                    )
                )
                for j in range(2)
            ]
            await asyncio.wait_for(started.wait(), 60)
            thread = threading.Thread(target=redeploy, daemon=True)
            thread.start()
            while not done.is_set():
                await asyncio.sleep(0.5)
                assert time.monotonic() - marks["start"] < 300, "redeploy did not finish in 300 s"
            await asyncio.sleep(TAIL_S)
            stop.set()
            await asyncio.gather(*loops)
            long_outs = await asyncio.gather(*longs)
        return outs, long_outs

    outs, long_outs = asyncio.run(run())
    t0, t1 = marks["start"], marks["running"]
    during = [o for o in outs if o.t_end >= t0 and o.t_start <= t1]
    summarize("redeploy: all requests", outs + long_outs)
    summarize("redeploy: requests overlapping the update window", during)
    summarize("redeploy: long streams in flight at the update", long_outs)
    after = httpx.get(f"{url}/health", headers=ADMIN, timeout=30).json()
    new = {d: replica_pids(APP, d) for d in old}
    print(
        f"    update took {t1 - t0:.1f} s (serve.run until RUNNING); replicas before {old} after {new}; "
        f"default_temperature {before['limits']['default_temperature']} -> {after['limits']['default_temperature']}; "
        f"ingress replicas running: {after['deployments']['IngressRouter']['running_replicas']}"
    )
    stale = {d: [p for p in old[d] if p in new[d]] for d in old}
    failed = [o for o in outs + long_outs if o.result != "ok"]
    if failed:
        print(
            f"    failed: {[(o.label, o.status, o.result, round(o.t_start - t0, 1), round(o.latency, 1)) for o in failed]} "
            f"(label, status, result, sent s after the update started, latency s)"
        )
    assert not failed, "a request failed during the redeploy"
    assert all(o.tokens == 1500 for o in long_outs)
    assert len(during) >= CLIENTS
    assert after["limits"]["default_temperature"] == NEW_T
    assert after["deployments"]["IngressRouter"]["running_replicas"] == 2
    assert not any(stale.values()), f"replicas not replaced: {stale}"
    # the old model replica's process exits once it has drained
    alive = wait_gone(old["ModelReplica"], 30)
    assert not alive, f"old model replica still alive 30 s after the update: {alive}"
    wait_healthy(url, 30)
