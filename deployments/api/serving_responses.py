"""POST /v1/responses (OpenAI's Responses API) served by the chat completions path.

A Responses request is translated into the internal chat request (`to_chat`: input items →
chat messages, as vLLM's server builds them; function tools, `tool_choice`, `text.format`,
sampling fields) and served by `ServingGeneration.chat` with everything chat has: admission,
the fair queue, budgets and `x-ratelimit-*` headers, the default model and aliases, adapters,
tracing and metrics (endpoint `/v1/responses`), the request timeout, a client leaving → engine
abort, forced tool calls constrained to the function's schema. Its result comes back as a
Response object (`ResponsesRendering.unary`, from the chat completion) or as OpenAI's
ResponseStreamEvent sequence (`ResponseStreamRenderer`, from the chat deltas):

    response.created, response.in_progress,
    per output item: response.output_item.added,
      a message:   response.content_part.added, response.output_text.delta…,
                   response.output_text.done, response.content_part.done,
      reasoning:   response.content_part.added, response.reasoning_text.delta…,
                   response.reasoning_text.done, response.content_part.done,
      a call:      response.function_call_arguments.delta…, response.function_call_arguments.done,
    response.output_item.done; then response.completed (response.incomplete when
    max_output_tokens cut the output; error + response.failed when generation failed).

Nothing is stored (see `responses_protocol`): GET, DELETE, cancel and input_items of a response
id are 404s saying so.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import ValidationError

from deployments.admission.capacity import ANONYMOUS, Tenant
from deployments.api import errors
from deployments.api.errors import APIError
from deployments.api.generation import ServingGeneration
from deployments.api.protocol import ChatCompletionRequest
from deployments.api.responses_protocol import (
    ITEM_TYPES,
    FunctionCallItem,
    FunctionCallOutputItem,
    InputItem,
    MessageItem,
    ReasoningItem,
    ResponsesRequest,
    ToolChoiceFunction,
    item_type,
)
from deployments.api.responses_render import ResponsesRendering
from deployments.config import LimitsConfig

# Chat's names for the Responses fields they came from (in a refusal raised on the chat path).
_CHAT_PARAMS = {
    "messages": "input",
    "max_tokens": "max_output_tokens",
    "max_completion_tokens": "max_output_tokens",
    "response_format": "text.format",
    "logprobs": "include",
}
_CHAT_WORDS = re.compile(r"^messages(?=:)|\bmax_tokens\b|\bresponse_format\b")


def constraint_param(body: ResponsesRequest, exc: APIError) -> str | None:
    """The field behind the engine's refusal of an output constraint (a JSON schema or regex it
    cannot compile: `param` null or `structured_outputs` from the model replica): the one the
    request set."""
    if exc.status != 400 or exc.param not in (None, "structured_outputs"):
        return exc.param
    if exc.param is None and not re.search(r"grammar|schema|regex|structured", exc.message, re.IGNORECASE):
        return None
    if body.text and body.text.format and body.text.format.type != "text":
        return "text.format"
    return "structured_outputs" if body.structured_outputs is not None else exc.param


def renamed(exc: APIError, param: str | None = None) -> APIError:
    """A refusal from the chat path, naming the Responses API's fields (`param`: the one to name,
    default the refusal's own)."""
    param = exc.param if param is None else param
    if param:
        head, dot, rest = param.partition(".")
        param = _CHAT_PARAMS.get(head, head) + dot + rest
    message = _CHAT_WORDS.sub(lambda m: _CHAT_PARAMS[m.group(0)], exc.message)
    if (param, message) == (exc.param, exc.message):
        return exc
    return APIError(exc.status, message, param, exc.code, exc.headers, exc.extra, exc.fields)


# --------------------------------------------------------------------------- request → chat


def parse_item(raw: Any, i: int) -> InputItem:
    """One input item, or a 400 naming exactly what is wrong with it (`input.3.content.0.type`)."""
    kind = item_type(raw)
    if not isinstance(raw, dict):
        raise errors.bad_request(f"input.{i}: an input item is an object", f"input.{i}")
    adapter = ITEM_TYPES.get(kind) if isinstance(kind, str) else None
    if adapter is None:
        raise APIError(
            400,
            f"input.{i}.type: input items of type {kind!r} are not supported by this service "
            f"(supported: {', '.join(ITEM_TYPES)})",
            param=f"input.{i}.type",
            code="unsupported_parameter",
        )
    try:
        return adapter.validate_python(raw)
    except ValidationError as exc:
        # the deepest problem: `content` as a list of parts rather than "not a string"
        first = max(exc.errors(), key=lambda e: len(_path(e.get("loc", ()))))
        where = ".".join(_path(first.get("loc", ())))
        param = f"input.{i}" + (f".{where}" if where else "")
        if first.get("type") == "union_tag_invalid":
            msg = f"{param}: only text parts are supported by this service ({first.get('msg')})"
        else:
            msg = f"{param}: {first.get('msg')}"
        raise errors.bad_request(msg, param) from None


def _path(loc) -> list[str]:
    """A pydantic error location without its union-branch tags (`str`, `list[…]`, …)."""
    return [str(p) for p in loc if p not in ("str", "none") and not (isinstance(p, str) and "[" in p)]


def chat_messages(body: ResponsesRequest) -> list[dict[str, Any]]:
    """The conversation as chat messages, built as vLLM's server builds it
    (`construct_input_messages`): `instructions` as a system message first; a string input as
    a user message; a function call joins the assistant message before it (else starts one), as
    do reasoning and an assistant message's text when that message has none yet; a function
    call's output is a tool message. One difference: an assistant message's text parts are all
    kept (vLLM keeps the first)."""
    messages: list[dict[str, Any]] = []
    if body.instructions:
        messages.append({"role": "system", "content": body.instructions})
    if isinstance(body.input, str):
        messages.append({"role": "user", "content": body.input})
        return messages
    for i, raw in enumerate(body.input):
        item = parse_item(raw, i)
        prev = messages[-1] if messages and messages[-1]["role"] == "assistant" else None
        if isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            if prev is not None:
                prev.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, ReasoningItem):
            if prev is not None and prev.get("reasoning") is None:
                prev["reasoning"] = item.text()
            else:
                messages.append({"role": "assistant", "content": None, "reasoning": item.text()})
        elif isinstance(item, FunctionCallOutputItem):
            messages.append({"role": "tool", "content": item.text(), "tool_call_id": item.call_id})
        elif isinstance(item, MessageItem) and item.role == "assistant":
            text = "".join(item.texts())
            if prev is not None and prev.get("content") is None:
                prev["content"] = text
            else:
                messages.append({"role": "assistant", "content": text})
        else:
            assert isinstance(item, MessageItem)
            content = (
                item.content if isinstance(item.content, str) else [{"type": "text", "text": t} for t in item.texts()]
            )
            messages.append({"role": item.role, "content": content})
    return messages


def to_chat(body: ResponsesRequest, limits: LimitsConfig) -> ChatCompletionRequest:
    """The internal chat completions request a Responses request stands for."""
    messages = chat_messages(body)
    if not messages:
        raise errors.bad_request("input: give at least one input item (or instructions)", "input")
    if len(messages) > limits.max_messages:
        raise errors.bad_request(
            f"input: at most {limits.max_messages} messages per request (got {len(messages)})",
            "input",
            "too_many_messages",
        )
    fmt = body.text.format if body.text else None
    if fmt is not None and fmt.type != "text" and body.structured_outputs is not None:
        raise errors.bad_request("Give text.format or structured_outputs, not both.", "structured_outputs")
    fields: dict[str, Any] = {
        "model": body.model,
        "messages": messages,
        "max_tokens": body.max_output_tokens,
        "stream": body.stream,
        "tools": [
            {
                "type": "function",
                "function": {"name": t.name, "description": t.description, "parameters": t.parameters}
                | ({"strict": t.strict} if t.strict is not None else {}),
            }
            for t in body.tools
        ]
        if body.tools
        else None,
        "tool_choice": {"type": "function", "function": {"name": body.tool_choice.name}}
        if isinstance(body.tool_choice, ToolChoiceFunction)
        else body.tool_choice,
        "parallel_tool_calls": body.parallel_tool_calls,
        "response_format": None
        if fmt is None
        else {"type": fmt.type}
        | ({"json_schema": fmt.model_dump(by_alias=True, exclude={"type"})} if fmt.type == "json_schema" else {}),
        "logprobs": body.wants_logprobs(),
        "top_logprobs": body.top_logprobs if body.wants_logprobs() else None,
        "prompt_cache_key": body.prompt_cache_key,  # the routing session key
    }
    for name in (
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
        "seed",
        "stop",
        "stop_token_ids",
        "ignore_eos",
        "logit_bias",
        "skip_special_tokens",
        "include_stop_str_in_output",
        "structured_outputs",
        "chat_template_kwargs",
        "include_reasoning",
        "priority",
        "timeout",
    ):
        value = getattr(body, name)
        if value is not None:
            fields[name] = value.model_dump(by_alias=True) if name == "structured_outputs" else value
    try:
        return ChatCompletionRequest.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if not str(p).startswith(("tagged-union", "list["))]
        param = ".".join(loc) or None
        raise renamed(errors.bad_request(f"{param}: {first.get('msg')}" if param else first["msg"], param)) from None


# --------------------------------------------------------------------------- the endpoint


class ServingResponses:
    """POST /v1/responses; the stored-response routes (404: nothing is stored)."""

    def __init__(self, generation: ServingGeneration, limits: LimitsConfig):
        self.generation, self.limits = generation, limits

    async def create(self, body: ResponsesRequest, who: Tenant = ANONYMOUS):
        try:
            rendering = ResponsesRendering(body, self.limits)
            chat = to_chat(body, self.limits)
        except APIError as exc:
            raise renamed(exc) from None
        try:
            return await self.generation.chat(chat, who, rendering)
        except APIError as exc:
            raise renamed(exc, constraint_param(body, exc)) from None

    @staticmethod
    def not_stored(response_id: str) -> APIError:
        return APIError(
            404,
            f"No response with id {response_id!r}: this service does not store responses "
            "(store and previous_response_id are not supported).",
            param="response_id",
            code="response_not_found",
        )
