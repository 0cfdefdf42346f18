"""Bad input: the right 4xx with an OpenAI error object, and the service keeps serving."""

from __future__ import annotations

import httpx
import pytest

MODEL = "tiny-qwen3"
OK_MSG = [{"role": "user", "content": "你好"}]


def post(base_url: str, path: str, **kw) -> httpx.Response:
    return httpx.post(f"{base_url}{path}", timeout=60, **kw)


def assert_openai_error(r: httpx.Response, status: int, param: str | None = "__any__", code=None):
    assert r.status_code == status, r.text
    body = r.json()
    err = body["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if param != "__any__":
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


CHAT_CASES = [
    ("malformed json", {"content": b"{not json"}, 400, None),
    ("empty body", {"content": b""}, 400, None),
    ("json array", {"json": [1, 2]}, 400, "__any__"),
    ("missing messages", {"json": {"model": MODEL}}, 400, "messages"),
    ("empty messages", {"json": {"model": MODEL, "messages": []}}, 400, "messages"),
    ("messages wrong type", {"json": {"model": MODEL, "messages": "hi"}}, 400, "messages"),
    ("bad role", {"json": {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}}, 400, "__any__"),
    ("content wrong type", {"json": {"model": MODEL, "messages": [{"role": "user", "content": 5}]}}, 400, "__any__"),
    ("negative max_tokens", {"json": {"model": MODEL, "messages": OK_MSG, "max_tokens": -1}}, 400, "max_tokens"),
    ("zero max_tokens", {"json": {"model": MODEL, "messages": OK_MSG, "max_tokens": 0}}, 400, "max_tokens"),
    ("huge max_tokens", {"json": {"model": MODEL, "messages": OK_MSG, "max_tokens": 10**9}}, 400, "max_tokens"),
    ("max_tokens string", {"json": {"model": MODEL, "messages": OK_MSG, "max_tokens": "many"}}, 400, "max_tokens"),
    ("temperature high", {"json": {"model": MODEL, "messages": OK_MSG, "temperature": 5}}, 400, "temperature"),
    ("temperature negative", {"json": {"model": MODEL, "messages": OK_MSG, "temperature": -0.1}}, 400, "temperature"),
    ("top_p zero", {"json": {"model": MODEL, "messages": OK_MSG, "top_p": 0}}, 400, "top_p"),
    ("n over the cap", {"json": {"model": MODEL, "messages": OK_MSG, "n": 5}}, 400, "n"),
    ("stream wrong type", {"json": {"model": MODEL, "messages": OK_MSG, "stream": "yes please"}}, 400, "stream"),
    (
        "nan temperature",
        {"content": b'{"model": "tiny-qwen3", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}'},
        400,
        "temperature",
    ),
    ("too many stops", {"json": {"model": MODEL, "messages": OK_MSG, "stop": list("abcdefghij")}}, 400, "stop"),
    (
        "min_tokens over max",
        {"json": {"model": MODEL, "messages": OK_MSG, "max_tokens": 2, "min_tokens": 5}},
        400,
        "min_tokens",
    ),
    # beyond 64 bits an integer cannot reach the engine core (msgpack): found by the fuzz test
    ("top_k beyond int64", {"json": {"model": MODEL, "messages": OK_MSG, "top_k": 2**70}}, 400, "top_k"),
    (
        "stop_token_ids beyond int64",
        {"json": {"model": MODEL, "messages": OK_MSG, "stop_token_ids": [2**70]}},
        400,
        "__any__",
    ),
    ("negative stop_token_id", {"json": {"model": MODEL, "messages": OK_MSG, "stop_token_ids": [-5]}}, 400, "__any__"),
]


@pytest.mark.parametrize("name,kw,status,param", CHAT_CASES, ids=[c[0] for c in CHAT_CASES])
def test_chat_bad_input(base_url, name, kw, status, param):
    headers = {"content-type": "application/json"}
    r = post(base_url, "/v1/chat/completions", headers=headers, **kw)
    assert_openai_error(r, status, param)


def test_unknown_model_is_404(base_url):
    r = post(base_url, "/v1/chat/completions", json={"model": "gpt-17", "messages": OK_MSG})
    assert_openai_error(r, 404, "model", "model_not_found")
    r = post(base_url, "/v1/completions", json={"model": "gpt-17", "prompt": "x"})
    assert_openai_error(r, 404, "model", "model_not_found")


def test_prompt_over_context_is_400(base_url):
    long_text = "央行宣布降息，" * 2000  # far more than 1024 tokens
    r = post(
        base_url,
        "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": long_text}], "max_tokens": 10},
    )
    err = assert_openai_error(r, 400, "messages", "context_length_exceeded")
    assert "maximum context length is 1024" in err["message"]
    r = post(base_url, "/v1/completions", json={"model": MODEL, "prompt": long_text, "max_tokens": 10})
    assert_openai_error(r, 400, "prompt", "context_length_exceeded")


def test_prompt_plus_max_tokens_over_context_is_400(base_url):
    # ~600 prompt tokens + 500 > 1024
    text = "体育" * 600
    r = post(base_url, "/v1/completions", json={"model": MODEL, "prompt": text, "max_tokens": 500})
    assert_openai_error(r, 400, "prompt", "context_length_exceeded")


def test_completion_bad_prompts(base_url):
    assert_openai_error(post(base_url, "/v1/completions", json={"model": MODEL, "prompt": ""}), 400, "prompt")
    assert_openai_error(post(base_url, "/v1/completions", json={"model": MODEL}), 400, "prompt")
    assert_openai_error(post(base_url, "/v1/completions", json={"model": MODEL, "prompt": [10**9]}), 400, "prompt")
    assert_openai_error(post(base_url, "/v1/completions", json={"model": MODEL, "prompt": ["a", "b"]}), 400, "prompt")


def test_unknown_route_and_method(base_url):
    r = httpx.get(f"{base_url}/v1/nope", timeout=10)
    assert_openai_error(r, 404)
    r = httpx.get(f"{base_url}/v1/chat/completions", timeout=10)
    assert_openai_error(r, 405)


def test_still_serving_after_bad_input(client):
    resp = client.chat.completions.create(model=MODEL, messages=OK_MSG, max_tokens=3)
    assert resp.choices[0].message.content is not None
    assert resp.usage.completion_tokens >= 1


def test_a_stalled_body_gets_a_408_and_the_connection_closes(base_url):
    """Headers and part of a body, then nothing (a slow or stalled client) on Serve's Python
    proxy path, which has no timeout of its own: the ingress answers 408 `request_timeout` after
    `limits.request_body_timeout_s` (10 s) and the connection is closed (the fast path's HAProxy
    defences: tests/test_fast_path.py). Then a normal request is served."""
    import json
    import socket
    import time
    from urllib.parse import urlparse

    u = urlparse(base_url)
    s = socket.create_connection((u.hostname, u.port), timeout=5)
    s.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"messages": ['
    )
    t0 = time.monotonic()
    s.settimeout(60)
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    finally:
        s.close()
    waited = time.monotonic() - t0
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.split(b"\r\n", 1)[0].split()[1] == b"408", data[:300]
    assert 8 <= waited <= 40, waited
    err = json.loads(body[body.index(b"{") : body.rindex(b"}") + 1])["error"]
    assert err["code"] == "request_timeout" and "10 s" in err["message"], err
    r = httpx.post(
        f"{base_url}/v1/chat/completions",
        timeout=60,
        json={"messages": [{"role": "user", "content": "体育新闻"}], "max_tokens": 1},
    )
    assert r.status_code == 200, r.text
