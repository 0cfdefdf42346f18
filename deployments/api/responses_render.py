"""A Responses API answer from the chat path's output: the Response object of a chat completion
(`ResponsesRendering.unary`) or OpenAI's ResponseStreamEvent sequence from the chat deltas
(`ResponseStreamRenderer`); the event order is in `serving_responses`' docstring."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from deployments.api import sse, tools
from deployments.api.errors import APIError
from deployments.api.generation import check_max_tokens
from deployments.api.protocol import GenerationChunk
from deployments.api.responses_protocol import (
    ResponsesRequest,
    ToolChoiceFunction,
)
from deployments.config import LimitsConfig

ENDPOINT = "/v1/responses"


def new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex


# --------------------------------------------------------------------------- chat → Response


def usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    """OpenAI's ResponseUsage (prefix-cache hits and reasoning tokens are not counted: 0)."""
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


def message_item(text: str, logprobs: list[dict[str, Any]], status: str = "completed") -> dict[str, Any]:
    return {
        "id": new_id("msg_"),
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}],
    }


def reasoning_item(text: str, status: str = "completed") -> dict[str, Any]:
    return {
        "id": new_id("rs_"),
        "type": "reasoning",
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
        "status": status,
    }


def function_call_item(call_id: str, name: str, arguments: str, status: str = "completed") -> dict[str, Any]:
    return {
        "id": new_id("fc_"),
        "type": "function_call",
        "status": status,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
    }


class ResponsesRendering:
    """One request's Response objects and stream events, from the chat path's results
    (`generation.Rendering`)."""

    id_prefix = "resp_"
    endpoint = ENDPOINT

    def __init__(self, body: ResponsesRequest, limits: LimitsConfig):
        self.body = body
        self.temperature = limits.default_temperature if body.temperature is None else body.temperature
        self.max_output_tokens = check_max_tokens(body.max_output_tokens, limits.default_max_tokens_chat, limits)

    def response(
        self,
        rid: str,
        model: str,
        created: int,
        status: str,
        output: list[dict[str, Any]],
        use: dict[str, Any] | None,
        error: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The Response object: the output, and the request's settings as they were applied."""
        b = self.body
        fmt = b.text.format if b.text and b.text.format else None
        if isinstance(b.tool_choice, ToolChoiceFunction):
            tool_choice: Any = {"type": "function", "name": b.tool_choice.name}
        else:
            tool_choice = b.tool_choice or ("auto" if b.tools else "none")
        out: dict[str, Any] = {
            "id": rid,
            "object": "response",
            "created_at": created,
            "status": status,
            "completed_at": int(time.time()) if status == "completed" else None,
            "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": b.instructions,
            "model": model,
            "output": output,
            "parallel_tool_calls": b.parallel_tool_calls is not False,
            "tool_choice": tool_choice,
            "tools": [
                {
                    "type": "function",
                    "name": t.name,
                    "description": t.description,
                    "parameters": t.parameters,
                    "strict": t.strict,
                }
                for t in b.tools or ()
            ],
            "temperature": self.temperature,
            "top_p": 1.0 if b.top_p is None else b.top_p,
            "max_output_tokens": self.max_output_tokens,
            "max_tool_calls": b.max_tool_calls,
            "previous_response_id": None,
            "reasoning": None,
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
            "truncation": "disabled",
            "background": False,
            "service_tier": "default",
            "top_logprobs": b.top_logprobs,
            "metadata": b.metadata,
            "safety_identifier": b.safety_identifier,
            "prompt_cache_key": b.prompt_cache_key,
        }
        if use is not None:  # OpenAI's document: an object when present (not nullable)
            out["usage"] = use
        if b.user is not None:
            out["user"] = b.user
        return out

    def unary(self, completion: dict[str, Any]) -> dict[str, Any]:
        """The Response of a chat completion (one choice): reasoning, the message, the calls."""
        choice = completion["choices"][0]
        message = choice["message"]
        items: list[dict[str, Any]] = []
        if message.get("reasoning_content"):
            items.append(reasoning_item(message["reasoning_content"]))
        if message.get("content"):
            logprobs = (choice.get("logprobs") or {}).get("content") or []
            items.append(message_item(message["content"], logprobs if self.body.wants_logprobs() else []))
        for call in message.get("tool_calls") or ():
            items.append(function_call_item(call["id"], call["function"]["name"], call["function"]["arguments"]))
        status = "incomplete" if choice["finish_reason"] == "length" else "completed"
        if status == "incomplete" and items:
            items[-1]["status"] = "incomplete"
        u = completion["usage"]
        return self.response(
            completion["id"],
            completion["model"],
            completion["created"],
            status,
            items,
            usage(u["prompt_tokens"], u["completion_tokens"]),
        )

    def stream(self, ctx: sse.StreamContext, trace) -> ResponseStreamRenderer:
        return ResponseStreamRenderer(ctx, trace, self)


class ResponseStreamRenderer(sse.ChunkRenderer):
    """The model's chunks as Responses stream events. The chat deltas (`ChunkRenderer.delta`:
    content, reasoning, tool calls — forced calls included) open, grow and close output items;
    `role()` is the stream's start, `end()` its last item's close and the final Response."""

    def __init__(self, ctx: sse.StreamContext, trace, rendering: ResponsesRendering):
        super().__init__(ctx, trace)
        self.rendering = rendering
        self.logprobs = rendering.body.wants_logprobs()
        self.seq = 0
        self.items: list[dict[str, Any]] = []  # the output so far, each item as it stands
        self.open: str | None = None  # the kind of the last item while it is open
        self.text = ""  # the open message's or reasoning's text
        self.entries: list[dict[str, Any]] = []  # the open message's logprobs
        self.pending: list[dict[str, Any]] = []  # logprobs of tokens whose text has not come yet
        self.calls: dict[int, int] = {}  # a chat tool-call index → its output index
        self.finish: str | None = None

    def event(self, kind: str, **fields: Any) -> bytes:
        data = json.dumps(
            {"type": kind, **fields, "sequence_number": self.seq}, ensure_ascii=False, separators=(",", ":")
        )
        self.seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + data.encode() + b"\n\n"

    def snapshot(self, status: str, use: dict[str, Any] | None, error: dict[str, Any] | None = None):
        c = self.ctx
        return self.rendering.response(c.request_id, c.model, c.created, status, self.items, use, error)

    # ------------------------------------------------------------------ ChunkRenderer's hooks

    def role(self) -> bytes:
        response = self.snapshot("in_progress", None)
        return self.event("response.created", response=response) + self.event("response.in_progress", response=response)

    def chunk(self, chunk: GenerationChunk) -> bytes | None:
        self.completion_tokens += chunk.num_tokens
        self.trace.chunk(chunk.num_tokens)
        if chunk.finish_reason is not None:
            self.finish = chunk.finish_reason
        if not (chunk.text or chunk.finish_reason or chunk.logprobs or chunk.reasoning or chunk.tool_calls):
            return None  # an incomplete UTF-8 sequence: its text comes with the next chunk
        delta, _ = self.delta(chunk)
        out: list[bytes] = []
        if delta.get("reasoning_content"):
            out += self.grow("reasoning", delta["reasoning_content"])
        if self.logprobs and chunk.logprobs and self.forced is None:
            self.pending += [
                {
                    "token": t,
                    "logprob": lp,
                    "bytes": list(t.encode("utf-8", "surrogatepass")),
                    "top_logprobs": [
                        {"token": a, "logprob": alp, "bytes": list(a.encode("utf-8", "surrogatepass"))}
                        for a, alp in alts
                    ],
                }
                for t, lp, alts in chunk.logprobs
            ]
        if delta.get("content"):
            out += self.grow("message", delta["content"], self.pending)
            self.pending = []  # tokens without text (an unfinished character) go with the next text
        for call in delta.get("tool_calls") or ():
            out += self.call(call)
        return b"".join(out) or None

    def end(self) -> bytes:
        incomplete = self.finish == "length"
        status = "incomplete" if incomplete else "completed"
        out = self.close(status)
        response = self.snapshot(status, usage(self.ctx.prompt_tokens, self.completion_tokens))
        out.append(self.event("response.incomplete" if incomplete else "response.completed", response=response))
        return b"".join(out)

    def fail(self, exc: APIError) -> bytes:
        """The stream's end when generation failed (deadline, replica lost): OpenAI's `error`
        event with this service's code, then `response.failed`."""
        self.trace.finished(exc.status, exc.code, completion_tokens=self.completion_tokens)
        if self.open is not None:
            self.items[-1]["status"] = "incomplete"
        error = self.event(
            "error", code=None if exc.code is None else str(exc.code), message=exc.message, param=exc.param
        )
        failed = self.snapshot("failed", None, {"code": "server_error", "message": exc.message})
        return error + self.event("response.failed", response=failed)

    # ------------------------------------------------------------------ output items

    def grow(self, kind: str, text: str, logprobs: list[dict[str, Any]] | None = None) -> list[bytes]:
        """Text for a message or reasoning item: opens one unless that kind is open."""
        out = [] if self.open == kind else self.close() + self.start(kind)
        index = len(self.items) - 1
        item_id = self.items[index]["id"]
        self.text += text
        if kind == "message":
            self.entries += logprobs or []
            out.append(
                self.event(
                    "response.output_text.delta",
                    item_id=item_id,
                    output_index=index,
                    content_index=0,
                    delta=text,
                    logprobs=logprobs or [],
                )
            )
        else:
            out.append(
                self.event(
                    "response.reasoning_text.delta", item_id=item_id, output_index=index, content_index=0, delta=text
                )
            )
        return out

    def start(self, kind: str) -> list[bytes]:
        item: dict[str, Any]
        if kind == "message":
            item = message_item("", [], "in_progress")
            part: dict[str, Any] = item["content"].pop()
        else:
            item = reasoning_item("", "in_progress")
            part = item["content"].pop()
        self.items.append(item)
        self.open, self.text, self.entries = kind, "", []
        index = len(self.items) - 1
        return [
            self.event("response.output_item.added", output_index=index, item=item),
            self.event(
                "response.content_part.added", item_id=item["id"], output_index=index, content_index=0, part=part
            ),
        ]

    def call(self, call: dict[str, Any]) -> list[bytes]:
        """A tool-call delta (OpenAI's chat stream format): a new index opens a function_call item."""
        fn = call.get("function") or {}
        out: list[bytes] = []
        if call.get("index", 0) not in self.calls:
            out += self.close()
            item = function_call_item(call.get("id") or tools.call_id(), fn.get("name") or "", "", "in_progress")
            self.items.append(item)
            self.calls[call.get("index", 0)] = len(self.items) - 1
            self.open = "call"
            out.append(self.event("response.output_item.added", output_index=len(self.items) - 1, item=item))
        index = self.calls[call.get("index", 0)]
        item = self.items[index]
        if fn.get("arguments"):
            item["arguments"] += fn["arguments"]
            out.append(
                self.event(
                    "response.function_call_arguments.delta",
                    item_id=item["id"],
                    output_index=index,
                    delta=fn["arguments"],
                )
            )
        return out

    def close(self, status: str = "completed") -> list[bytes]:
        """The open item's done events (none open: none)."""
        if self.open is None:
            return []
        index = len(self.items) - 1
        item = self.items[index]
        item["status"] = status
        where = {"item_id": item["id"], "output_index": index}
        out: list[bytes] = []
        if self.open == "message":
            self.entries += self.pending
            self.pending = []
            part = {"type": "output_text", "text": self.text, "annotations": [], "logprobs": self.entries}
            out.append(
                self.event("response.output_text.done", **where, content_index=0, text=self.text, logprobs=self.entries)
            )
            out.append(self.event("response.content_part.done", **where, content_index=0, part=part))
            item["content"] = [part]
        elif self.open == "reasoning":
            part = {"type": "reasoning_text", "text": self.text}
            out.append(self.event("response.reasoning_text.done", **where, content_index=0, text=self.text))
            out.append(self.event("response.content_part.done", **where, content_index=0, part=part))
            item["content"] = [part]
        else:
            out.append(
                self.event(
                    "response.function_call_arguments.done", **where, name=item["name"], arguments=item["arguments"]
                )
            )
        out.append(self.event("response.output_item.done", output_index=index, item=item))
        self.open, self.text, self.entries = None, "", []
        return out
