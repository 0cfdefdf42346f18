"""OpenAI's Responses API (`POST /v1/responses`) on the session app, served by the chat path.

What holds for any weights: the answer is the chat completion's for the same conversation (the
same prompt tokens, the same greedy text and usage), every response and stream event validates
against OpenAI's published document, the stream's events follow OpenAI's order and add up to the
final Response, forced tool calls are valid against the function's schema, bad input is a 4xx
naming the field (never a 5xx), and the official SDK (`responses.create`, `.stream`, `.parse`)
and the OpenAI Agents SDK work against it. `test_vllm_*` compare with vLLM's own server on the
same weights and list the deliberate differences (README "Calling it").
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from typing import Annotated, Any, Literal

import httpx
import jsonschema
import pytest
from openai_schema import assert_valid
from pydantic import BaseModel, Field

MODEL = "tiny-qwen3"
ADAPTER = "news-lora"
ALIAS = "qwen-news-classifier"  # → news-lora (configs/serve_config.yaml)
PATH = "/v1/responses"
TEXT = "央行宣布降息25个基点"
LABELS = ["news_finance", "news_sports", "news_tech"]
WEATHER = {
    "type": "object",
    "properties": {
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["unit", "days"],
    "additionalProperties": False,
}
NEWS = {
    "type": "object",
    "properties": {"label": {"type": "string", "enum": LABELS}},
    "required": ["label"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "name": "get_weather", "description": "天气", "parameters": WEATHER, "strict": True},
    {"type": "function", "name": "classify", "description": "新闻分类", "parameters": NEWS, "strict": True},
]
SCHEMAS = {"get_weather": WEATHER, "classify": NEWS}
CHAT_TOOLS = [{"type": "function", "function": {k: v for k, v in t.items() if k != "type"}} for t in TOOLS]
FORCED_MAX_TOKENS = 128  # bounded schemas in compact JSON: any forced call ends well before this
GREEDY = {"temperature": 0}

EVENT_SCHEMAS = {
    "response.created": "ResponseCreatedEvent",
    "response.in_progress": "ResponseInProgressEvent",
    "response.completed": "ResponseCompletedEvent",
    "response.incomplete": "ResponseIncompleteEvent",
    "response.failed": "ResponseFailedEvent",
    "error": "ResponseErrorEvent",
    "response.output_item.added": "ResponseOutputItemAddedEvent",
    "response.output_item.done": "ResponseOutputItemDoneEvent",
    "response.content_part.added": "ResponseContentPartAddedEvent",
    "response.content_part.done": "ResponseContentPartDoneEvent",
    "response.output_text.delta": "ResponseTextDeltaEvent",
    "response.output_text.done": "ResponseTextDoneEvent",
    "response.function_call_arguments.delta": "ResponseFunctionCallArgumentsDeltaEvent",
    "response.function_call_arguments.done": "ResponseFunctionCallArgumentsDoneEvent",
    "response.reasoning_text.delta": "ResponseReasoningTextDeltaEvent",
    "response.reasoning_text.done": "ResponseReasoningTextDoneEvent",
}
TERMINAL = {"response.completed", "response.incomplete", "response.failed"}


# ----------------------------------------------------------------------------- helpers


def post(base: str, body: Any, path: str = PATH) -> httpx.Response:
    return httpx.post(base + path, json=body, timeout=120)


def create(base: str, **body: Any) -> dict[str, Any]:
    """A non-streamed Response, validated against OpenAI's document."""
    r = post(base, body)
    assert r.status_code == 200, r.text
    resp = r.json()
    assert_valid("Response", resp, "Response")
    return resp


def chat(base: str, **body: Any) -> dict[str, Any]:
    r = post(base, body, "/v1/chat/completions")
    assert r.status_code == 200, r.text
    return r.json()


def parse_sse(raw: str) -> list[dict[str, Any]]:
    """Responses SSE: `event: <type>` + `data: <json>` blocks (no [DONE]), each validated against
    its own event schema and OpenAI's ResponseStreamEvent union."""
    events = []
    for block in raw.strip().split("\n\n"):
        lines = block.split("\n")
        assert len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: "), block
        event = json.loads(lines[1][len("data: ") :])
        assert lines[0][len("event: ") :] == event["type"], block
        assert event["type"] in EVENT_SCHEMAS, event["type"]
        assert_valid(EVENT_SCHEMAS[event["type"]], event, f"event {event['sequence_number']} {event['type']}")
        assert_valid("ResponseStreamEvent", event, f"event {event['sequence_number']}")
        events.append(event)
    return events


def stream(base: str, **body: Any) -> list[dict[str, Any]]:
    with httpx.stream("POST", base + PATH, json={**body, "stream": True}, timeout=120) as r:
        raw = r.read().decode()
        assert r.status_code == 200, raw
        assert r.headers["content-type"].startswith("text/event-stream")
    return parse_sse(raw)


def check_sequence(events: list[dict[str, Any]]) -> dict[str, Any]:
    """OpenAI's event order, item by item, and that the events add up to the final Response
    (returned): created, in_progress, per item added → parts and deltas → done, a terminal event."""
    types = [e["type"] for e in events]
    assert types[:2] == ["response.created", "response.in_progress"], types
    assert types[-1] in TERMINAL and not TERMINAL & set(types[:-1]), types
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    rid = events[0]["response"]["id"]
    assert rid.startswith("resp_") and all(e["response"]["id"] == rid for e in events if "response" in e)
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    done_items: list[dict[str, Any]] = []
    i = 2
    while events[i]["type"] == "response.output_item.added":
        added = events[i]
        index, item = added["output_index"], added["item"]
        assert index == len(done_items) and item["status"] == "in_progress", added
        i += 1
        where = {"item_id": item["id"], "output_index": index}
        if item["type"] in ("message", "reasoning"):
            kind = "output_text" if item["type"] == "message" else "reasoning_text"
            assert events[i]["type"] == "response.content_part.added" and events[i]["part"]["text"] == "", events[i]
            assert events[i]["part"]["type"] == kind
            i += 1
            text = ""
            while events[i]["type"] == f"response.{kind}.delta":
                assert {k: events[i][k] for k in where} == where and events[i]["content_index"] == 0
                text += events[i]["delta"]
                i += 1
            assert events[i]["type"] == f"response.{kind}.done" and events[i]["text"] == text, (events[i], text)
            assert events[i + 1]["type"] == "response.content_part.done", events[i + 1]
            assert events[i + 1]["part"]["text"] == text
            i += 2
            done = events[i]
            assert done["type"] == "response.output_item.done", done
            assert done["item"]["content"] == [events[i - 1]["part"]]
        else:
            assert item["type"] == "function_call" and item["arguments"] == "", item
            arguments = ""
            while events[i]["type"] == "response.function_call_arguments.delta":
                assert {k: events[i][k] for k in where} == where
                arguments += events[i]["delta"]
                i += 1
            assert events[i]["type"] == "response.function_call_arguments.done", events[i]
            assert events[i]["arguments"] == arguments and events[i]["name"] == item["name"]
            i += 1
            done = events[i]
            assert done["type"] == "response.output_item.done" and done["item"]["arguments"] == arguments, done
        assert done["output_index"] == index and done["item"]["id"] == item["id"]
        assert done["item"]["status"] in ("completed", "incomplete")
        done_items.append(done["item"])
        i += 1
    assert i == len(events) - 1, f"unexpected event {events[i]['type']} at {i}: {types}"
    final = events[-1]["response"]
    assert final["output"] == done_items
    status = {"response.completed": "completed", "response.incomplete": "incomplete", "response.failed": "failed"}[
        events[-1]["type"]
    ]
    assert final["status"] == status
    return final


def output_text(resp: dict[str, Any]) -> str:
    return "".join(
        part["text"]
        for item in resp["output"]
        if item["type"] == "message"
        for part in item["content"]
        if part["type"] == "output_text"
    )


def calls(resp: dict[str, Any]) -> list[dict[str, Any]]:
    return [item for item in resp["output"] if item["type"] == "function_call"]


def assert_same_as_chat(resp: dict[str, Any], completion: dict[str, Any]) -> None:
    """A Response and the chat completion of the same conversation at temperature 0: the same
    text, token counts and end (length ↔ incomplete)."""
    choice = completion["choices"][0]
    assert output_text(resp) == (choice["message"]["content"] or ""), (resp, completion)
    u, cu = resp["usage"], completion["usage"]
    assert (u["input_tokens"], u["output_tokens"], u["total_tokens"]) == (
        cu["prompt_tokens"],
        cu["completion_tokens"],
        cu["total_tokens"],
    )
    truncated = choice["finish_reason"] == "length"
    assert resp["status"] == ("incomplete" if truncated else "completed")
    assert resp["incomplete_details"] == ({"reason": "max_output_tokens"} if truncated else None)
    assert (resp["completed_at"] is not None) == (not truncated)


# ----------------------------------------------------------------------------- create


@pytest.mark.parametrize("model", [MODEL, ADAPTER])
def test_create_is_the_chat_completion(base_url, model):
    """`input` as a string, with `instructions`: the chat completion of [system, user]."""
    resp = create(base_url, model=model, input=TEXT, instructions="你是新闻编辑。", max_output_tokens=12, **GREEDY)
    completion = chat(
        base_url,
        model=model,
        messages=[{"role": "system", "content": "你是新闻编辑。"}, {"role": "user", "content": TEXT}],
        max_tokens=12,
        **GREEDY,
    )
    assert_same_as_chat(resp, completion)
    assert resp["id"].startswith("resp_") and resp["object"] == "response" and resp["model"] == model
    assert resp["instructions"] == "你是新闻编辑。" and resp["max_output_tokens"] == 12
    assert resp["temperature"] == 0 and resp["tools"] == [] and resp["error"] is None
    for item in resp["output"]:
        assert item["type"] == "message" and item["role"] == "assistant" and item["id"].startswith("msg_")


def test_sdk_create_and_input_items(client, base_url):
    """The SDK's `responses.create` with input items (text parts, an earlier assistant turn as a
    previous response returns it, a developer message): the chat completion of the same messages."""
    items = [
        {"role": "developer", "content": "只输出类别。"},
        {
            "role": "user",
            "content": [{"type": "input_text", "text": "体育新闻："}, {"type": "input_text", "text": TEXT}],
        },
        {
            "type": "message",
            "role": "assistant",
            "id": "msg_1",
            "status": "completed",
            "content": [{"type": "output_text", "text": "news_finance", "annotations": [], "logprobs": []}],
        },
        {"role": "user", "content": "再说一遍"},
    ]
    resp = client.responses.create(
        model=ADAPTER, input=items, max_output_tokens=10, temperature=0, metadata={"run": "test"}, user="u-1"
    )
    completion = chat(
        base_url,
        model=ADAPTER,
        max_tokens=10,
        **GREEDY,
        messages=[
            {"role": "developer", "content": "只输出类别。"},
            {"role": "user", "content": [{"type": "text", "text": "体育新闻："}, {"type": "text", "text": TEXT}]},
            {"role": "assistant", "content": "news_finance"},
            {"role": "user", "content": "再说一遍"},
        ],
    )
    as_json = resp.model_dump(mode="json", exclude_unset=True)
    assert_valid("Response", as_json, "SDK Response")
    assert_same_as_chat(as_json, completion)
    assert resp.output_text == (completion["choices"][0]["message"]["content"] or "")
    assert resp.metadata == {"run": "test"} and resp.user == "u-1"


def test_default_model_and_alias(base_url):
    """The default model (none named) and an alias answer as on chat; the Response names the
    model that served it."""
    body = {"input": TEXT, "max_output_tokens": 4, **GREEDY}
    plain = create(base_url, **body)
    assert plain["model"] == chat(base_url, messages=[{"role": "user", "content": TEXT}], max_tokens=1)["model"]
    aliased = create(base_url, **body, model=ALIAS)
    assert aliased["model"] == ADAPTER
    assert output_text(aliased) == output_text(create(base_url, **body, model=ADAPTER))


# ----------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("max_output_tokens", [3, 40])
def test_stream_events(base_url, max_output_tokens):
    """The streamed events: OpenAI's order, every one valid, adding up to the final Response,
    which is the non-streamed one (temperature 0): response.incomplete when max_output_tokens
    cut the output, response.completed otherwise."""
    body = {"model": ADAPTER, "input": TEXT, "max_output_tokens": max_output_tokens, **GREEDY}
    final = check_sequence(stream(base_url, **body))
    unary = create(base_url, **body)
    assert output_text(final) == output_text(unary)
    assert final["usage"] == unary["usage"] and final["status"] == unary["status"]
    assert final["incomplete_details"] == unary["incomplete_details"]


def test_sdk_stream(client):
    """The SDK's event stream (typed events) and its `responses.stream` helper, which checks
    item identities across the events and assembles the final Response."""
    events = list(client.responses.create(model=ADAPTER, input=TEXT, max_output_tokens=6, temperature=0, stream=True))
    assert events[0].type == "response.created" and events[-1].type in TERMINAL
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == events[-1].response.output_text
    with client.responses.stream(
        model=ADAPTER,
        input=TEXT,
        max_output_tokens=64,
        temperature=0,
        text={"format": {"type": "json_schema", "name": "label", "schema": NEWS, "strict": True}},
    ) as s:
        texts = [e.delta for e in s if e.type == "response.output_text.delta"]
        final = s.get_final_response()
    assert final.status == "completed" and final.output_text == "".join(texts)
    jsonschema.validate(json.loads(final.output_text), NEWS)


def test_stream_disconnect_aborts(base_url):
    """A client leaving mid-stream: the request ends as 499 client_closed (the chat path's
    disconnect handling, which aborts the engine request) and the engine is left with nothing
    unfinished."""
    from reliability import engine_unfinished

    def closed() -> float:
        text = httpx.get(base_url + "/metrics/prometheus", timeout=15).text
        m = re.search(r'llm_requests_total\{[^}]*endpoint="/v1/responses"[^}]*status="499"[^}]*\} ([0-9.e+]+)', text)
        return float(m.group(1)) if m else 0.0

    before = closed()
    body = {"model": MODEL, "input": TEXT, "max_output_tokens": 512, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", base_url + PATH, json=body, timeout=60) as r:
        for n, _ in enumerate(r.iter_lines()):
            if n > 12:
                break  # leave after a few events
    deadline = time.monotonic() + 30
    while (closed() <= before or engine_unfinished(base_url) != 0) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert closed() > before, "the disconnect was not recorded as 499"
    assert engine_unfinished(base_url) == 0


# ----------------------------------------------------------------------------- structured output


class Label(BaseModel):
    label: Literal["news_finance", "news_sports", "news_tech"]


def test_sdk_parse_pydantic(client, base_url):
    """`responses.parse` with a pydantic model: text.format json_schema, constrained decoding, the
    parsed object; the same output as chat's response_format json_schema."""
    resp = client.responses.parse(model=ADAPTER, input=TEXT, text_format=Label, max_output_tokens=64, temperature=0)
    assert resp.status == "completed"
    assert isinstance(resp.output_parsed, Label)
    completion = chat(
        base_url,
        model=ADAPTER,
        messages=[{"role": "user", "content": TEXT}],
        max_tokens=64,
        **GREEDY,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "Label", "schema": resp.text.format.schema_, "strict": True},
        },
    )
    assert resp.output_text == completion["choices"][0]["message"]["content"]


def test_json_object_and_logprobs(base_url):
    """text.format json_object (JSON whenever the output ended), and include
    message.output_text.logprobs with top_logprobs: chat's logprobs, token for token."""
    resp = create(
        base_url, model=MODEL, input=TEXT, max_output_tokens=48, text={"format": {"type": "json_object"}}, **GREEDY
    )
    if resp["status"] == "completed":
        assert isinstance(json.loads(output_text(resp)), dict)
    body = {"model": MODEL, "input": TEXT, "max_output_tokens": 5, "ignore_eos": True, **GREEDY}
    resp = create(base_url, **body, include=["message.output_text.logprobs"], top_logprobs=2)
    completion = chat(
        base_url,
        model=MODEL,
        messages=[{"role": "user", "content": TEXT}],
        max_tokens=5,
        ignore_eos=True,
        logprobs=True,
        top_logprobs=2,
        **GREEDY,
    )
    [item] = resp["output"]
    assert item["content"][0]["logprobs"] == completion["choices"][0]["logprobs"]["content"]
    assert resp["top_logprobs"] == 2
    final = check_sequence(stream(base_url, **body, include=["message.output_text.logprobs"], top_logprobs=2))
    assert final["output"][0]["content"][0]["logprobs"] == item["content"][0]["logprobs"]


# ----------------------------------------------------------------------------- tools


@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "name": "get_weather"}], ids=["required", "named"]
)
def test_forced_tool_call(base_url, client, tool_choice):
    """A forced call (required, or a named function): function_call items whose arguments are
    valid against the function's schema (constrained decoding), the chat path's call; streamed,
    the argument deltas add up to the same call."""
    body = {
        "model": MODEL,
        "input": "北京明天天气怎么样？",
        "tools": TOOLS,
        "tool_choice": tool_choice,
        "max_output_tokens": FORCED_MAX_TOKENS,
        "parallel_tool_calls": False,
        **GREEDY,
    }
    resp = create(base_url, **body)
    assert resp["status"] == "completed" and output_text(resp) == ""
    [call] = calls(resp)
    assert call["id"].startswith("fc_") and call["call_id"] and call["status"] == "completed"
    if isinstance(tool_choice, dict):
        assert call["name"] == "get_weather"
    jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])
    assert resp["tool_choice"] == tool_choice and resp["parallel_tool_calls"] is False
    assert [t["name"] for t in resp["tools"]] == ["get_weather", "classify"]
    completion = chat(
        base_url,
        model=MODEL,
        messages=[{"role": "user", "content": body["input"]}],
        tools=CHAT_TOOLS,
        max_tokens=FORCED_MAX_TOKENS,
        parallel_tool_calls=False,
        **GREEDY,
        tool_choice=tool_choice
        if isinstance(tool_choice, str)
        else {"type": "function", "function": {"name": "get_weather"}},
    )
    [chat_call] = completion["choices"][0]["message"]["tool_calls"]
    assert (call["name"], call["arguments"]) == (chat_call["function"]["name"], chat_call["function"]["arguments"])
    final = check_sequence(stream(base_url, **body))
    [streamed] = calls(final)
    assert (streamed["name"], streamed["arguments"]) == (call["name"], call["arguments"])
    # the SDK's typed objects
    sdk = client.responses.create(**body)
    [typed] = [o for o in sdk.output if o.type == "function_call"]
    jsonschema.validate(json.loads(typed.arguments), SCHEMAS[typed.name])


def test_tool_conversation(base_url):
    """A conversation with a function call and its output (the items the SDK sends back after
    running a tool): the chat completion of the same messages (assistant tool call, tool
    result), prompt tokens included. tool_choice none and auto both answer valid Responses."""
    items = [
        {"role": "user", "content": "北京明天天气怎么样？"},
        {
            "type": "function_call",
            "call_id": "call_1",
            "name": "get_weather",
            "arguments": '{"unit":"celsius","days":1}',
        },
        {"type": "function_call_output", "call_id": "call_1", "output": "晴，25度"},
    ]
    body = {"model": MODEL, "input": items, "tools": TOOLS, "max_output_tokens": 8, **GREEDY}
    resp = create(base_url, **body, tool_choice="none")
    completion = chat(
        base_url,
        model=MODEL,
        tools=CHAT_TOOLS,
        tool_choice="none",
        max_tokens=8,
        **GREEDY,
        messages=[
            {"role": "user", "content": "北京明天天气怎么样？"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"unit":"celsius","days":1}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "晴，25度"},
        ],
    )
    assert_same_as_chat(resp, completion)
    auto = create(base_url, **body)  # tool_choice auto (hermes parser): a message and/or calls
    assert auto["tool_choice"] == "auto"
    check_sequence(stream(base_url, **body))


# ----------------------------------------------------------------------------- refusals


BASE = {"model": MODEL, "input": TEXT, "max_output_tokens": 2}
REFUSED = [
    # (id, body changes, status, param)
    ("store-true", {"store": True}, 400, "store"),
    ("previous_response_id", {"previous_response_id": "resp_1"}, 400, "previous_response_id"),
    ("background", {"background": True}, 400, "background"),
    ("truncation-auto", {"truncation": "auto"}, 400, "truncation"),
    ("reasoning-effort", {"reasoning": {"effort": "low"}}, 400, "reasoning.effort"),
    ("verbosity", {"text": {"verbosity": "low"}}, 400, "text.verbosity"),
    ("prompt-template", {"prompt": {"id": "pmpt_1"}}, 400, "prompt"),
    ("conversation", {"conversation": "conv_1"}, 400, "conversation"),
    ("include-other", {"include": ["reasoning.encrypted_content"]}, 400, "include"),
    ("top_logprobs-alone", {"top_logprobs": 2}, 400, "top_logprobs"),
    ("unknown-field", {"temprature": 0.5}, 400, "temprature"),
    ("temperature", {"temperature": 3}, 400, "temperature"),
    ("max_output_tokens-0", {"max_output_tokens": 0}, 400, "max_output_tokens"),
    ("max_output_tokens-over-cap", {"max_output_tokens": 100000}, 400, "max_output_tokens"),
    ("metadata-17", {"metadata": {str(i): "v" for i in range(17)}}, 400, "metadata"),
    ("web-search-tool", {"tools": [{"type": "web_search"}]}, 400, "tools.0.type"),
    ("tool-no-name", {"tools": [{"type": "function", "parameters": {}}]}, 400, "tools.0.name"),
    ("named-not-in-tools", {"tools": TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, 400, "tool_choice"),
    ("required-without-tools", {"tool_choice": "required"}, 400, "tool_choice"),
    (
        "allowed-tools",
        {"tools": TOOLS, "tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": []}},
        400,
        "tool_choice",
    ),
    (
        "image-part",
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
        400,
        "input.0.content.0",
    ),
    ("item-reference", {"input": [{"type": "item_reference", "id": "msg_1"}]}, 400, "input.0.type"),
    ("item-not-object", {"input": ["hi"]}, 400, "input.0"),
    (
        "encrypted-reasoning",
        {"input": [{"type": "reasoning", "summary": [], "encrypted_content": "x"}]},
        400,
        "input.0.encrypted_content",
    ),
    ("empty-input", {"input": []}, 400, "input"),
    (
        "json_schema-without-schema",
        {"text": {"format": {"type": "json_schema", "name": "x"}}},
        400,
        "text.format.json_schema.schema",
    ),
    (
        "format-and-structured_outputs",
        {"text": {"format": {"type": "json_object"}}, "structured_outputs": {"regex": "a+"}},
        400,
        "structured_outputs",
    ),
    (
        "bad-schema",
        {"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nope"}}}},
        400,
        "text.format",
    ),
    ("over-context", {"input": TEXT * 400}, 400, "input"),
    ("unknown-model", {"model": "no-such-model"}, 404, "model"),
]


@pytest.mark.parametrize("changes, status, param", [pytest.param(c, s, p, id=i) for i, c, s, p in REFUSED])
def test_refused_naming_the_field(base_url, changes, status, param):
    r = post(base_url, {**BASE, **changes})
    assert r.status_code == status, r.text
    assert_valid("ErrorResponse", r.json(), "error")
    assert r.json()["error"]["param"] == param, r.text


def test_stored_response_routes_are_404(base_url):
    """Nothing is stored: retrieve, delete, cancel and input_items answer 404 saying so."""
    for method, path in [
        ("GET", "/v1/responses/resp_1"),
        ("DELETE", "/v1/responses/resp_1"),
        ("POST", "/v1/responses/resp_1/cancel"),
        ("GET", "/v1/responses/resp_1/input_items"),
    ]:
        r = httpx.request(method, base_url + path, timeout=30)
        assert r.status_code == 404, (method, path, r.text)
        assert_valid("ErrorResponse", r.json(), f"{method} {path}")
        assert r.json()["error"]["param"] == "response_id" and "not store" in r.json()["error"]["message"]


def test_store_false_and_bookkeeping_accepted(base_url):
    """store false (or unset), and bookkeeping fields that change no output, are accepted."""
    resp = create(
        base_url,
        **BASE,
        store=False,
        background=False,
        truncation="disabled",
        service_tier="auto",
        safety_identifier="s",
        prompt_cache_key="k",
        reasoning={"effort": None},
        stream_options={"include_obfuscation": False},
        max_tool_calls=3,
    )
    assert resp["safety_identifier"] == "s" and resp["prompt_cache_key"] == "k" and resp["max_tool_calls"] == 3
    assert resp["truncation"] == "disabled" and resp["background"] is False


def _mutations(rng: random.Random) -> dict[str, Any]:
    values = [
        None,
        True,
        False,
        -1,
        0,
        1,
        0.5,
        2**70,
        1.5,
        float("1e308"),
        "",
        "auto",
        "none",
        "x" * 300,
        [],
        {},
        [None],
        {"type": None},
        [{"type": "function"}],
        {"format": {"type": "nope"}},
        [{"role": "user"}],
        ["a", 1],
        [{"type": "message", "role": "tool", "content": "x"}],
        {"a": {"b": [1]}},
    ]
    fields = [
        "model",
        "input",
        "instructions",
        "max_output_tokens",
        "temperature",
        "top_p",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "text",
        "include",
        "top_logprobs",
        "metadata",
        "store",
        "background",
        "truncation",
        "reasoning",
        "user",
        "stream_options",
        "seed",
        "stop",
        "logit_bias",
        "top_k",
        "structured_outputs",
        "chat_template_kwargs",
        "priority",
        "timeout",
        "max_tool_calls",
    ]
    body: dict[str, Any] = {"model": rng.choice([MODEL, ADAPTER]), "input": TEXT, "max_output_tokens": 2}
    if rng.random() < 0.5:
        body["tools"] = TOOLS
    if rng.random() < 0.4:
        body["input"] = [
            rng.choice(
                [
                    {"role": "user", "content": TEXT},
                    {"type": "function_call", "call_id": "c", "name": "get_weather", "arguments": "{"},
                    {"type": "function_call_output", "call_id": "c", "output": [{"type": "input_text", "text": "ok"}]},
                    {"type": "reasoning", "summary": [{"type": "summary_text", "text": "s"}]},
                    {"role": "assistant", "content": [{"type": "output_text", "text": "a"}]},
                ]
            )
            for _ in range(rng.randint(1, 4))
        ]
    for _ in range(rng.choice([0, 1, 1, 2, 3])):  # 0: a valid body (random items, tools)
        name = rng.choice(fields)
        if isinstance(body.get("input"), list) and rng.random() < 0.3:
            item = rng.choice(body["input"])
            item[rng.choice(list(item) + ["type", "content", "extra"])] = rng.choice(values)
        else:
            body[name] = rng.choice(values)
    return body


def test_fuzz_bad_input_is_4xx_never_5xx(base_url):
    """Random malformed bodies: a Response (valid) or a 4xx OpenAI error naming the field;
    never a 5xx. The figures are printed (-s) for the note."""
    rng = random.Random(25)
    statuses: dict[int, int] = {}
    with httpx.Client(timeout=60) as http:
        for n in range(160):
            body = _mutations(rng)
            raw = json.dumps(body, allow_nan=False) if n % 20 else "{not json"
            r = http.post(base_url + PATH, content=raw, headers={"content-type": "application/json"})
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code < 500, (body, r.text)
            if r.status_code == 200:
                if r.headers["content-type"].startswith("text/event-stream"):
                    check_sequence(parse_sse(r.text))
                else:
                    assert_valid("Response", r.json(), f"fuzz {n}")
            else:
                assert 400 <= r.status_code < 500, r.text
                assert_valid("ErrorResponse", r.json(), f"fuzz {n}")
                err = r.json()["error"]
                assert err["param"] or err["code"] == "invalid_json", (body, r.text)
    print(f"fuzz /v1/responses: {sum(statuses.values())} bodies, statuses {dict(sorted(statuses.items()))}")
    assert statuses.get(400, 0) > 40 and statuses.get(200, 0) >= 10


def test_schemathesis_fuzz(base_url):
    """schemathesis over the published OpenAPI operation (positive and negative bodies): a
    Response or event stream, or an OpenAI error (4xx; a 504 only as the deadline error of a
    generated tiny `timeout`); never another 5xx. Generations are kept short (max_output_tokens
    at most 4) so the run stays fast."""
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json", timeout=30)
    [op] = [r.ok() for r in schema.get_all_operations() if r.ok().path == PATH and r.ok().method.upper() == "POST"]
    session = requests.Session()
    statuses: dict[int, int] = {}
    bad: list[str] = []

    for mode, n in ((GenerationMode.POSITIVE, 60), (GenerationMode.NEGATIVE, 60)):

        @settings(
            max_examples=n,
            deadline=None,
            database=None,
            derandomize=True,
            print_blob=False,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=op.as_strategy(generation_mode=mode))
        def fuzz(case):
            if isinstance(case.body, dict):
                mot = case.body.get("max_output_tokens")
                if mot is None or (isinstance(mot, int) and not isinstance(mot, bool) and mot > 4):
                    case.body["max_output_tokens"] = 4
            r = case.call(base_url=base_url, session=session, timeout=60)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            problem = None
            if r.status_code >= 500 and not (r.status_code == 504 and b'"timeout"' in r.content):
                problem = f"{r.status_code}"
            elif r.status_code >= 400:
                try:
                    assert_valid("ErrorResponse", json.loads(r.content), "error")
                except (AssertionError, ValueError) as exc:
                    problem = f"not an OpenAI error: {exc}"
            elif "text/event-stream" in str(r.headers.get("content-type")):
                try:
                    if not r.stream_cut_short:  # schemathesis reads a bounded number of events
                        check_sequence(parse_sse(r.content.decode()))
                except AssertionError as exc:
                    problem = f"bad stream: {str(exc)[:300]}"
            else:
                try:
                    assert_valid("Response", json.loads(r.content), "Response")
                except AssertionError as exc:
                    problem = f"bad Response: {str(exc)[:300]}"
            if problem and len(bad) < 5:
                bad.append(f"[{mode.value}] {problem}: {str(case.body)[:400]!r} -> {r.content[:300]!r}")  # noqa: B023

        fuzz()
    print(f"schemathesis /v1/responses: {sum(statuses.values())} requests, statuses {dict(sorted(statuses.items()))}")
    assert not bad, "\n".join(bad)
    assert sum(statuses.values()) >= 100


# ----------------------------------------------------------------------------- units (no cluster)


class _Trace:
    def chunk(self, n: int) -> None:
        pass

    def finished(self, *args: Any, **kwargs: Any) -> None:
        pass


def _renderer(**body: Any):
    from deployments.api import sse
    from deployments.api.responses_protocol import ResponsesRequest
    from deployments.api.responses_render import ResponsesRendering, ResponseStreamRenderer
    from deployments.config import LimitsConfig

    request = ResponsesRequest.model_validate({"input": TEXT, **body})
    ctx = sse.StreamContext(True, "resp_unit", MODEL, 1, 7, False, False, 1e18, 10)
    return ResponseStreamRenderer(ctx, _Trace(), ResponsesRendering(request, LimitsConfig()))


def test_stream_reasoning_text_and_auto_calls_unit():
    """Reasoning (a model with a reasoning parser), text, then two free (`auto`) tool calls as
    the parser streams them: reasoning item, message, function_call items in order, every event
    valid; the final Response adds them up."""
    from deployments.api.protocol import GenerationChunk as C

    out = _renderer(tools=TOOLS)
    data = out.role()
    for chunk in [
        C("", 1, reasoning="想"),
        C("", 1, reasoning="一想"),
        C("北京", 1),
        C("晴", 1),
        C(
            "",
            1,
            tool_calls=[
                {"index": 0, "id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
            ],
        ),
        C("", 1, tool_calls=[{"index": 0, "function": {"arguments": '{"unit":"celsius",'}}]),
        C("", 1, tool_calls=[{"index": 0, "function": {"arguments": '"days":2}'}}]),
        C(
            "",
            1,
            tool_calls=[
                {
                    "index": 1,
                    "id": "call_b",
                    "type": "function",
                    "function": {"name": "classify", "arguments": '{"label":"news_tech"}'},
                }
            ],
            finish_reason="stop",
        ),
    ]:
        data += out.chunk(chunk) or b""
    data += out.end()
    final = check_sequence(parse_sse(data.decode()))
    assert [i["type"] for i in final["output"]] == ["reasoning", "message", "function_call", "function_call"]
    assert final["output"][0]["content"] == [{"type": "reasoning_text", "text": "想一想"}]
    assert output_text(final) == "北京晴"
    assert [(c["call_id"], c["name"]) for c in calls(final)] == [("call_a", "get_weather"), ("call_b", "classify")]
    assert final["usage"]["input_tokens"] == 7 and final["usage"]["output_tokens"] == 8
    assert final["status"] == "completed"


def test_unary_reasoning_and_calls_unit():
    """A chat completion with reasoning, text and a call (a model with reasoning and tool
    parsers), cut by max_output_tokens: reasoning, message, function_call items in that order,
    the last one incomplete; a valid Response."""
    from deployments.api.responses_protocol import ResponsesRequest
    from deployments.api.responses_render import ResponsesRendering
    from deployments.config import LimitsConfig

    rendering = ResponsesRendering(ResponsesRequest.model_validate({"input": TEXT, "tools": TOOLS}), LimitsConfig())
    completion = {
        "id": "resp_unit",
        "object": "chat.completion",
        "created": 1,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "finish_reason": "length",
                "logprobs": None,
                "message": {
                    "role": "assistant",
                    "content": "北京",
                    "reasoning_content": "想一想",
                    "tool_calls": [
                        {
                            "id": "call_a",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"unit":'},
                        }
                    ],
                },
            }
        ],
        "usage": {"prompt_tokens": 7, "completion_tokens": 9, "total_tokens": 16},
    }
    resp = rendering.unary(completion)
    assert_valid("Response", resp, "Response")
    assert [(i["type"], i["status"]) for i in resp["output"]] == [
        ("reasoning", "completed"),
        ("message", "completed"),
        ("function_call", "incomplete"),
    ]
    assert resp["output"][0]["content"] == [{"type": "reasoning_text", "text": "想一想"}]
    assert resp["status"] == "incomplete" and resp["incomplete_details"] == {"reason": "max_output_tokens"}
    assert resp["usage"]["total_tokens"] == 16 and resp["tool_choice"] == "auto"


def test_stream_failure_unit():
    """Generation failing mid-stream (deadline): OpenAI's `error` event with the service's code,
    then response.failed carrying the output so far."""
    from deployments.api import errors
    from deployments.api.protocol import GenerationChunk as C

    out = _renderer()
    data = out.role() + (out.chunk(C("北京", 1)) or b"") + out.fail(errors.timed_out(1))
    events = parse_sse(data.decode())
    assert [e["type"] for e in events][-2:] == ["error", "response.failed"]
    assert events[-2]["code"] == "timeout"
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    assert failed["output"][0]["status"] == "incomplete" and "usage" not in failed


def test_admission_reads_responses_fields_unit():
    """Token budgets: the reservation reads max_output_tokens; the charge reads the usage of a
    Response body and of the response.completed event."""
    from deployments.admission.middleware import _reservation, _total_tokens

    assert _reservation(json.dumps({"input": "x", "max_output_tokens": 33}).encode(), 100) == 33
    assert _reservation(json.dumps({"input": "x"}).encode(), 100) == 100
    use = {"input_tokens": 5, "output_tokens": 7, "total_tokens": 12}
    assert _total_tokens(json.dumps({"object": "response", "usage": use}).encode()) == 12
    assert _total_tokens(json.dumps({"type": "response.completed", "response": {"usage": use}}).encode()) == 12
    assert _total_tokens(json.dumps({"type": "response.created", "response": {"id": "r"}}).encode()) is None


# ----------------------------------------------------------------------------- OpenAI Agents SDK


def test_agents_sdk_agent_with_a_function_tool(base_url):
    """An OpenAI Agents SDK agent on its default model class (OpenAIResponsesModel: the Responses
    API) with a function tool and a forced call: the tool runs with schema-valid arguments
    (the SDK checks them against the function's strict schema), non-streamed and streamed."""
    agents = pytest.importorskip("agents")
    from openai import AsyncOpenAI

    seen: list[dict[str, Any]] = []

    @agents.function_tool
    def get_weather(city: Literal["北京", "上海"], days: Annotated[int, Field(ge=1, le=7)]) -> str:
        """The weather forecast for a city.

        Args:
            city: The city.
            days: How many days ahead.
        """
        seen.append({"city": city, "days": days})
        return f"{city}: 晴"

    client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)
    model = agents.OpenAIResponsesModel(model=ADAPTER, openai_client=client)
    assert isinstance(model, agents.OpenAIResponsesModel)
    agent = agents.Agent(
        name="weather",
        instructions="Answer with the tool.",
        tools=[get_weather],
        model=model,
        model_settings=agents.ModelSettings(tool_choice="get_weather", temperature=0, max_tokens=128),
        tool_use_behavior="stop_on_first_tool",
    )
    config = agents.RunConfig(tracing_disabled=True)

    async def run():
        result = await agents.Runner.run(agent, "北京明天天气怎么样？", run_config=config)
        streamed = agents.Runner.run_streamed(agent, "上海后天天气？", run_config=config)
        async for _ in streamed.stream_events():
            pass
        return result, streamed

    result, streamed = asyncio.run(run())
    assert len(seen) == 2, seen
    for args, final in zip(seen, (result.final_output, streamed.final_output)):
        assert final == f"{args['city']}: 晴"
        assert isinstance(args["days"], int)


# ----------------------------------------------------------------------------- vLLM's own server
# Deliberate differences from vLLM 0.32's server (README "Calling it" lists them with reasons):
#  1. `store: true` is a 400 naming `store` (vLLM accepts it and stores nothing unless started with
#     VLLM_ENABLE_RESPONSES_API_STORE); `previous_response_id` is a 400 naming it (vLLM: 404, no
#     such stored response); stored-response routes are 404 on both.
#  2. A cut output (max_output_tokens) ends the stream with `response.incomplete` (OpenAI's event;
#     vLLM sends `response.completed` with status incomplete), and the cut item's status is
#     `incomplete` (vLLM: `completed`).
#  3. Response fields: `usage` is left out while in progress (OpenAI's document: an object, not
#     nullable; vLLM sends null); `output_text.logprobs` is `[]` when not asked for (vLLM: null);
#     `completed_at`, `safety_identifier`, `prompt_cache_key` and the default `text.format` are
#     sent; `service_tier` is the tier that served ("default"); vLLM's extensions
#     (`presence_penalty`, `frequency_penalty`, `input_messages`, `kv_transfer_params`, …) are not.
#  4. `usage.input_tokens_details.cached_tokens` and `output_tokens_details.reasoning_tokens` are 0
#     (not counted here); vLLM counts prefix-cache hits and reasoning tokens.
#  5. Unknown fields, `reasoning` settings, `truncation: "auto"`, other `include` values: 400 naming
#     them (vLLM ignores unknown fields, passes reasoning.effort to the chat template, truncates).
#  6. No `max_output_tokens`: limits.default_max_tokens_chat (vLLM: the rest of the context); with
#     the prompt over the context, a 400 `context_length_exceeded` (vLLM shortens it).
#  7. Forced tool calls (`required`, a named function) always carry schema-valid arguments.
#  8. An assistant input message's text parts are all kept (vLLM keeps the first).
#  9. Error objects: OpenAI's string codes and types (vLLM: the status as an int), as on chat.

# Top-level Response fields only one side sends (3.)
OURS_ONLY = {
    "completed_at",
    "safety_identifier",
    "prompt_cache_key",
    "error",
}  # OpenAI's document requires it; vLLM's Response lacks it
VLLM_ONLY = {
    "presence_penalty",
    "frequency_penalty",
    "prompt",
    "kv_transfer_params",
    "ec_transfer_params",
    "input_messages",
    "output_messages",
    "metrics",
    "user",
}  # ours only when set (OpenAI's document: a string, not nullable); vLLM: null


def _vllm_cases() -> list:
    items = [
        {"role": "user", "content": [{"type": "input_text", "text": TEXT}]},
        {
            "type": "message",
            "role": "assistant",
            "id": "msg_1",
            "status": "completed",
            "content": [{"type": "output_text", "text": "news_finance", "annotations": []}],
        },
        {"role": "user", "content": "再说一遍"},
    ]
    tool_history = [
        {"role": "user", "content": "北京明天天气怎么样？"},
        {
            "type": "function_call",
            "call_id": "call_1",
            "name": "get_weather",
            "arguments": '{"unit":"celsius","days":1}',
        },
        {"type": "function_call_output", "call_id": "call_1", "output": "晴"},
    ]
    cases = {
        "plain": {"model": MODEL, "input": TEXT, "max_output_tokens": 8, "ignore_eos": True},
        "lora-items-instructions": {
            "model": ADAPTER,
            "input": items,
            "instructions": "你是新闻编辑。",
            "max_output_tokens": 8,
        },
        "tool-history": {
            "model": MODEL,
            "input": tool_history,
            "tools": TOOLS,
            "tool_choice": "none",
            "max_output_tokens": 6,
            "ignore_eos": True,
        },
        "json_schema-lora": {
            "model": ADAPTER,
            "input": TEXT,
            "max_output_tokens": 64,
            "text": {"format": {"type": "json_schema", "name": "label", "schema": NEWS, "strict": True}},
        },
    }
    return [
        pytest.param({**body, **GREEDY}, s, id=f"{name}-{'stream' if s else 'json'}")
        for name, body in cases.items()
        for s in (False, True)
    ]


def _vllm_stream(url: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with httpx.stream("POST", url + PATH, json={**body, "stream": True}, timeout=120) as r:
        raw = r.read().decode()
        assert r.status_code == 200, raw
    return [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: ")]


def _kinds(events: list[dict[str, Any]]) -> list[str]:
    """The event types, runs of deltas as one: chunk boundaries differ by design (ours coalesces
    the tokens that arrive together, as on chat)."""
    out: list[str] = []
    for e in events:
        if not (e["type"].endswith(".delta") and out and out[-1] == e["type"]):
            out.append(e["type"])
    return out


@pytest.mark.parametrize("body, streamed", _vllm_cases())
def test_vllm_same_answer(base_url, vllm_server, body, streamed):
    """The same text, token counts, status and output items as vLLM's server; the same top-level
    fields but for the documented ones; streamed, the same event sequence but for the terminal
    event of a cut output (difference 2)."""
    if streamed:
        ours_events = stream(base_url, **body)
        theirs_events = _vllm_stream(vllm_server.url, body)
        ours, theirs = check_sequence(ours_events), theirs_events[-1]["response"]
        kinds, theirs_kinds = _kinds(ours_events), _kinds(theirs_events)
        if kinds[-1] == "response.incomplete":
            kinds[-1] = "response.completed"  # difference 2
        assert kinds == theirs_kinds, (kinds, theirs_kinds)
    else:
        ours = create(base_url, **body)
        r = post(vllm_server.url, body)
        assert r.status_code == 200, r.text
        theirs = r.json()
    ctx = (
        f"\nours: {json.dumps(ours, ensure_ascii=False)[:3000]}\nvLLM: {json.dumps(theirs, ensure_ascii=False)[:3000]}"
    )
    assert output_text(ours) == output_text(theirs), ctx
    for key in ("input_tokens", "output_tokens", "total_tokens"):
        assert ours["usage"][key] == theirs["usage"][key], ctx
    assert ours["status"] == theirs["status"] and ours["incomplete_details"] == theirs["incomplete_details"], ctx
    shape = [(i["type"], i.get("role"), [p["type"] for p in i.get("content") or []]) for i in ours["output"]]
    assert shape == [
        (i["type"], i.get("role"), [p["type"] for p in i.get("content") or []]) for i in theirs["output"]
    ], ctx
    assert set(ours) - set(theirs) <= OURS_ONLY, (sorted(set(ours) - set(theirs) - OURS_ONLY), ctx)
    assert set(theirs) - set(ours) <= VLLM_ONLY | {"usage"}, (sorted(set(theirs) - set(ours) - VLLM_ONLY), ctx)
    for key in (
        "model",
        "object",
        "instructions",
        "max_output_tokens",
        "parallel_tool_calls",
        "tool_choice",
        "temperature",
        "top_p",
        "truncation",
        "background",
        "previous_response_id",
    ):
        assert ours[key] == theirs[key], (key, ctx)


def test_vllm_forced_call_and_refusals(base_url, vllm_server):
    """A named tool choice: ours a function_call with schema-valid arguments (difference 7);
    vLLM 0.32's server does not constrain it (seen: a cut `<tool_call>` message), so only its
    status is compared. Refusals: `store: true` and `previous_response_id` (difference 1), an
    unknown field (5); `background: true` and stored-response routes answer alike."""
    body = {
        "model": MODEL,
        "input": "北京明天天气怎么样？",
        "tools": TOOLS,
        "max_output_tokens": FORCED_MAX_TOKENS,
        "tool_choice": {"type": "function", "name": "get_weather"},
        **GREEDY,
    }
    ours = create(base_url, **body)
    r = post(vllm_server.url, body)
    assert r.status_code == 200, r.text
    [call] = calls(ours)
    assert call["name"] == "get_weather"
    jsonschema.validate(json.loads(call["arguments"]), WEATHER)

    def both(changes: dict[str, Any]) -> tuple[httpx.Response, httpx.Response]:
        return post(base_url, {**BASE, **changes}), post(vllm_server.url, {**BASE, **changes})

    ours_r, theirs_r = both({"store": True})
    assert theirs_r.status_code == 200 and ours_r.status_code == 400, (ours_r.text, theirs_r.text)
    ours_r, theirs_r = both({"previous_response_id": "resp_nope"})
    assert theirs_r.status_code == 404 and ours_r.status_code == 400, (ours_r.text, theirs_r.text)
    assert ours_r.json()["error"]["param"] == "previous_response_id"
    ours_r, theirs_r = both({"temprature": 1})
    assert theirs_r.status_code == 200 and ours_r.status_code == 400, (ours_r.text, theirs_r.text)
    ours_r, theirs_r = both({"background": True})
    assert ours_r.status_code == theirs_r.status_code == 400, (ours_r.text, theirs_r.text)
    assert ours_r.json()["error"]["param"] == theirs_r.json()["error"]["param"] == "background"
    for url in (base_url, vllm_server.url):
        assert httpx.get(url + "/v1/responses/resp_nope", timeout=30).status_code == 404
