"""Real responses of the running service against OpenAI's published document
(`../shared/openai/openapi.json`, via `openai_schema.py`): chat and text completions (JSON and
every SSE chunk, the usage chunk included; with and without logprobs, n > 1), /v1/models and
error bodies. The first tests check the validator itself on hand-written documents, so the
service tests cannot pass vacuously."""

from __future__ import annotations

import json

import httpx
import pytest
from openai_schema import DOCUMENT, assert_valid, load_document, schema_errors, validator

MODEL = "tiny-qwen3"
MESSAGES = [
    {"role": "system", "content": "你是新闻分类助手。"},
    {"role": "user", "content": "央行宣布降息25个基点"},
]
PROMPT = "新闻标题：央行宣布降息"

# ============================================================================ the validator


def _chat_ok() -> dict:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hi", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }


def test_validator_resolves_refs_and_is_not_vacuous():
    """Every schema the service is held to rejects an empty object and a wrong `object`; a
    name the document lacks is an error, not a pass."""
    for name in (
        "CreateChatCompletionResponse",
        "CreateChatCompletionStreamResponse",
        "CreateCompletionResponse",
        "CreateCompletionStreamResponse",
        "ListModelsResponse",
        "Model",
        "ErrorResponse",
    ):
        assert schema_errors(name, {}), name
        assert schema_errors(name, []), name
    # `Model` has no "type": "object" in the document (an erratum patched in openai_schema.py)
    assert schema_errors("ListModelsResponse", {"object": "list", "data": [[]]})
    with pytest.raises(KeyError):
        validator("NoSuchSchema")
    assert schema_errors("CreateChatCompletionResponse", _chat_ok()) == []


@pytest.mark.parametrize(
    "mutate, where",
    [
        (lambda d: d["choices"][0]["message"].pop("refusal"), "'refusal' is a required property"),
        (lambda d: d["choices"][0].pop("logprobs"), "'logprobs' is a required property"),
        (lambda d: d["choices"][0].update(finish_reason=None), "$.choices[0].finish_reason"),
        (lambda d: d["choices"][0].update(finish_reason="eos"), "$.choices[0].finish_reason"),
        (lambda d: d.update(object="chat.completion.chunk"), "$.object"),
        (lambda d: d.update(created="2024-01-01"), "$.created"),
        (lambda d: d["usage"].pop("total_tokens"), "'total_tokens' is a required property"),
        (lambda d: d["usage"].update(prompt_tokens=1.5), "$.usage.prompt_tokens"),
        (lambda d: d["choices"][0]["message"].update(role="user"), "$.choices[0].message.role"),
        # through two $refs: logprobs → ChatCompletionTokenLogprob
        (
            lambda d: d["choices"][0].update(logprobs={"content": [{"token": "a", "logprob": -1.0}], "refusal": None}),
            "$.choices[0].logprobs",
        ),
    ],
)
def test_validator_catches_a_bad_chat_completion(mutate, where):
    doc = _chat_ok()
    mutate(doc)
    problems = schema_errors("CreateChatCompletionResponse", doc)
    assert any(where in p for p in problems), problems
    with pytest.raises(AssertionError, match="does not match OpenAI's CreateChatCompletionResponse"):
        assert_valid("CreateChatCompletionResponse", doc)


def test_validator_nullable_and_stream_erratum():
    """`nullable: true` (OpenAPI 3.0, still in the document) admits null and nothing more;
    a completions stream chunk may carry finish_reason null, a whole completion may not."""
    raw = json.loads(DOCUMENT.read_text())
    chunk_choice = raw["components"]["schemas"]["CreateChatCompletionStreamResponse"]["properties"]["choices"]
    assert chunk_choice["items"]["properties"]["logprobs"].get("nullable") is True  # the quirk exists
    assert "nullable" not in json.dumps(load_document()["components"]["schemas"]["CreateChatCompletionStreamResponse"])
    chunk = {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "usage": None,
        "choices": [{"index": 0, "delta": {"content": "x"}, "logprobs": None, "finish_reason": None}],
    }
    assert schema_errors("CreateChatCompletionStreamResponse", chunk) == []
    chunk["choices"][0]["logprobs"] = "bad"
    chunk["choices"][0]["finish_reason"] = "eos"
    assert len(schema_errors("CreateChatCompletionStreamResponse", chunk)) == 2
    text = {
        "id": "c",
        "object": "text_completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "text": "x", "logprobs": None, "finish_reason": None}],
    }
    assert schema_errors("CreateCompletionStreamResponse", text) == []
    assert schema_errors("CreateCompletionResponse", text)
    text["choices"][0]["finish_reason"] = "eos"
    assert schema_errors("CreateCompletionStreamResponse", text)


def test_validator_error_object():
    ok = {"error": {"message": "m", "type": "invalid_request_error", "param": None, "code": None}}
    assert schema_errors("ErrorResponse", ok) == []
    assert schema_errors("ErrorResponse", {"error": "Rate limit exceeded"})  # the old service's shape
    assert schema_errors("ErrorResponse", {"error": {"message": "m", "type": "t"}})  # param, code required
    assert schema_errors("ErrorResponse", {"error": {**ok["error"], "code": 400}})  # code: string or null


# ============================================================================ the service


def _post(base_url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{base_url}{path}", json=body, timeout=120)


def _events(base_url: str, path: str, body: dict) -> list[dict]:
    """Every SSE `data:` object of a streamed response (up to, not including, [DONE])."""
    with httpx.stream("POST", f"{base_url}{path}", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        lines = [line for line in r.iter_lines() if line]
    assert lines and lines[-1] == "data: [DONE]", lines[-3:]
    assert all(line.startswith("data: ") for line in lines), lines
    return [json.loads(line[len("data: ") :]) for line in lines[:-1]]


CHAT_VARIANTS = {
    "plain": {},
    "logprobs": {"logprobs": True, "top_logprobs": 2},
    "n2": {"n": 2, "temperature": 1.0, "seed": 7},
}
COMPLETION_VARIANTS = {
    "plain": {},
    "logprobs": {"logprobs": 2},
    "echo": {"echo": True},
    "n2": {"n": 2, "temperature": 1.0, "seed": 7},
}


@pytest.mark.parametrize("variant", CHAT_VARIANTS)
def test_chat_completion_matches_schema(base_url, variant):
    r = _post(
        base_url,
        "/v1/chat/completions",
        {"model": MODEL, "messages": MESSAGES, "max_tokens": 6, **CHAT_VARIANTS[variant]},
    )
    assert r.status_code == 200, r.text
    assert_valid("CreateChatCompletionResponse", r.json(), f"chat completion ({variant})")


@pytest.mark.parametrize("variant", CHAT_VARIANTS)
def test_chat_stream_chunks_match_schema(base_url, variant):
    chunks = _events(
        base_url,
        "/v1/chat/completions",
        {
            "model": MODEL,
            "messages": MESSAGES,
            "max_tokens": 6,
            "stream": True,
            "stream_options": {"include_usage": True},
            **CHAT_VARIANTS[variant],
        },
    )
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]  # the usage chunk is checked too
    for i, chunk in enumerate(chunks):
        assert_valid("CreateChatCompletionStreamResponse", chunk, f"chat stream chunk {i} ({variant})")


def test_chat_stream_continuous_usage_matches_schema(base_url):
    chunks = _events(
        base_url,
        "/v1/chat/completions",
        {
            "model": MODEL,
            "messages": MESSAGES,
            "max_tokens": 4,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        },
    )
    for i, chunk in enumerate(chunks):
        assert_valid("CreateChatCompletionStreamResponse", chunk, f"chat stream chunk {i} (continuous usage)")


@pytest.mark.parametrize("variant", COMPLETION_VARIANTS)
def test_completion_matches_schema(base_url, variant):
    r = _post(
        base_url, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 6, **COMPLETION_VARIANTS[variant]}
    )
    assert r.status_code == 200, r.text
    assert_valid("CreateCompletionResponse", r.json(), f"completion ({variant})")


@pytest.mark.parametrize("variant", COMPLETION_VARIANTS)
def test_completion_stream_chunks_match_schema(base_url, variant):
    chunks = _events(
        base_url,
        "/v1/completions",
        {
            "model": MODEL,
            "prompt": PROMPT,
            "max_tokens": 6,
            "stream": True,
            "stream_options": {"include_usage": True},
            **COMPLETION_VARIANTS[variant],
        },
    )
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]
    finals = [c for chunk in chunks for c in chunk["choices"] if c["finish_reason"] is not None]
    assert finals, "no chunk carried a finish_reason"
    for i, chunk in enumerate(chunks):
        assert_valid("CreateCompletionStreamResponse", chunk, f"completion stream chunk {i} ({variant})")


def test_models_match_schema(base_url):
    r = httpx.get(f"{base_url}/v1/models", timeout=30)
    assert r.status_code == 200, r.text
    assert_valid("ListModelsResponse", r.json(), "/v1/models")
    assert r.json()["data"], "no models listed"
    one = httpx.get(f"{base_url}/v1/models/{MODEL}", timeout=30)
    assert one.status_code == 200, one.text
    assert_valid("Model", one.json(), f"/v1/models/{MODEL}")


@pytest.mark.parametrize(
    "method, path, body, status",
    [
        ("POST", "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "temperature": 9}, 400),
        ("POST", "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "no_such_field": 1}, 400),
        ("POST", "/v1/chat/completions", {"model": MODEL, "messages": []}, 400),
        ("POST", "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 100000}, 400),
        ("POST", "/v1/chat/completions", "not json", 400),
        ("POST", "/v1/chat/completions", {"model": "no-such-model", "messages": MESSAGES}, 404),
        ("POST", "/v1/completions", {"model": "no-such-model", "prompt": PROMPT}, 404),
        ("GET", "/v1/models/no-such-model", None, 404),
        ("GET", "/v1/no-such-route", None, 404),
    ],
)
def test_errors_match_schema(base_url, method, path, body, status):
    kwargs = {"content": body} if isinstance(body, str) else {"json": body} if body is not None else {}
    r = httpx.request(method, f"{base_url}{path}", timeout=60, headers={"content-type": "application/json"}, **kwargs)
    assert r.status_code == status, r.text
    assert_valid("ErrorResponse", r.json(), f"{method} {path} → {status}")
