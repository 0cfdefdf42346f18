"""Tool calling on the ingress side: validating `tools`/`tool_choice`, the JSON schema that
forces a call's arguments to be valid (`tool_choice` `required` or a named function: the output
is constrained to it by the engine's structured-output backend, so the arguments always match
the function's schema — vLLM's server does not guarantee this), turning that constrained output
into tool calls (whole, or as stream deltas), and what the model replica's parsers need
(`parse_spec`). Free (`auto`) tool calls are parsed in the model replica by vLLM's tool parser
(`engine/output_parsing.py`)."""

from __future__ import annotations

import json
import uuid
from typing import Any, TypeGuard

from deployments.api import errors
from deployments.api.protocol import NamedToolChoice, Tool, ToolChoice

MAX_TOOLS = 128


def for_template(tools: list[Tool]) -> list[dict[str, Any]]:
    """The tools as the chat template renders them, field for field as vLLM's server passes them
    (`description` and `parameters` present even when null), so both render the same prompt."""
    out = []
    for t in tools:
        f = t.function
        function: dict[str, Any] = {"name": f.name, "description": f.description, "parameters": f.parameters}
        if f.strict is not None:
            function["strict"] = f.strict
        out.append({"type": "function", "function": function})
    return out


def call_id() -> str:
    return "chatcmpl-tool-" + uuid.uuid4().hex


def check(tools: list[Tool] | None, choice: ToolChoice | None, parallel: bool | None, auto_parser: bool) -> None:
    """A 400 naming the field for a tool request this service cannot honour as asked."""
    if choice is not None and not tools and choice != "none":
        raise errors.bad_request("tool_choice needs tools.", "tool_choice")
    if not tools:
        return
    if len(tools) > MAX_TOOLS:
        raise errors.bad_request(f"at most {MAX_TOOLS} tools per request (got {len(tools)}).", "tools")
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise errors.bad_request("tool function names must be distinct.", "tools")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise errors.bad_request(f"tool_choice names {choice.function.name!r}, which is not in tools.", "tool_choice")
    if choice in (None, "auto") and not auto_parser:
        raise errors.bad_request(
            "tool_choice 'auto' needs a tool-call parser for this model (model.tool_call_parser); "
            "'required', a named function and 'none' work without one.",
            "tool_choice",
        )


def forced(choice: ToolChoice | None) -> TypeGuard[ToolChoice]:
    return choice == "required" or isinstance(choice, NamedToolChoice)


def _parameters(tool: Tool) -> dict[str, Any]:
    return tool.function.parameters or {"type": "object", "properties": {}}


def parsed(tools: list[Tool] | None, choice: ToolChoice | None) -> bool:
    """Whether the model replica's tool parser reads this request's output (`auto` with tools);
    other requests skip it: no per-step parsing cost."""
    return bool(tools) and choice in (None, "auto")


def forced_schema(tools: list[Tool], choice: ToolChoice, parallel: bool | None) -> dict[str, Any]:
    """The JSON schema the output is constrained to: a named function's parameters, or (for
    `required`) a list of `{"name", "parameters"}` calls of the given tools (vLLM's format),
    one call at most when `parallel_tool_calls` is false."""
    if isinstance(choice, NamedToolChoice):
        return _parameters(next(t for t in tools if t.function.name == choice.function.name))
    calls = [
        {
            "type": "object",
            "properties": {"name": {"type": "string", "enum": [t.function.name]}, "parameters": _parameters(t)},
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if parallel is False:
        schema["maxItems"] = 1
    return schema


def forced_calls(content: str, choice: ToolChoice) -> list[dict[str, Any]]:
    """The tool calls of a whole forced output. A truncated output (finish_reason `length`)
    yields its text as the arguments, as OpenAI does."""
    if isinstance(choice, NamedToolChoice):
        return [{"id": call_id(), "type": "function", "function": {"name": choice.function.name, "arguments": content}}]
    items = complete_items(content)
    return [
        {
            "id": call_id(),
            "type": "function",
            "function": {"name": item["name"], "arguments": json.dumps(item["parameters"], ensure_ascii=False)},
        }
        for item in items
        if isinstance(item, dict) and "name" in item
    ]


def complete_items(content: str) -> list[Any]:
    """The complete items of a JSON array, also when the array is cut short (max_tokens): a
    call whose JSON is whole is kept, the cut one dropped."""
    decoder, items = json.JSONDecoder(), []
    i = content.find("[") + 1
    if i == 0:
        return []
    while i < len(content):
        try:
            item, i = decoder.raw_decode(content, i)
        except ValueError:
            break
        items.append(item)
        while i < len(content) and content[i] in ", \n\t\r":
            i += 1
        if content[i : i + 1] == "]":
            break
    return items


class ForcedCallStream:
    """Stream deltas of a forced call: a named function's arguments stream as they come (its
    header first); `required` calls are sent whole when the output ends (their list is one
    JSON document)."""

    def __init__(self, choice: ToolChoice):
        self.choice, self.started = choice, False
        self.buffer: list[str] = []

    def feed(self, text: str, finished: bool) -> list[dict[str, Any]]:
        if isinstance(self.choice, NamedToolChoice):
            out = []
            if not self.started:
                self.started = True
                out.append(
                    {
                        "index": 0,
                        "id": call_id(),
                        "type": "function",
                        "function": {"name": self.choice.function.name, "arguments": ""},
                    }
                )
            if text:
                out.append({"index": 0, "function": {"arguments": text}})
            return out
        self.buffer.append(text)
        if not finished:
            return []
        return [{"index": i, **call} for i, call in enumerate(forced_calls("".join(self.buffer), self.choice))]


def finish_reason(choice: ToolChoice | None, called: bool, engine_reason: str | None) -> str | None:
    """OpenAI's: `tool_calls` when `auto` or `required` called a tool and the model stopped;
    a named function's forced call keeps `stop`."""
    if engine_reason == "stop" and called and not isinstance(choice, NamedToolChoice):
        return "tool_calls"
    return engine_reason


def parse_spec(
    tools: list[Tool] | None,
    choice: ToolChoice | None,
    template_kwargs: dict[str, Any] | None,
    include_reasoning: bool = True,
    parallel: bool | None = None,
) -> dict[str, Any]:
    """What the model replica's parsers need (forced calls are this module's: `none` there)."""
    return {
        "tools": for_template(tools) if tools else None,
        "tool_choice": "none" if (forced(choice) or not tools) else (choice or "auto"),
        "chat_template_kwargs": template_kwargs,
        "include_reasoning": include_reasoning,
        "parallel_tool_calls": parallel,
    }
