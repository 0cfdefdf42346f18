"""A streamed completion whose body is never iterated (the client gone before its first byte
went out) must abort its engine request, not only free its admission slot (issue 24).

The mechanism, on the session app's real engine: a model-replica stream that is dropped without
`cancel()` (what the ingress did with a body that never ran) leaves the engine generating to
`max_tokens`; `cancel()` aborts it. Then, in process with the ingress's generation code and a
fake model call: every way a streamed response can end without its body running cancels the
call (which is what aborts the engine request), and a finished stream costs no cancel.
"""

from __future__ import annotations

import asyncio
import gc
import time

import pytest

from deployments.admission.capacity import ModelCalls, ModelCapacity
from deployments.api.generation import ServingGeneration
from deployments.api.protocol import ChatCompletionRequest, EncodedPrompt, GenerationChunk, GenerationRequest
from deployments.config import LimitsConfig, ModelConfig

# ------------------------------------------------------------------ in process


class _Call:
    """A remote call's result: awaitable once."""

    def __init__(self, value):
        self.value = value

    def __await__(self):
        async def get():
            return self.value

        return get().__await__()


class _Stream:
    """Serve's DeploymentResponseGenerator for `generate_stream`: chunks, and `cancel()`."""

    def __init__(self, n: int = 3):
        self.chunks = [GenerationChunk(f"t{i}", 1) for i in range(n - 1)] + [GenerationChunk("end", 1, "stop")]
        self.cancelled = 0

    def __aiter__(self):
        return self

    async def __anext__(self):
        await asyncio.sleep(0)
        if not self.chunks:
            raise StopAsyncIteration
        return self.chunks.pop(0)

    def cancel(self):
        self.cancelled += 1


class _Trace:
    def __init__(self):
        self.statuses: list[int] = []

    def finished(self, status=200, code=None, completion_tokens=None, reason=None):
        if not self.statuses:
            self.statuses.append(status)

    def failed(self, exc):
        self.finished(599)

    def __getattr__(self, name):  # tokenized, dispatched, chunk, first_token, …
        return lambda *a, **k: None


class _Stats:
    def __init__(self):
        self.traces: list[_Trace] = []

    def request_started(self, *a, **k):
        self.traces.append(_Trace())
        return self.traces[-1]


class _Handle:
    def __init__(self, make):
        self.make = make

    def __getattr__(self, name):
        return self

    def remote(self, *a):
        return self.make()


class _Models:
    def __init__(self, streams: list[_Stream]):
        self.streams = streams

    async def resolve(self, model):
        return "tiny-qwen3", None

    def handles(self, mux):
        def new_stream():
            self.streams.append(_Stream())
            return self.streams[-1]

        return None, _Handle(new_stream)


def serving() -> tuple[ServingGeneration, list[_Stream], ModelCapacity, _Stats]:
    streams: list[_Stream] = []
    capacity = ModelCapacity(limit=4)
    tokenizer = _Handle(lambda: _Call(EncodedPrompt([1, 2, 3])))
    stats = _Stats()
    gen = ServingGeneration(
        tokenizer, _Models(streams), ModelCalls(capacity, 1.0), LimitsConfig(), stats, ModelConfig()
    )
    return gen, streams, capacity, stats


BODY = {"model": "tiny-qwen3", "stream": True, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}


async def _send_ok(message):
    await asyncio.sleep(0)


async def _receive_nothing():
    await asyncio.sleep(3600)
    return {"type": "http.disconnect"}


def test_a_finished_stream_is_not_cancelled():
    async def run():
        gen, streams, capacity, stats = serving()
        sent = []

        async def send(message):
            sent.append(message)

        response = await gen.chat(ChatCompletionRequest.model_validate(BODY))
        await response({"type": "http", "asgi": {"spec_version": "2.4"}}, _receive_nothing, send)
        return streams, capacity, stats, sent

    streams, capacity, stats, sent = asyncio.run(run())
    assert b"[DONE]" in b"".join(m.get("body", b"") for m in sent)
    assert streams[0].cancelled == 0 and capacity.in_flight == 0 and stats.traces[0].statuses == [200]


def test_client_gone_at_the_response_start_aborts_the_model_call():
    """ASGI ≥ 2.4: the send of `http.response.start` fails (the client left): Starlette raises
    before iterating the body."""

    async def run():
        gen, streams, capacity, stats = serving()

        async def send(message):
            raise OSError("connection reset")

        response = await gen.chat(ChatCompletionRequest.model_validate(BODY))
        with pytest.raises(Exception):  # noqa: B017  # Starlette's ClientDisconnect
            await response({"type": "http", "asgi": {"spec_version": "2.4"}}, _receive_nothing, send)
        return streams, capacity, stats

    streams, capacity, stats = asyncio.run(run())
    assert streams[0].cancelled == 1 and capacity.in_flight == 0 and stats.traces[0].statuses == [499]


def test_disconnect_before_the_first_byte_aborts_the_model_call():
    """ASGI < 2.4 (Serve's replicas): `http.disconnect` arrives while the response start is
    being sent; Starlette cancels the sending task before it iterates the body."""

    async def run():
        gen, streams, capacity, stats = serving()

        async def send(message):
            await asyncio.sleep(0.2)

        async def receive():
            return {"type": "http.disconnect"}

        response = await gen.chat(ChatCompletionRequest.model_validate(BODY))
        await response({"type": "http", "asgi": {"spec_version": "2.3"}}, receive, send)
        return streams, capacity, stats

    streams, capacity, stats = asyncio.run(run())
    assert streams[0].cancelled == 1 and capacity.in_flight == 0 and stats.traces[0].statuses == [499]


def test_a_response_never_sent_aborts_the_model_call():
    """The request's task cancelled after the route returned, before the response was called:
    the body is garbage and its model call is cancelled with it."""

    async def run():
        gen, streams, capacity, stats = serving()
        response = await gen.chat(ChatCompletionRequest.model_validate(BODY))
        del response
        gc.collect()
        return streams, capacity, stats

    streams, capacity, stats = asyncio.run(run())
    assert streams[0].cancelled == 1 and capacity.in_flight == 0 and stats.traces[0].statuses == [499]


def test_client_gone_mid_stream_still_reports_what_was_sent():
    async def run():
        gen, streams, capacity, stats = serving()
        n = 0

        async def send(message):
            nonlocal n
            n += 1
            if n == 3:  # the start, one body chunk, then the client is gone
                raise OSError("connection reset")

        response = await gen.chat(ChatCompletionRequest.model_validate({**BODY, "max_tokens": 50}))
        streams_ = streams
        streams_[0].chunks = [GenerationChunk(f"t{i}", 1) for i in range(20)]
        with pytest.raises(Exception):  # noqa: B017
            await response({"type": "http", "asgi": {"spec_version": "2.4"}}, _receive_nothing, send)
        return streams, capacity, stats

    streams, capacity, stats = asyncio.run(run())
    assert streams[0].cancelled == 1 and capacity.in_flight == 0 and stats.traces[0].statuses == [499]


# ------------------------------------------------------------------ the engine (session app)


def _unfinished(model) -> int:
    return model.health.remote().result(timeout_s=30)["num_unfinished_requests"]


def _generated(model) -> float:
    """The engine's `vllm:generation_tokens` so far (every token it generated)."""
    snap = model.engine_metrics.remote().result(timeout_s=30)
    if snap is None:
        pytest.skip("observability.engine_metrics is off")
    return sum(v for name, _, v in snap["metrics"] if name == "vllm:generation_tokens")


def test_a_dropped_model_stream_keeps_the_engine_generating_until_cancelled(base_url, hf_tokenizer):
    """What the fix relies on, on the real engine and Serve's default transport between
    deployments (actor calls; the fast path's gRPC calls are cancelled when garbage-collected):
    the model replica's stream dropped without `cancel()` keeps its engine request running to
    max_tokens; `cancel()` aborts it. Counted in tokens the engine generated, not in time (a
    loaded 2-core machine makes timings noisy)."""
    import uuid

    from ray import serve

    model = serve.get_deployment_handle("ModelReplica", app_name="llm")
    streaming = model.options(stream=True)
    ids = hf_tokenizer.encode("<|im_start|>user\n体育新闻<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    max_tokens = 900

    def idle(timeout_s: float = 240) -> None:
        t0 = time.monotonic()
        while _unfinished(model) != 0:
            assert time.monotonic() - t0 < timeout_s, f"engine still busy after {timeout_s} s"
            time.sleep(0.05)

    def tokens_generated(end) -> float:
        """Tokens the engine generated for one request that `end` ends after its first chunk."""
        idle()
        before = _generated(model)
        sampling = {"max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0}
        stream = streaming.generate_stream.remote(GenerationRequest("abandon-" + uuid.uuid4().hex, ids, sampling))
        next(iter(stream))
        end(stream)
        del stream
        gc.collect()
        idle()
        time.sleep(0.5)  # the last step's figures
        return _generated(model) - before

    dropped = tokens_generated(lambda stream: None)
    cancelled = tokens_generated(lambda stream: stream.cancel())
    print(
        f"\n[engine] {max_tokens}-token stream after its first chunk: dropped → {dropped:.0f} tokens generated; "
        f"cancelled → {cancelled:.0f}"
    )
    assert dropped == max_tokens and cancelled < max_tokens
