"""Per-request timing: `RequestTrace` (a request as the ingress sees it) and `EngineTrace`
(its engine request on a model replica). Each builds its own record and hands it, when it
finishes, to the `TraceSink` that created it (the `StatsRecorder`)."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

_MAX_ITL_PAIRS = 4096


class TraceSink(Protocol):
    """Where a trace reports (the `StatsRecorder` that created it)."""

    def count(self, name: str, labels: tuple, value: float) -> None: ...

    def dispatched(self, delta: int) -> None: ...

    def request_finished(self, record: dict[str, Any], was_dispatched: bool) -> None: ...

    def engine_finished(self, record: dict[str, Any]) -> None: ...


class _Trace:
    """What both traces share: the start on both clocks and the times of the tokens."""

    __slots__ = ("_first_m", "_itl", "_last_m", "_m0", "_rec", "_wall0", "done", "request_id", "tokens")

    def __init__(self, rec: TraceSink, request_id: str | None):
        self._rec = rec
        self.request_id = request_id
        self._wall0 = time.time()
        self._m0 = time.perf_counter()
        self._first_m: float | None = None
        self._last_m: float | None = None
        self.tokens = 0
        self._itl: list[tuple[float, int]] = []  # (gap per token, tokens) pairs
        self.done = False

    def _wall(self, m: float | None) -> float | None:
        """Wall-clock time of the `perf_counter` reading `m` (wall clocks cross processes)."""
        return None if m is None else self._wall0 + (m - self._m0)

    def _tokens_arrived(self, num_tokens: int) -> bool:
        """`num_tokens` new tokens now. The first sets the first-token time (a coalesced first
        chunk: the gaps between its tokens are unknown; none observed); a later chunk of k
        tokens after a gap g counts k inter-token gaps of g/k. False when ignored (no tokens,
        or the trace is finished)."""
        if num_tokens <= 0 or self.done:
            return False
        now = time.perf_counter()
        if self._first_m is None:
            self._first_m = now
        elif len(self._itl) < _MAX_ITL_PAIRS:
            self._itl.append(((now - self._last_m) / num_tokens, num_tokens))  # type: ignore[operator]
        self._last_m = now
        self.tokens += num_tokens
        return True


class RequestTrace(_Trace):
    """One request as the ingress sees it. Created by `StatsRecorder.request_started`."""

    __slots__ = ("_dispatch_m", "_tok_m", "endpoint", "prompt_tokens", "stream", "tokenize_s")

    def __init__(self, rec: TraceSink, endpoint: str, request_id: str | None, stream: bool):
        super().__init__(rec, request_id)
        self.endpoint = endpoint
        self.stream = stream
        self._tok_m: float | None = None
        self.tokenize_s: float | None = None
        self.prompt_tokens: int | None = None
        self._dispatch_m: float | None = None

    def tokenize_started(self) -> None:
        """Optional: mark the start of tokenization (default: the request's arrival)."""
        self._tok_m = time.perf_counter()

    def tokenized(self, prompt_tokens: int | None = None) -> None:
        """The tokenizer answered: records tokenize time (since `tokenize_started` or arrival)."""
        self.tokenize_s = time.perf_counter() - (self._tok_m or self._m0)
        self.prompt_tokens = prompt_tokens

    def dispatched(self) -> None:
        """About to call the model deployment: the request counts as waiting until a model
        replica starts it."""
        if self._dispatch_m is None and not self.done:
            self._dispatch_m = time.perf_counter()
            self._rec.dispatched(+1)

    def chunk(self, num_tokens: int) -> None:
        """A chunk of `num_tokens` generated tokens arrived from the model (streaming)."""
        self._tokens_arrived(num_tokens)

    def first_token(self) -> None:
        """Explicit first-token mark (only needed when chunks are not reported)."""
        if self._first_m is None:
            self._first_m = self._last_m = time.perf_counter()

    def finished(
        self,
        status: int = 200,
        code: str | int | None = None,
        completion_tokens: int | None = None,
        reason: str | None = None,
    ) -> None:
        """The request ended with HTTP `status` (for a stream that failed mid-way: the status
        of the error it carried). Idempotent: only the first call counts."""
        if self.done:
            return
        self.done = True
        end = time.perf_counter()
        record = {
            "rid": self.request_id,
            "endpoint": self.endpoint,
            "stream": self.stream,
            "status": int(status),
            "code": code,
            "reason": reason,
            "arrival": self._wall0,
            "end": self._wall(end),
            "tokenize_s": self.tokenize_s,
            "prompt_tokens": self.prompt_tokens,
            "dispatched": self._wall(self._dispatch_m),
            "first": self._wall(self._first_m),
            "last": self._wall(self._last_m),
            "tokens": completion_tokens if completion_tokens is not None else self.tokens,
            "itl": self._itl,
        }
        self._rec.request_finished(record, self._dispatch_m is not None)

    def failed(self, exc: BaseException) -> None:
        """`finished` for an exception: APIError-like objects give their status/code, a
        timeout 504, a cancellation 499, anything else 500."""
        status = getattr(exc, "status", None) or getattr(exc, "status_code", None)
        if isinstance(status, int):
            self.finished(status, getattr(exc, "code", None))
        elif isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
            self.finished(504, "timeout")
        elif isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
            self.finished(499, "client_closed")
        else:
            self.finished(500, "internal_error")

    def __enter__(self) -> RequestTrace:
        return self

    def __exit__(self, et, exc, tb) -> None:
        if exc is not None:
            self.failed(exc)
        else:
            self.finished(200)


class EngineTrace(_Trace):
    """One engine request on a model replica. Created by `StatsRecorder.engine_started`."""

    __slots__ = ("prompt_tokens",)

    def __init__(self, rec: TraceSink, request_id: str | None, prompt_tokens: int):
        super().__init__(rec, request_id)
        self.prompt_tokens = int(prompt_tokens or 0)

    def output(self, num_tokens: int) -> None:
        """The engine produced `num_tokens` new tokens (one `RequestOutput` delta)."""
        if self._tokens_arrived(num_tokens):
            self._rec.count("generation_tokens", (), num_tokens)

    def completed(self, num_tokens: int, first_token_s: float | None, decode_s: float | None) -> None:
        """The whole output at once (a non-streaming request, whose engine sends no per-step
        outputs): its first token `first_token_s` after the start and `decode_s` from the first
        to the last token, as the engine timed them (vLLM's `RequestOutput.metrics`); the gaps
        between tokens count as their mean. Without timings the first token counts at the end."""
        if num_tokens <= 0 or self.done:
            return
        now = time.perf_counter()
        self._first_m = now if first_token_s is None else min(now, self._m0 + max(0.0, first_token_s))
        self._last_m = now
        if num_tokens > 1 and decode_s is not None and decode_s > 0:
            self._itl.append((decode_s / (num_tokens - 1), num_tokens - 1))
        self.tokens += num_tokens
        self._rec.count("generation_tokens", (), num_tokens)

    def finished(self, outcome: str = "ok") -> None:
        """`outcome`: ok, aborted (cancelled: client gone, deadline) or error. Idempotent."""
        if self.done:
            return
        self.done = True
        end = time.perf_counter()
        self._rec.engine_finished(
            {
                "rid": self.request_id,
                "start": self._wall0,
                "end": self._wall(end),
                "first": self._wall(self._first_m),
                "last": self._wall(self._last_m),
                "tokens": self.tokens,
                "prompt_tokens": self.prompt_tokens,
                "itl": self._itl,
                "outcome": outcome,
            }
        )
