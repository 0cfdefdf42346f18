"""Server-sent events for streamed completions: the model replica's chunks rendered as OpenAI
`chat.completion.chunk` / `text_completion` events, usage, errors mid-stream and `[DONE]`."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from deployments.api import errors, tools
from deployments.api.errors import APIError
from deployments.api.protocol import GenerationChunk
from deployments.api.responses import chat_chunk, completion_chunk, echoed_logprobs, usage, usage_chunk

SSE_DONE = b"data: [DONE]\n\n"
MEDIA_TYPE = "text/event-stream"


def sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


@dataclass
class StreamContext:
    """What a stream's events carry besides the chunks: identity, usage options, deadline."""

    chat: bool
    request_id: str
    model: str
    created: int
    prompt_tokens: int
    include_usage: bool
    continuous_usage: bool
    deadline: float  # time.monotonic()
    timeout_s: float
    n: int = 1
    logprobs: bool = False
    echo: str = ""  # completions: the prompt text each choice's first chunk starts with
    forced: Any = None  # chat: the tool_choice that forces a call (its output becomes tool-call deltas)


class ChunkRenderer:
    """A model chunk → its SSE bytes. The hot path (one choice, no logprobs): a content chunk is
    a fixed prefix + the JSON-escaped text + a fixed suffix, so only the text is serialised."""

    def __init__(self, ctx: StreamContext, trace):
        self.ctx, self.trace = ctx, trace
        self.completion_tokens = 0
        self.fast = ctx.n == 1 and not ctx.logprobs and not ctx.echo and ctx.forced is None
        self.offsets = [0] * ctx.n  # completions: each choice's text length so far
        self.echoed = [False] * ctx.n
        self.forced = [tools.ForcedCallStream(ctx.forced) for _ in range(ctx.n)] if ctx.forced is not None else None
        self.called = [False] * ctx.n
        template = (
            chat_chunk(ctx.request_id, ctx.model, ctx.created, {"content": "\0"})
            if ctx.chat
            else completion_chunk(ctx.request_id, ctx.model, ctx.created, "\0")
        )
        self.head, self.tail = sse(template).split(b'"\\u0000"')

    def role(self) -> bytes:
        c = self.ctx
        if not c.chat:
            return b""
        return b"".join(
            sse(chat_chunk(c.request_id, c.model, c.created, {"role": "assistant", "content": ""}, index=i))
            for i in range(c.n)
        )

    def chunk(self, chunk: GenerationChunk) -> bytes | None:
        self.completion_tokens += chunk.num_tokens
        self.trace.chunk(chunk.num_tokens)
        if not (chunk.text or chunk.finish_reason or chunk.logprobs or chunk.reasoning or chunk.tool_calls):
            return None  # an incomplete UTF-8 sequence: its text comes with the next chunk
        c = self.ctx
        if (
            self.fast
            and chunk.finish_reason is None
            and not c.continuous_usage
            and chunk.reasoning is None
            and not chunk.tool_calls
        ):
            return self.head + json.dumps(chunk.text, ensure_ascii=False).encode() + self.tail
        use = self.usage() if c.continuous_usage else None
        if c.chat:
            delta, finish = self.delta(chunk)
            if not delta and finish is None and not chunk.logprobs:
                return None
            return sse(chat_chunk(c.request_id, c.model, c.created, delta, finish, use, chunk.index, chunk.logprobs))
        text, logprobs = chunk.text, chunk.logprobs
        if c.echo and not self.echoed[chunk.index]:
            self.echoed[chunk.index] = True
            text, logprobs = c.echo + text, echoed_logprobs(chunk)
        offset = self.offsets[chunk.index]
        self.offsets[chunk.index] += len(text)
        return sse(
            completion_chunk(
                c.request_id, c.model, c.created, text, chunk.finish_reason, use, chunk.index, logprobs, offset
            )
        )

    def delta(self, chunk: GenerationChunk) -> tuple[dict[str, Any], str | None]:
        """A chat chunk's delta (content, reasoning, tool calls) and finish reason."""
        delta: dict[str, Any] = {}
        finish = chunk.finish_reason
        if self.forced is not None:  # the output is the forced call's JSON
            calls = self.forced[chunk.index].feed(chunk.text, finish is not None)
            self.called[chunk.index] |= bool(calls)
            if calls:
                delta["tool_calls"] = calls
            finish = tools.finish_reason(self.ctx.forced, self.called[chunk.index], finish)
        else:
            if chunk.text or not (chunk.reasoning or chunk.tool_calls):
                delta["content"] = chunk.text
            if chunk.tool_calls:
                delta["tool_calls"] = chunk.tool_calls
        if chunk.reasoning:
            delta["reasoning_content"] = delta["reasoning"] = chunk.reasoning
        return delta, finish

    def usage(self) -> dict[str, int]:
        return usage(self.ctx.prompt_tokens, self.completion_tokens)

    def usage_event(self) -> bytes:
        c = self.ctx
        obj = "chat.completion.chunk" if c.chat else "text_completion"
        return sse(usage_chunk(c.request_id, c.model, c.created, obj, self.usage()))

    def end(self) -> bytes:
        """The stream's last bytes once the model is done: usage (when asked for) and [DONE]."""
        return (self.usage_event() if self.ctx.include_usage else b"") + SSE_DONE

    def fail(self, exc: APIError) -> bytes:
        self.trace.finished(exc.status, exc.code, completion_tokens=self.completion_tokens)
        return sse(exc.body()) + SSE_DONE


async def stream_events(
    ctx: StreamContext,
    first: GenerationChunk | None,
    stream,
    trace,
    release,
    unavailable: tuple[type[BaseException], ...],
    out: ChunkRenderer | None = None,
    lost: Callable[[], None] = lambda: None,
) -> AsyncIterator[bytes]:
    """The response body of a streamed completion. `first` is the chunk already received (the
    call's admission), `stream` the rest; `release()` frees the request's admission slot when
    the stream ends, however it ends (the client leaving cancels the model call, which aborts
    the engine request). Fewer, larger writes (each costs a send through the ASGI stack and a
    syscall): the role chunk goes out with the first content, the last content with usage and
    [DONE]. `out` renders the chunks (default: chat or completions chunks; the Responses API
    passes its own). `lost()` is told when the stream ends because its model replica or engine
    died (`ModelCalls.lost`: /health reads it), as a failed unary call tells it."""
    out = out or ChunkRenderer(ctx, trace)
    done = False
    held = out.role()
    try:
        if first is not None and (data := out.chunk(first)):
            held += data
        if first is not None and first.finish_reason is None and held:
            yield held
            held = b""
        try:
            loop_deadline = asyncio.get_running_loop().time() + (ctx.deadline - time.monotonic())
            async with asyncio.timeout_at(loop_deadline):
                async for chunk in stream:
                    if data := out.chunk(chunk):
                        if chunk.finish_reason is None:
                            yield held + data if held else data
                            held = b""
                        else:
                            held += data
        except TimeoutError:
            yield held + out.fail(errors.timed_out(ctx.timeout_s))
            return
        except APIError as exc:
            if errors.is_engine_loss(exc):
                lost()
            yield held + out.fail(exc)
            return
        except unavailable:
            lost()
            yield held + out.fail(errors.engine_unavailable("The model replica failed mid-stream."))
            return
        done = True
        trace.finished(200, completion_tokens=out.completion_tokens)
        yield held + out.end()
    finally:
        release()
        if not done:
            # Client gone, deadline passed or replica failed: release the engine request.
            stream.cancel()
            trace.finished(499, "client_closed", completion_tokens=out.completion_tokens)
