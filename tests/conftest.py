"""Shared fixtures: one local Ray cluster and one Serve app (real vLLM CPU engine, embedded
tiny model) for the whole session; every Ray process started here is stopped at the end."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from cluster.processes import HOST, ManagedProcess, free_port

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO / "models" / "tiny-qwen3"
LORA_DIR = REPO / "models" / "tiny-qwen3-lora"
VLLM_STARTUP_TIMEOUT_S = 240
# The admin key of the apps `app_args` builds (auth.admin_env_var, in the ingress's environment):
# the admin routes and /health's details need one, with auth off too.
ADMIN_KEY = "sk-test-admin-key-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}

# Tests talk to loopback only; no token auth needed for the throwaway local cluster.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")


def app_args(**overrides: Any) -> dict[str, Any]:
    """The ServiceConfig the session app runs: the `args` of configs/serve_config.yaml (the
    shipped model and adapter, the pydantic defaults) with what the tests change, then `overrides`."""
    import yaml

    from deployments.config import deep_merge

    doc = yaml.safe_load((REPO / "configs" / "serve_config.yaml").read_text())
    shipped = next(app for app in doc["applications"] if app["name"] == "llm")["args"]
    tests = {
        "engine": {"enable_prefix_caching": None},  # None deletes the key: vLLM's default
        # Requests without `model` go to the base model here (the tests name the adapter when
        # they want it); tests/test_openai_fidelity.py checks the shipped default.
        "model": {"default_model": None},
        # The shared app serves hundreds of test requests from one address; the limiter has
        # its own app in test_admission.py.
        "rate_limit": {"enabled": False},
        # Tests poll /health for the engine's state as it is now (vLLM's unfinished requests
        # after an abort, a dead engine): every call checks (still one check for concurrent
        # calls, off the event loop). test_control_plane_state.py tests the cache.
        "health": {"cache_s": 0},
        # One replica each (the class defaults) on the small local cluster: no autoscaling.
        "deployments": {
            "model": {"autoscaling_config": None},
            "tokenizer": {"autoscaling_config": None, "ray_actor_options": {"num_cpus": 0.1}},
            "ingress": {
                "autoscaling_config": None,
                "ray_actor_options": {
                    "num_cpus": 0.1,
                    "runtime_env": {"env_vars": {"LLM_SERVE_ADMIN_KEYS": ADMIN_KEY}},
                },
            },
        },
    }
    return deep_merge(deep_merge(shipped, tests), overrides)


def wait_healthy(base_url: str, timeout_s: float = 180.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{base_url}/health", timeout=10)
            last = r.text
            if r.status_code == 200:
                return r.json()
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(1)
    raise TimeoutError(f"service at {base_url} not healthy after {timeout_s}s: {last}")


def delete_app(name: str) -> None:
    """Ask Serve to delete a test's own app and go on: its replicas stop while the next test
    runs (a blocking delete waits ~5 s, one `graceful_shutdown_wait_loop_s` per shutdown tier).
    The session's `serve.shutdown()` waits for whatever is still stopping."""
    from ray import serve

    serve.delete(name, _blocking=False)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    if not MODEL_DIR.is_dir():
        pytest.fail("embedded model missing: run scripts/setup.sh (make test does)")
    import ray

    ray.init(
        address="local",
        num_cpus=8,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "VLLM_NO_USAGE_STATS": "1"}},
    )
    try:
        yield
    finally:
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()


@pytest.fixture(scope="session")
def http_port(ray_cluster) -> int:
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port


@pytest.fixture(scope="session")
def base_url(http_port, tmp_path_factory) -> str:
    """The default app (README config) deployed once for the session. Runtime LoRA loads may
    also read from pytest's temporary folder (adapters the tests write: `trained_adapter`)."""
    from ray import serve

    from serve_app import build_app

    roots = {"lora": {"adapter_roots": ["models", str(tmp_path_factory.getbasetemp())]}}
    serve.run(build_app(app_args(**roots)), name="llm", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{http_port}"
    wait_healthy(url)
    return url


# Own apps shared by several modules (fixture → Serve app name): deployed by the first user,
# deleted after the last (`pytest_runtest_teardown`); their users run next to each other.
SHARED_APPS = {"limited_app": "limited", "faults_app": "faults"}
_DEPLOYED: set[str] = set()


def _deploy_shared(app: str, args: dict[str, Any], http_port: int) -> str:
    """Deploy shared app `app` at /`app` and wait until it is healthy; its URL."""
    from ray import serve

    from serve_app import build_app

    serve.run(build_app(args), name=app, route_prefix=f"/{app}", blocking=False)
    _DEPLOYED.add(app)
    url = f"http://127.0.0.1:{http_port}/{app}"
    wait_healthy(url)
    return url


def _delete_shared(app: str) -> None:
    """Delete shared app `app` (without waiting) and its detached limiter and stats actors,
    which would outlive it."""
    from deployments.actors import kill_actor

    _DEPLOYED.discard(app)
    delete_app(app)
    for actor in (f"rate_limiter.{app}", f"service_stats.{app}"):
        kill_actor(actor)


@pytest.fixture(scope="session")
def limited_app(http_port) -> str:
    """A second app on the session cluster (its own model replica) for what the session app
    leaves off: a rate limit of 10 requests a minute per client address with auth off, behind
    Serve's Python proxy (tests/test_python_proxy_address.py), and Qwen3's reasoning parser
    (tests/test_tools.py; the shipped config leaves it off: the classifier answers without
    thinking). `RATE_LIMIT_PER_MINUTE` in the ingress replica's own environment is ignored (the
    limits are read where the app is built, tests/test_config_applied.py)."""
    replica_env = {"runtime_env": {"env_vars": {"RATE_LIMIT_PER_MINUTE": "1000"}}}
    args = app_args(
        rate_limit={"enabled": True, "per_minute": 10, "per_hour": 0},
        auth={"enabled": False},
        model={"reasoning_parser": "qwen3"},
        deployments={"ingress": {"ray_actor_options": replica_env}},
    )
    return _deploy_shared("limited", args, http_port)


# The faults app: what tests/test_control_plane_state.py and tests/test_faults.py kill.
FAULTS_LONG = 2000  # max_tokens of a "long" generation (its cap)
# its limits.request_timeout_s, twice the shipped 120 s: tests/test_redeploy.py's requests wait for
# the new engine within it (a loaded CI machine has taken 158 s to start a replica)
FAULTS_TIMEOUT_S = 240
# its rate_limit.timeout_s: fail-closed (an outage is a visible 503), with a deadline a 2-core
# machine starved by an engine start or a redeploy still meets (1 s was missed twice on CI:
# tests/test_faults.py, tests/test_redeploy.py); the shipped default is 2 s
FAULTS_LIMITER_TIMEOUT_S = 5.0


def faults_args(**overrides: Any) -> dict[str, Any]:
    """The faults app's ServiceConfig (`faults_app`), then `overrides` (tests/test_redeploy.py
    deploys it again with a changed config, as its last user)."""
    args = app_args(
        model={"default_model": "news-lora"},
        engine={"max_model_len": 2048},
        limits={"max_tokens_cap": FAULTS_LONG, "request_timeout_s": FAULTS_TIMEOUT_S},
        rate_limit={
            "enabled": True,
            "per_minute": 100_000,
            "per_hour": 0,
            "fail_open": False,
            "timeout_s": FAULTS_LIMITER_TIMEOUT_S,
        },
        health={"cache_s": 2.0},
        deployments={"model": {"health_check_period_s": 2, "health_check_timeout_s": 10}},
    )
    from deployments.config import deep_merge

    return deep_merge(args, overrides)


@pytest.fixture(scope="session")
def faults_app(http_port) -> str:
    """An own app on the session cluster for the tests that kill its parts: the tokenizer
    replica, the limiter and stats actors, the adapter registry's entries
    (tests/test_control_plane_state.py), the model replica and its engine process
    (tests/test_faults.py); its last user, tests/test_redeploy.py, deploys it again with a
    changed config under load (one engine start fewer than an app of its own). As shipped,
    model-less requests go to news-lora; the limiter fails closed (an outage is a 503, visible)
    with a 5-s call timeout and a budget no test reaches; /health is cached 2 s as by default
    (conftest's other apps check on every call). Long generations: max_model_len 2048 and a
    2000-token cap, so a `max_tokens: 2000, ignore_eos` request runs for many seconds; Serve
    checks the model replica every 2 s (10 s by default)."""
    return _deploy_shared("faults", faults_args(), http_port)


@pytest.fixture(scope="session")
def client(base_url):
    from openai import OpenAI

    return OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def hf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="session")
def trained_adapter(tmp_path_factory) -> Path:
    """An adapter written by scripts/train_lora.py: a few steps on a small TNEWS slice."""
    if not MODEL_DIR.is_dir():
        pytest.fail("embedded model missing: run scripts/setup.sh (make test does)")
    out = tmp_path_factory.mktemp("lora") / "adapter"
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "train_lora.py"),
        "--base",
        str(MODEL_DIR),
        "--out",
        str(out),
        "--preset",
        "tiny",
        "--r",
        "8",
        "--alpha",
        "16",
        "--max-steps",
        "4",
        "--limit",
        "48",
        "--batch-size",
        "8",
        "--lr",
        "5e-2",
        "--threads",
        "1",
        "--no-progress",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


# ----------------------------------------------------------------------------- vLLM's server


@dataclass
class VllmServer:
    url: str
    argv: list[str]
    env: dict[str, str]


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory) -> Any:
    """vLLM's OpenAI server with exactly the session app's engine arguments and engine env."""
    from deployments.config import ServiceConfig
    from deployments.engine import server_flags
    from scripts.bench.servers import engine_kwargs_for, vllm_cli_args

    if not MODEL_DIR.is_dir():
        pytest.fail("embedded model missing: run scripts/setup.sh (make test does)")
    args = app_args()
    kwargs, engine_env = engine_kwargs_for(args, on_cpu=True)
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--host",
        HOST,
        "--port",
        str(port),
        *vllm_cli_args(kwargs),
        *server_flags(ServiceConfig.model_validate(args)),
    ]
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(engine_env)
    env.update(
        {
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "PYTHONUNBUFFERED": "1",
            "LLM_TEST_VLLM_SERVER": uuid.uuid4().hex,
        }
    )  # finds its processes at the end
    log = tmp_path_factory.mktemp("vllm_server") / "vllm_server.log"
    proc = ManagedProcess("vllm-server", argv, env, log, cwd=REPO, marker_env="LLM_TEST_VLLM_SERVER")
    try:
        url = f"http://{HOST}:{port}"
        try:
            proc.wait_http(url + "/health", VLLM_STARTUP_TIMEOUT_S)
        except (TimeoutError, RuntimeError) as exc:
            pytest.fail(f"vLLM's server did not start: {exc}\n{proc.log_tail(60)}")
        yield VllmServer(url, argv, {k: env[k] for k in engine_env})
    finally:
        proc.stop(grace_s=30)


# ----------------------------------------------------------------------------- layers

# Every test is in exactly one layer (`pytest -m unit`, `-m app`, `-m e2e`):
# - unit: no Ray cluster (pure logic, the ASGI app in-process, fake engines, files, manifests);
# - app: the session's Ray cluster and Serve app (one real vLLM engine), or vLLM's own server;
# - e2e: deploys its own app, starts its own cluster or processes (make run, HAProxy, Prometheus,
#   the batch job, multi-node clusters) or kills parts of the service.
# The layer follows from what a test uses: the fixtures below, or its module in E2E_MODULES.
APP_FIXTURES = {"ray_cluster", "http_port", "base_url", "client", "vllm_server"}
E2E_MODULES = {
    "test_adapter_state",
    "test_admission",
    "test_autoscaling",
    "test_chaos",
    "test_classify_batch",
    "test_fairness",
    "test_fast_path",
    "test_faults",
    "test_fuzz",
    "test_onebox",
    "test_redeploy",
    "test_run_launcher",
    "test_soak",
}
LAYERS = ("unit", "app", "e2e")


def layer_of(item: pytest.Item) -> str:
    module = item.module.__name__ if getattr(item, "module", None) is not None else ""
    if module.rsplit(".", 1)[-1] in E2E_MODULES or set(SHARED_APPS) & set(getattr(item, "fixturenames", ())):
        return "e2e"
    if APP_FIXTURES & set(getattr(item, "fixturenames", ())):
        return "app"
    return "unit"


# `scripts/test.sh` runs two pytest-xdist workers: every module with a test on the session's Ray
# cluster (its app, the trained adapter, vLLM's own server) runs on one worker, in file order
# (one cluster, one session app); every other module is a unit of its own for the other worker
# (its module fixtures start once). The controller sees node ids only, so the modules are named
# here; collection fails if a test uses the session's fixtures outside them.
SESSION_FIXTURES = {"ray_cluster", "trained_adapter", "vllm_server"}
SESSION_MODULES = {
    "test_adapter_state",
    "test_admission",
    "test_api",
    "test_backpressure",
    "test_bad_input",
    "test_benchmark",
    "test_control_plane_state",
    "test_control_tokens",
    "test_engine_metrics",
    "test_fairness",
    "test_faults",
    "test_fuzz",
    "test_legacy_clients",
    "test_lora_classify",
    "test_openai_fidelity",
    "test_openai_schema",
    "test_python_proxy_address",
    "test_redeploy",
    "test_responses_api",
    "test_soak",
    "test_stream_abandoned",
    "test_tokenize",
    "test_tools",
    "test_training",
    "test_vllm_differential",
}


def _module_of(nodeid: str) -> str:
    return Path(nodeid.split("::", 1)[0]).stem


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    from xdist.scheduler import LoadScopeScheduling

    class SessionClusterOnOneWorker(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = _module_of(nodeid)
            return "session-cluster" if module in SESSION_MODULES else module

    return SessionClusterOnOneWorker(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if not any(item.get_closest_marker(layer) for layer in LAYERS):
            item.add_marker(getattr(pytest.mark, layer_of(item)))
        if SESSION_FIXTURES & set(getattr(item, "fixturenames", ())) and _module_of(item.nodeid) not in SESSION_MODULES:
            raise pytest.UsageError(
                f"{item.nodeid} uses the session cluster: add its module to conftest.SESSION_MODULES"
            )
    # the users of a shared app run one after the other, where the first of them stood; a module
    # that deploys the app again with another config (`REDEPLOYS = "<fixture>"`) runs last
    for name in SHARED_APPS:
        users = [it for it in items if name in getattr(it, "fixturenames", ())]
        if len(users) > 1:
            first = items.index(users[0])
            users.sort(key=lambda it: getattr(getattr(it, "module", None), "REDEPLOYS", None) == name)
            rest = [it for it in items[first:] if it not in users]
            items[first:] = users + rest


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """A shared app goes once its last user has run (not at the session's end), after that
    test's own fixtures are torn down (they may still ask the app). After the session's last
    test the session's fixtures are torn down too: Serve and Ray are gone, and the apps with them."""
    if nextitem is None:
        _DEPLOYED.clear()
        return
    for name, app in SHARED_APPS.items():
        uses = name in getattr(item, "fixturenames", ())
        if uses and name not in getattr(nextitem, "fixturenames", ()):
            if app in _DEPLOYED:
                _delete_shared(app)
