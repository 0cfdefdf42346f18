"""Shared fixtures: one local Ray cluster and one Serve app (real vLLM CPU engine, embedded
tiny model) for the whole session; every Ray process started here is stopped at the end."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO / "models" / "tiny-qwen3"
LORA_DIR = REPO / "models" / "tiny-qwen3-lora"

# Tests talk to loopback only; no token auth needed for the throwaway local cluster.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_args(**overrides: Any) -> dict[str, Any]:
    """The ServiceConfig the session app runs (the README defaults, model built by setup)."""
    from deployments.config import deep_merge

    base = {
        "model": {"model_id": "tiny-qwen3", "model_source": str(MODEL_DIR)},
        "lora": {"adapters": {"news-lora": str(LORA_DIR)}},
        "classification": {"model": "news-lora"},  # as configs/serve_config.yaml
        "engine": {"max_model_len": 1024, "cpu_kvcache_space_gib": 1},
        # The shared app serves hundreds of test requests from one address; the limiter has
        # its own app in test_admission.py.
        "rate_limit": {"enabled": False},
        "deployments": {
            "model": {"max_ongoing_requests": 3, "max_queued_requests": 10},
            "tokenizer": {"ray_actor_options": {"num_cpus": 0.1}},
            "ingress": {"ray_actor_options": {"num_cpus": 0.1}},
        },
    }
    return deep_merge(base, overrides)


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


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    if not MODEL_DIR.is_dir():
        pytest.fail("embedded model missing: run scripts/setup.sh (make test does)")
    import ray

    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "VLLM_NO_USAGE_STATS": "1"}})
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
def base_url(http_port) -> str:
    """The default app (README config) deployed once for the session."""
    from ray import serve

    from serve_app import build_app

    serve.run(build_app(app_args()), name="llm", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{http_port}"
    wait_healthy(url)
    return url


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
    cmd = [sys.executable, str(REPO / "scripts" / "train_lora.py"), "--base", str(MODEL_DIR), "--out", str(out),
           "--preset", "tiny", "--r", "8", "--alpha", "16", "--max-steps", "4", "--limit", "48", "--batch-size", "8",
           "--lr", "5e-2", "--threads", "1", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out
