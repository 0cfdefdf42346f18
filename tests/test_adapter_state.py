"""Issue 24, adapters: the registry's state survives its actor, an engine LoRA id never names two
adapters, the request path answers adapter names without a registry call per request, a
registry that fails is a 503 with `Retry-After` (never a 500), and the admin routes are off
unless an admin key is configured (auth off too).

The module deploys its own app (`adapterstate`, route prefix /adapterstate): the shipped config
(`model.default_model: news-lora`: model-less requests go to the adapter) with two ingress
replicas (each with its own copy of the registry) and no admin key in the environment. Its
keys file starts without keys — the shipped situation, auth off and no admin key — and the
tests that load adapters write an admin key into it (the ingress re-reads it: the admin routes
turn on without a restart). Faults are done to this app's registry actor (`adapters.adapterstate`)
only: `ray.kill(handle, no_restart=False)` is what a crash looks like to Ray (it restarts it).
The last tests check the registry client's copy and the actor's store in process (no Ray).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
from conftest import LORA_DIR, app_args, wait_healthy

APP = "adapterstate"
PREFIX = "/adapterstate"
REGISTRY = f"adapters.{APP}"
NAMESPACE = "llm_serve"
BASE = "tiny-qwen3"
ADAPTER = "news-lora"
ADMIN_KEY = "sk-adapterstate-admin-7f3c"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
TEXTS = ["央行宣布降息25个基点", "詹姆斯带领湖人队赢得总冠军", "新款电动汽车正式上市"]
CACHE_S = 1.0  # lora.registry_cache_s (the default)
RESTART_S = 60  # the registry actor is back (Ray restarts it) within this
RECOVERY_S = 30  # then every request answers 200 within this


# ----------------------------------------------------------------------------- the app


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> Path:
    """An adapter root with copies of the shipped adapter: `copy` (the same weights) and `zero`
    (its lora_B zeroed: base + 0, mathematically the base model)."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("adapter-roots")
    shutil.copytree(LORA_DIR, root / "copy")
    shutil.copytree(LORA_DIR, root / "zero")
    tensors = load_file(str(root / "zero" / "adapter_model.safetensors"))
    assert any("lora_B" in k for k in tensors)
    save_file(
        {k: (v * 0 if "lora_B" in k else v) for k, v in tensors.items()},
        str(root / "zero" / "adapter_model.safetensors"),
    )
    return root


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("adapter-keys") / "keys.yaml"
    f.write_text("# no keys: auth off and no admin key, as shipped\n")
    return f


@pytest.fixture(scope="module")
def url(http_port, roots, keys_file):
    from ray import serve

    from serve_app import build_app

    args = app_args(
        model={"default_model": ADAPTER},  # as shipped: model-less requests go to news-lora
        auth={"file": str(keys_file), "reload_interval_s": 0},
        lora={"adapter_roots": ["models", str(roots)]},
        # two ingress replicas, each with its own copy of the registry; no admin key in their
        # environment (conftest's), so the keys file alone decides
        deployments={"ingress": {"num_replicas": 2, "ray_actor_options": {"runtime_env": None}}},
    )
    assert args["lora"].get("registry_cache_s", CACHE_S) == CACHE_S
    serve.run(build_app(args), name=APP, route_prefix=PREFIX, blocking=False)
    base = f"http://127.0.0.1:{http_port}{PREFIX}"
    wait_healthy(base)
    yield base
    serve.delete(APP)
    from deployments.actors import kill_actor

    kill_actor(REGISTRY)  # detached: it would outlive the app
    _kv_del()


def _kv_del() -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_del(REGISTRY, namespace=NAMESPACE)


def set_admin_key(url: str, keys_file: Path, on: bool) -> None:
    """Write (or remove) the admin key in the keys file and wait until both ingress replicas
    act on it (they re-read the file when it changes)."""
    doc = {"keys": [{"key": ADMIN_KEY, "tenant": "ops", "role": "admin"}]} if on else None
    keys_file.write_text(json.dumps(doc) if doc else "# no keys\n")
    st = keys_file.stat()
    os.utime(keys_file, (st.st_atime, st.st_mtime + 2))  # a new stamp even within one mtime tick
    want = 404 if on else 403  # unload of an unknown adapter: the route answers, or the guard

    def settled() -> bool:
        codes = {
            httpx.post(
                f"{url}/v1/unload_lora_adapter", json={"lora_name": "no-such-adapter"}, headers=ADMIN, timeout=30
            ).status_code
            for _ in range(6)
        }  # the router spreads them over both
        return codes == {want}

    poll(settled, 30, f"admin routes {'on' if on else 'off'}")


@pytest.fixture
def admin(url, keys_file):
    set_admin_key(url, keys_file, True)
    return ADMIN


@pytest.fixture(autouse=True)
def news_lora(request):
    """Every test of the app starts with the configured adapter registered (as the ingress
    registers it at start), whatever an earlier test did to the registry: each test shows its
    own point."""
    if "url" not in request.fixturenames:
        return  # an in-process test
    request.getfixturevalue("url")
    import ray

    from deployments.config import resolve_path

    try:
        handle = registry()
    except ValueError:  # no registry actor now: the ingress creates one (from the store) on use
        return
    if ray.get(handle.get.remote(ADAPTER), timeout=30) is None:
        path = resolve_path(app_args()["lora"]["adapters"][ADAPTER])  # as the ingress registers it
        ray.get(handle.register.remote(ADAPTER, path, True), timeout=30)


# ----------------------------------------------------------------------------- helpers


def poll(predicate, timeout_s: float, what: str, interval_s: float = 0.25):
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        try:
            last = predicate()
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout_s:g} s (last: {last!r})")
        time.sleep(interval_s)


def chat(url: str, model: str | None, **kw) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": TEXTS[0]}], "max_tokens": 2, "temperature": 0}
    if model is not None:
        body["model"] = model
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60, **kw)


def scores(url: str, model: str | None) -> list[list[float]]:
    body = {"input": TEXTS} | ({"model": model} if model is not None else {})
    r = httpx.post(f"{url}/v1/classify", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return [[row["scores"][k] for k in sorted(row["scores"])] for row in r.json()["data"]]


def max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def model_ids(url: str) -> set[str]:
    r = httpx.get(f"{url}/v1/models", timeout=30)
    assert r.status_code == 200, r.text
    return {m["id"] for m in r.json()["data"]}


def load(url: str, name: str, path: Path | str, headers=None) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}, headers=headers, timeout=120
    )


def load_after_restart(url: str, name: str, path: Path | str, headers=None) -> httpx.Response:
    """`load`, retried while the registry is being (re)created: its 503 (`registry_unavailable`,
    `Retry-After`) is the right answer meanwhile, as a client retrying would see it; the first
    other answer within RECOVERY_S is returned."""
    return poll(
        lambda: (r := load(url, name, path, headers)).status_code != 503 and r,
        RECOVERY_S,
        f"the registry takes the load of {name}",
    )


def unload(url: str, name: str, headers=None) -> httpx.Response:
    return httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": name}, headers=headers, timeout=60)


def registry():
    import ray

    return ray.get_actor(REGISTRY, namespace=NAMESPACE)


def registry_pid() -> int | None:
    """The registry actor's worker pid while it is ALIVE (GCS actor table; no dashboard needed)."""
    import ray

    for row in ray._private.state.actors().values():
        if row.get("Name") == REGISTRY and row.get("State") == "ALIVE" and row.get("Pid"):
            return int(row["Pid"])
    return None


def registry_state() -> list[tuple[str, str, int]]:
    import ray

    return [(a.name, a.path, a.version) for a in ray.get(registry().list.remote(), timeout=30)]


def crash_registry() -> float:
    """What a crash is to Ray: kill the actor, letting Ray restart it; wait until it is back
    (a new process); the seconds that took."""
    import ray

    old = poll(registry_pid, 30, "registry actor alive")
    t0 = time.monotonic()
    ray.kill(registry(), no_restart=False)
    poll(lambda: (registry_pid() or old) != old, RESTART_S, "registry actor restarted by Ray")
    return time.monotonic() - t0


def all_serve(url: str, runtime: str | None = None) -> bool:
    """news-lora by name, model-less chat and classify (the default model), the runtime adapter:
    every one 200, and /v1/models (asked of the registry itself, no copy) lists them."""
    names = [ADAPTER, None] + ([runtime] if runtime else [])
    if any(chat(url, m).status_code != 200 for m in names):
        return False
    if httpx.post(f"{url}/v1/classify", json={"input": TEXTS[:1]}, timeout=120).status_code != 200:
        return False
    return {ADAPTER, *(names[2:])} <= model_ids(url)


# ----------------------------------------------------------------------------- safe defaults


def test_with_auth_off_and_no_admin_key_unload_is_refused_and_news_lora_still_serves(url, keys_file):
    """Acceptance: the shipped config (auth off, runtime loading on, no admin key) — an anonymous
    `POST /v1/unload_lora_adapter {"lora_name": "news-lora"}` was a 200 that took the default
    model away. Now the admin routes are off: a 403 OpenAI error saying how to turn them on,
    whatever key is sent, and news-lora (by name and as the default model) still serves.
    /health shows the public fields only."""
    set_admin_key(url, keys_file, False)
    for headers in (None, {"Authorization": "Bearer sk-anything"}, ADMIN):
        for r in (unload(url, ADAPTER, headers), load(url, "x-lora", LORA_DIR, headers)):
            assert r.status_code == 403, r.text
            err = r.json()["error"]
            assert set(err) >= {"message", "type", "param", "code"}
            assert (err["type"], err["code"]) == ("permission_error", "admin_routes_disabled")
            assert "LLM_SERVE_ADMIN_KEYS" in err["message"] and "role: admin" in err["message"]
    r = chat(url, None)
    assert r.status_code == 200 and r.json()["model"] == ADAPTER, r.text
    assert chat(url, ADAPTER).status_code == 200
    assert ADAPTER in model_ids(url) and "x-lora" not in model_ids(url)
    for headers in (None, {"Authorization": "Bearer sk-anything"}):
        h = httpx.get(f"{url}/health", headers=headers, timeout=30)
        assert h.status_code == 200 and set(h.json()) == {"status", "gpu", "limits"}, h.text


def test_an_admin_key_turns_the_admin_routes_on_for_that_key_only(url, keys_file):
    set_admin_key(url, keys_file, True)
    r = unload(url, ADAPTER)
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key", r.text
    r = unload(url, ADAPTER, {"Authorization": "Bearer sk-wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
    assert chat(url, None).status_code == 200  # client routes: still open without a key
    assert set(httpx.get(f"{url}/health", timeout=30).json()) == {"status", "gpu", "limits"}
    full = httpx.get(f"{url}/health", headers=ADMIN, timeout=30).json()
    assert {"replica", "deployments", "model"} <= set(full)


# ----------------------------------------------------------------------------- state across restarts


def test_adapters_survive_a_registry_restart(url, admin, roots):
    """Acceptance: after the registry actor is killed (Ray restarts it), news-lora and model-less
    requests answer 200 within a bounded deadline — and keep doing so once every ingress copy
    has been re-validated against the restarted actor; the runtime-loaded adapter survives too,
    with the same versions, and new versions continue above the old ones."""
    assert load(url, "copy-lora", roots / "copy", admin).status_code == 200
    poll(lambda: all_serve(url, "copy-lora"), RECOVERY_S, "every adapter serves before the fault")
    before = registry_state()
    assert {n for n, _, _ in before} >= {ADAPTER, "copy-lora"}

    restart_s = crash_registry()
    t_back = time.monotonic()
    recovered_s = poll(
        lambda: all_serve(url, "copy-lora") and time.monotonic() - t_back,
        RECOVERY_S,
        "news-lora, model-less and copy-lora answer 200 after the restart",
    )
    print(f"\n    registry restarted in {restart_s:.1f} s; full service {recovered_s:.1f} s after")
    # the copies are re-validated after CACHE_S: keep asking past it — always 200
    t_end = time.monotonic() + 3 * CACHE_S
    while time.monotonic() < t_end:
        assert all_serve(url, "copy-lora"), "an adapter stopped serving once the copies were re-validated"
    assert registry_state() == before  # the same adapters, paths and versions
    r = load(url, "after-lora", roots / "copy", admin)
    assert r.status_code == 200, r.text
    after = dict((n, v) for n, _, v in registry_state())
    assert after["after-lora"] > max(v for _, _, v in before), "versions went backwards"
    assert unload(url, "after-lora", admin).status_code == 200
    assert unload(url, "copy-lora", admin).status_code == 200


def test_an_adapter_loaded_after_a_restart_gets_its_own_weights(url, admin, roots):
    """Acceptance: news-lora with lora_B zeroed — mathematically the base model — loaded under a
    new name after a registry restart scores exactly as the base model (it scored exactly as
    news-lora: the restarted registry handed out news-lora's version, which was the engine's
    LoRA id)."""
    base, news = scores(url, BASE), scores(url, ADAPTER)  # news-lora is in the engine now
    assert max_diff(base, news) > 0.05
    crash_registry()
    r = load_after_restart(url, "zero-lora", roots / "zero", admin)
    assert r.status_code == 200, r.text
    try:
        zero = scores(url, "zero-lora")
        print(
            f"\n    zero-lora: max |Δ| {max_diff(zero, base):.6f} vs the base model, "
            f"{max_diff(zero, news):.4f} vs news-lora"
        )
        assert max_diff(zero, base) <= 1e-5, "zero-lora is not the base model"
        assert max_diff(zero, news) > 0.05, "zero-lora scored with news-lora's weights"
        assert max_diff(scores(url, ADAPTER), news) <= 1e-5  # and news-lora is still itself
    finally:
        unload(url, "zero-lora", admin)


def test_engine_lora_ids_are_never_reused_even_when_registry_versions_are(url, admin, roots):
    """The engine's LoRA ids are the model replica's own: even a registry that starts over (its
    store gone, versions from 1 again) cannot make the engine serve an adapter with another's
    weights. The registry is replaced by a fresh one here, so its versions repeat news-lora's."""
    import ray

    base, news = scores(url, BASE), scores(url, ADAPTER)  # news-lora loaded in the engine
    news_version = dict((n, v) for n, _, v in registry_state())[ADAPTER]
    ray.kill(registry(), no_restart=True)
    poll(lambda: registry_pid() is None, 30, "registry gone")
    _kv_del()  # its stored state too: the next registry starts over
    try:
        for i in range(1, news_version):  # fill the versions below news-lora's, if any
            assert load_after_restart(url, f"filler-{i}", roots / "copy", admin).status_code == 200
        r = load_after_restart(url, "zero2-lora", roots / "zero", admin)
        assert r.status_code == 200, r.text
        assert dict((n, v) for n, _, v in registry_state())["zero2-lora"] == news_version  # the same version
        zero = scores(url, "zero2-lora")
        assert max_diff(zero, base) <= 1e-5 and max_diff(zero, news) > 0.05, "an engine LoRA id was reused"
    finally:
        for name in [f"filler-{i}" for i in range(1, news_version)] + ["zero2-lora"]:
            unload(url, name, admin)
        # the wiped registry lost the configured adapter too: put it back (the app's config path)
        r = load(url, ADAPTER, LORA_DIR, admin)
        assert r.status_code == 200, r.text
    assert max_diff(scores(url, ADAPTER), news) <= 1e-5


# ----------------------------------------------------------------------------- the hot path


def test_requests_do_not_ask_the_registry_each_time(url):
    """Model-less requests (the default model is an adapter) and requests naming an adapter are
    answered from each ingress replica's copy: at most one registry call per replica per
    `registry_cache_s` (plus a first), not one per request."""
    import ray

    assert chat(url, None).status_code == 200
    before = ray.get(registry().calls.remote(), timeout=30)
    n, t0 = 60, time.monotonic()
    for i in range(n):
        body = {"prompt": TEXTS[i % 3]} | ({"model": ADAPTER} if i % 2 else {})
        r = httpx.post(f"{url}/tokenize", json=body, timeout=30)
        assert r.status_code == 200, r.text
    elapsed = time.monotonic() - t0
    after = ray.get(registry().calls.remote(), timeout=30)
    made = sum(after.values()) - sum(before.values())
    allowed = 2 * (elapsed / CACHE_S + 2)  # two ingress replicas
    print(f"\n    {n} requests in {elapsed:.1f} s: {made} registry calls ({after})")
    assert made <= allowed and made < n / 2, f"{made} registry calls for {n} requests in {elapsed:.1f} s"


def test_an_unload_and_a_replacement_are_seen_by_every_ingress_replica_promptly(url, admin, roots):
    """A change made through one ingress replica reaches the other's copy within
    `registry_cache_s`: after an unload every request is a 404; after the name is loaded again
    with other weights, every request scores with the new ones (never the old)."""
    base, news = scores(url, BASE), scores(url, ADAPTER)
    assert load(url, "brief-lora", roots / "copy", admin).status_code == 200
    for _ in range(6):  # both replicas hold it in their copies
        assert chat(url, "brief-lora").status_code == 200
    assert unload(url, "brief-lora", admin).status_code == 200
    t_change = time.monotonic()
    seen = []
    while time.monotonic() - t_change < CACHE_S + 3:
        t = time.monotonic()
        seen.append((t - t_change, chat(url, "brief-lora").status_code))
    late = [s for dt, s in seen if dt > CACHE_S + 0.5]
    assert late and set(late) == {404}, seen
    assert {s for _, s in seen} <= {200, 404}, seen

    assert load(url, "brief-lora", roots / "zero", admin).status_code == 200
    t_change = time.monotonic()
    seen = []
    while time.monotonic() - t_change < CACHE_S + 4:
        t = time.monotonic()
        r = httpx.post(f"{url}/v1/classify", json={"model": "brief-lora", "input": TEXTS}, timeout=120)
        if r.status_code == 200:
            got = [[row["scores"][k] for k in sorted(row["scores"])] for row in r.json()["data"]]
            seen.append(
                (
                    t - t_change,
                    "base" if max_diff(got, base) <= 1e-5 else "news" if max_diff(got, news) <= 1e-5 else "other",
                )
            )
        else:
            assert r.status_code == 503 and r.headers.get("retry-after"), r.text  # adapter_changed
            seen.append((t - t_change, r.status_code))
    unload(url, "brief-lora", admin)
    late = [s for dt, s in seen if dt > CACHE_S + 0.5]
    assert late and set(late) == {"base"}, seen
    assert "other" not in {s for _, s in seen}, seen


# ----------------------------------------------------------------------------- a failing registry


def test_a_failing_registry_is_a_503_with_retry_after_never_a_500(url):
    """The registry actor keeps dying: requests that need it get a 503 OpenAI error with
    `Retry-After` (it was a 500: `RayActorError` re-raised on the second attempt); names an
    ingress copy holds keep serving meanwhile. When a working registry is back it has every
    adapter (its state is in the GCS: even a registry killed for good comes back whole)."""
    import ray

    class FailingRegistry:  # local: Ray pickles it by value (the test module is no package)
        """Stands in for the registry under its name: every call kills its process (Ray restarts
        it, and it dies again), as a registry that keeps crashing would."""

        def snapshot(self, *args):
            os._exit(1)

        def get(self, *args):
            os._exit(1)

        def list(self, *args):
            os._exit(1)

        def register(self, *args):
            os._exit(1)

        def unregister(self, *args):
            os._exit(1)

    assert chat(url, ADAPTER).status_code == 200
    before = registry_state()
    ray.kill(registry(), no_restart=True)
    poll(lambda: registry_pid() is None, 30, "registry gone")
    failing = (
        ray.remote(FailingRegistry)
        .options(name=REGISTRY, namespace=NAMESPACE, lifetime="detached", max_restarts=-1, num_cpus=0)
        .remote()
    )
    try:
        for request in (
            lambda: chat(url, "no-such-lora"),  # a name no copy holds: must ask
            lambda: httpx.get(f"{url}/v1/models", timeout=60),
        ):
            for _ in range(2):
                t0 = time.monotonic()
                r = request()
                assert time.monotonic() - t0 < 30, "no answer within 30 s"
                assert r.status_code == 503, r.text
                assert r.headers.get("retry-after", "").isdigit(), r.headers
                err = r.json()["error"]
                assert (err["type"], err["code"]) == ("service_unavailable_error", "registry_unavailable")
        for _ in range(4):  # from the copies (within their stale window), else a 503: never a 500
            r = chat(url, ADAPTER)
            assert r.status_code in (200, 503), r.text
    finally:
        ray.kill(failing, no_restart=True)
    poll(lambda: all_serve(url), RECOVERY_S, "service back with a working registry")
    assert registry_state() == before


# ----------------------------------------------------------------------------- the copy, in process


def _local_registry(latency_s: float = 0.01, cache_s: float = CACHE_S):
    """(`AdapterRegistry` over an in-process `AdapterRegistryActor` (no store), that actor): the
    client with a call latency and a switch (`down`) that makes every call fail as an
    unreachable registry does."""
    from deployments.adapters import AdapterRegistry, AdapterRegistryActor, registry_unavailable

    actor = AdapterRegistryActor()

    class Client(AdapterRegistry):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.down = False
            self.calls: list[str] = []

        async def _call(self, method, *args):
            import asyncio

            self.calls.append(method)
            await asyncio.sleep(latency_s)
            if self.down:
                raise registry_unavailable()
            return getattr(actor, method)(*args)

    return Client("local", cache_s=cache_s), actor


def _run(coro):
    import asyncio

    return asyncio.run(coro)


def test_the_copy_answers_hits_without_a_call_and_coalesces_refreshes():
    import asyncio

    client, actor = _local_registry(cache_s=30)
    actor.register("a", "/a")

    async def go():
        refs = await asyncio.gather(*(client.lookup("a") for _ in range(20)))  # cold: one fetch for all
        assert {r.path for r in refs} == {"/a"} and client.calls == ["snapshot"]
        for _ in range(50):  # warm: no call at all
            assert (await client.lookup("a")).path == "/a"
        assert client.calls == ["snapshot"]
        actor.register("b", "/b")  # through another replica: a miss is re-checked at once
        assert (await client.lookup("b")).path == "/b" and client.calls == ["snapshot"] * 2
        assert await client.lookup("nope") is None  # a definitive miss: asked, None
        assert client.calls == ["snapshot"] * 3
        await client.unregister("a")  # a change through this client: seen by the next lookup
        assert await client.lookup("a") is None

    _run(go())


def test_the_copy_is_revalidated_after_cache_s_and_serves_while_the_registry_is_down():
    client, actor = _local_registry(cache_s=0.2)
    actor.register("a", "/a")

    async def go():
        import asyncio

        assert (await client.lookup("a")).version == 1
        actor.unregister("a")  # through another replica
        actor.register("a", "/a2")
        assert (await client.lookup("a")).version == 1  # within cache_s: the copy
        await asyncio.sleep(0.25)
        assert (await client.lookup("a")).path == "/a2"  # re-validated: the replacement
        client.down = True
        await asyncio.sleep(0.25)
        assert (await client.lookup("a")).path == "/a2"  # unreachable: the copy, for stale_s
        from deployments.api.errors import APIError

        try:
            await client.lookup("other")  # a name the copy lacks: cannot know, 503
        except APIError as exc:
            assert exc.status == 503 and exc.headers["Retry-After"] == "1"
        else:
            raise AssertionError("a miss while the registry is down must be a 503")
        client.stale_s = 0
        try:
            await client.lookup("a")
        except APIError as exc:
            assert exc.status == 503
        else:
            raise AssertionError("past stale_s the copy is no answer")

    _run(go())


def test_versions_and_lineage_across_a_restart_of_the_actor_class():
    """The actor alone (no Ray): changes are written to the store before they are answered and
    read back by a new instance; a changed lineage makes clients drop their copies."""
    from deployments import adapters

    store: dict = {}

    class Stored(adapters.AdapterRegistryActor):
        def _load(self):
            return json.loads(store["s"]) if "s" in store else None

        def _save(self, refs, version):
            store["s"] = json.dumps(
                {
                    "lineage": self._lineage,
                    "version": version,
                    "adapters": {a.name: [a.path, a.version] for a in refs.values()},
                }
            )

    first = Stored("k")
    first.register("a", "/a")
    first.register("b", "/b")
    first.unregister("b")
    stamp = first.snapshot()[0]
    again = Stored("k")  # a restart: the constructor runs again
    assert again.list() == first.list() and again.snapshot()[0] == stamp
    assert again.snapshot(stamp)[1] is None  # a current copy: "unchanged"
    assert again.register("c", "/c").version > max(stamp[1], 2)
    store.clear()
    assert Stored("k").snapshot()[0][0] != stamp[0]  # a store that is gone: a new lineage
