"""Chat and text completions: request → sampling parameters, tokenizer call, model call
(through the capacity gate), and the OpenAI response (JSON, or SSE via `sse`). One
`ServingGeneration` per ingress replica serves both endpoints."""

from __future__ import annotations

import asyncio
import time
import uuid
import weakref
from collections.abc import Callable
from typing import Any, Protocol

from fastapi.responses import JSONResponse, StreamingResponse

from deployments.admission.capacity import (
    ANONYMOUS,
    ModelCalls,
    Tenant,
    dependency_call,
    engine_priority,
)
from deployments.api import errors, sse, tools
from deployments.api.models import ModelDirectory
from deployments.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    SamplingFields,
)
from deployments.api.responses import (
    chat_choice,
    chat_completion,
    chat_message,
    echoed_logprobs,
    text_choice,
    text_completion,
)
from deployments.config import LimitsConfig, ModelConfig

# Fields passed to vLLM's SamplingParams when the client set them.
_PASSTHROUGH = (
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "stop_token_ids",
)


def request_id() -> str:
    """Serve's request id: the one in its JSON log lines and in the `X-Request-Id` response
    header (a client-sent `X-Request-Id` is kept), so a response, its logs and its metrics join."""
    try:
        from ray.serve.context import _get_serve_request_context

        rid = _get_serve_request_context().request_id
    except Exception:
        rid = ""
    return rid or uuid.uuid4().hex


def check_max_tokens(requested: int | None, default: int, limits: LimitsConfig) -> int:
    value = default if requested is None else requested
    cap = limits.max_tokens_cap
    if value > cap and limits.max_tokens_over_cap == "clamp":
        return cap
    if value > cap:
        raise errors.bad_request(
            f"max_tokens is {value}, above this service's cap of {cap}.", "max_tokens", "max_tokens_too_large"
        )
    return value


def sampling_params(body: SamplingFields, max_tokens: int, limits: LimitsConfig) -> dict[str, Any]:
    """The request's vLLM `SamplingParams` keyword arguments (the model replica builds them)."""
    temperature = limits.default_temperature if body.temperature is None else body.temperature
    s: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": temperature,
        "ignore_eos": body.ignore_eos,
        "min_tokens": body.min_tokens,
        "include_stop_str_in_output": body.include_stop_str_in_output,
        "skip_special_tokens": body.skip_special_tokens,
        "spaces_between_special_tokens": body.spaces_between_special_tokens,
    }
    if body.min_tokens > max_tokens:
        raise errors.bad_request(
            f"min_tokens ({body.min_tokens}) must not exceed max_tokens ({max_tokens}).", "min_tokens"
        )
    if body.stop:
        s["stop"] = body.stop
    for name in _PASSTHROUGH:
        value = getattr(body, name)
        if value is not None:
            s[name] = value
    if s.get("top_k") == 0:
        s["top_k"] = -1
    if body.n > limits.max_n:
        raise errors.bad_request(f"n is {body.n}, above this service's limit of {limits.max_n}.", "n")
    if body.n > 1:
        s["n"] = body.n
    if (k := body.num_logprobs()) is not None:
        s["logprobs"] = k
        if isinstance(body, CompletionRequest) and body.echo:
            s["prompt_logprobs"] = k  # the echoed prompt's tokens get theirs too
    if body.logit_bias:
        s["logit_bias"] = body.logit_bias
    try:
        structured = body.structured()
    except ValueError as exc:
        raise errors.bad_request(str(exc), "response_format") from None
    if isinstance(body, ChatCompletionRequest) and tools.forced(body.tool_choice):
        if structured is not None:
            raise errors.bad_request(
                "tool_choice forces a tool call; it cannot be combined with response_format or structured_outputs.",
                "tool_choice",
            )
        assert body.tools  # tools.check: a forced tool_choice needs tools
        structured = {"json": tools.forced_schema(body.tools, body.tool_choice, body.parallel_tool_calls)}
    if structured is not None:
        s["structured_outputs"] = structured  # compact JSON: engine.structured_outputs
    return s


class Rendering(Protocol):
    """Another API served by the chat path, its answers built from chat's (the Responses API:
    `serving_responses.py`)."""

    id_prefix: str
    endpoint: str  # the metrics' and traces' endpoint label

    def unary(self, completion: dict[str, Any]) -> dict[str, Any]:
        """The answer, from the chat completion's."""
        ...

    def stream(self, ctx: sse.StreamContext, trace) -> sse.ChunkRenderer:
        """The renderer of a streamed answer's events."""
        ...


def _abandon(slot, stream, trace) -> None:
    """A stream whose body never ran its `finally` (never iterated: the client left before
    its first byte went out): its slot is still held and its model call still running, which
    would leave the engine generating to max_tokens. Free the slot and cancel the call, which
    aborts the engine request (the model replica's generator is cancelled)."""
    if slot.owner is not None:
        slot.release()
        stream.cancel()
        trace.finished(499, "client_closed")


class _ModelStream(StreamingResponse):
    """The SSE response of a model stream: however sending it ends (finished, the client gone
    mid-way, or before the body was ever iterated: Starlette stops at `http.response.start` or
    on `http.disconnect` without starting it), the body is closed and the model call
    released with it (`_abandon`)."""

    def __init__(self, events, slot, stream, trace):
        super().__init__(events, media_type=sse.MEDIA_TYPE, headers={"Cache-Control": "no-cache"})
        self._events, self._model_call = events, (slot, stream, trace)

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()  # a suspended body runs its own `finally` (usage, 499)
            _abandon(*self._model_call)  # one that never started has none


class ServingGeneration:
    """POST /v1/chat/completions and /v1/completions."""

    def __init__(
        self, tokenizer, models: ModelDirectory, calls: ModelCalls, limits: LimitsConfig, stats, model: ModelConfig
    ):
        self.tokenizer, self.models, self.calls = tokenizer, models, calls
        self.limits, self.stats = limits, stats
        self.auto_tools = model.tool_call_parser is not None
        self.reasoning = model.reasoning_parser is not None
        self.unavailable = errors.unavailable_types()

    async def chat(self, body: ChatCompletionRequest, who: Tenant = ANONYMOUS, rendering: Rendering | None = None):
        """`rendering`: another API's answer built from this one's (the Responses API's)."""

        def prepare():
            max_tokens = check_max_tokens(
                body.max_completion_tokens or body.max_tokens, self.limits.default_max_tokens_chat, self.limits
            )
            if len(body.messages) > self.limits.max_messages:
                raise errors.bad_request(
                    f"messages: at most {self.limits.max_messages} messages per request (got {len(body.messages)})",
                    "messages",
                    "too_many_messages",
                )
            tools.check(body.tools, body.tool_choice, body.parallel_tool_calls, self.auto_tools)
            messages = [m.for_template() for m in body.messages]
            template_tools = tools.for_template(body.tools) if body.tools else None
            return max_tokens, lambda: self.tokenizer.encode_chat.remote(
                messages, max_tokens, body.add_generation_prompt, body.chat_template_kwargs, template_tools
            )

        return await self._serve(body, who, True, prepare, rendering)

    async def completion(self, body: CompletionRequest, who: Tenant = ANONYMOUS):
        def prepare():
            max_tokens = check_max_tokens(body.max_tokens, self.limits.default_max_tokens_completion, self.limits)
            return max_tokens, lambda: self.tokenizer.encode_prompt.remote(body.prompt, max_tokens)

        return await self._serve(body, who, False, prepare)

    async def _serve(
        self,
        body: SamplingFields,
        who: Tenant,
        chat: bool,
        prepare: Callable[[], tuple[int, Callable]],
        rendering: Rendering | None = None,
    ):
        """Validate (`prepare` → max_tokens and the tokenizer call), tokenize, generate."""
        rid = (rendering.id_prefix if rendering else "chatcmpl-" if chat else "cmpl-") + request_id()
        endpoint = rendering.endpoint if rendering else "/v1/chat/completions" if chat else "/v1/completions"
        trace = self.stats.request_started(endpoint, request_id=rid, stream=body.stream)
        timeout = min(body.timeout or self.limits.request_timeout_s, self.limits.request_timeout_s)
        deadline = time.monotonic() + timeout
        created = int(time.time())
        slot = None
        try:
            model_name, mux = await self.models.resolve(body.model)
            unary, streaming = self.models.handles(mux)
            max_tokens, encode = prepare()
            slot = self.calls.admit(who, body.n, body.priority)  # n choices: n engine sequences
            async with asyncio.timeout(timeout):
                enc = await dependency_call(encode(), "tokenizer")
                echo = await self._echo_text(body)
                trace.tokenized(len(enc.token_ids))
                parse = None
                if isinstance(body, ChatCompletionRequest) and (
                    self.reasoning or tools.parsed(body.tools, body.tool_choice)
                ):
                    parse = tools.parse_spec(
                        body.tools,
                        body.tool_choice,
                        body.chat_template_kwargs,
                        body.include_reasoning,
                        body.parallel_tool_calls,
                    )
                greq = GenerationRequest(
                    rid,
                    enc.token_ids,
                    sampling_params(body, max_tokens, self.limits),
                    mux,
                    parse,
                    engine_priority(body.priority, who),
                    body.session_key(),
                )
                trace.dispatched()
                if not body.stream:
                    _, outs = await self.calls.start(slot, lambda: unary.generate.remote(greq))
                    slot.release()
                    completion_tokens = sum(o.num_tokens for o in outs)
                    trace.finished(200, completion_tokens=completion_tokens)
                    result = self._response(
                        body, rid, model_name, created, outs, echo, len(enc.token_ids), completion_tokens
                    )
                    return JSONResponse(rendering.unary(result) if rendering else result)
                stream, first = await self.calls.start(
                    slot, lambda: streaming.generate_stream.remote(greq), lambda stream: stream.__anext__()
                )
        except TimeoutError:
            if slot is not None:
                slot.release()
            trace.finished(504, "timeout")
            raise errors.timed_out(timeout) from None
        except BaseException as exc:
            if slot is not None:
                slot.release()
            trace.failed(exc)
            raise
        ctx = sse.StreamContext(
            chat,
            rid,
            model_name,
            created,
            len(enc.token_ids),
            body.include_usage(),
            body.continuous_usage(),
            deadline,
            timeout,
            body.n,
            body.num_logprobs() is not None,
            echo,
            body.tool_choice if isinstance(body, ChatCompletionRequest) and tools.forced(body.tool_choice) else None,
        )
        out = rendering.stream(ctx, trace) if rendering else None
        events = sse.stream_events(ctx, first, stream, trace, slot.release, self.unavailable, out, self.calls.lost)
        # also when the response is never sent at all (its task cancelled before it was called)
        weakref.finalize(events, _abandon, slot, stream, trace)
        return _ModelStream(events, slot, stream, trace)

    async def _echo_text(self, body: SamplingFields) -> str:
        """Completions `echo`: the prompt's text (a token-id prompt's, decoded)."""
        if not isinstance(body, CompletionRequest) or not body.echo:
            return ""
        if isinstance(body.prompt, str):
            return body.prompt
        return await dependency_call(self.tokenizer.detokenize.remote(body.prompt), "tokenizer")

    @staticmethod
    def _response(
        body: SamplingFields,
        rid: str,
        model: str,
        created: int,
        outs,
        echo: str,
        prompt_tokens: int,
        completion_tokens: int,
    ) -> dict[str, Any]:
        """The non-streaming OpenAI response, one choice per engine sequence."""
        if isinstance(body, ChatCompletionRequest):
            choices = []
            for o in outs:
                content, calls, finish = o.text, o.tool_calls, o.finish_reason
                if tools.forced(body.tool_choice):  # the output is the call's constrained JSON
                    calls = tools.forced_calls(o.text, body.tool_choice) if o.text else []
                    content, finish = None, tools.finish_reason(body.tool_choice, bool(calls), o.finish_reason)
                choices.append(chat_choice(o.index, chat_message(content, calls, o.reasoning), finish, o.logprobs))
            return chat_completion(rid, model, created, choices, prompt_tokens, completion_tokens)
        choices = [text_choice(o.index, echo + o.text, o.finish_reason, echoed_logprobs(o)) for o in outs]
        return text_completion(rid, model, created, choices, prompt_tokens, completion_tokens)
