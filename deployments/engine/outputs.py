"""The engine's outputs as the model replica sends them: one `GenerationChunk` per choice from
the `RequestOutput` deltas gathered since the last chunk (`PendingChunk`), with the log
probabilities vLLM's server reports (-inf as -9999.0)."""

from __future__ import annotations

from typing import Any

from deployments.api.protocol import GenerationChunk


class PendingChunk:
    """One choice's output since its last chunk (streaming)."""

    __slots__ = (
        "called",
        "calls",
        "finish",
        "logprobs",
        "ntok",
        "parser",
        "prompt",
        "reasoning",
        "show_reasoning",
        "stop",
        "texts",
    )

    def __init__(self, prompt=None, parser=None, show_reasoning: bool = True):
        self.texts: list[str] = []
        self.ntok = 0
        self.finish: str | None = None
        self.stop: Any = None
        self.logprobs: list[tuple[str, float, list[tuple[str, float]]]] | None = None
        self.prompt = prompt  # the prompt's logprobs, sent with the first chunk
        self.parser, self.show_reasoning = parser, show_reasoning  # chat output parsing (reasoning, tools)
        self.reasoning: list[str] = []
        self.calls: list[dict[str, Any]] = []
        self.called = False

    def add(self, c, k: int | None) -> None:
        self.ntok += len(c.token_ids)
        if self.parser is None:
            self.texts.append(c.text)
        else:
            reasoning, content, calls = self.parser.delta(c.text, c.token_ids, c.finish_reason is not None)
            self.texts.append(content or "")
            if reasoning and self.show_reasoning:
                self.reasoning.append(reasoning)
            self.calls += calls
            self.called |= bool(calls)
        if c.finish_reason is not None:
            self.finish, self.stop = c.finish_reason, c.stop_reason
            if self.called and self.finish == "stop":
                self.finish = "tool_calls"
        if k is not None:
            self.logprobs = (self.logprobs or []) + (token_logprobs(c, k) or [])

    def ready(self) -> bool:
        return bool(self.ntok or self.finish or any(self.texts) or self.reasoning or self.calls)

    def flush(self, index: int) -> GenerationChunk:
        chunk = GenerationChunk(
            "".join(self.texts),
            self.ntok,
            self.finish,
            self.stop,
            index,
            self.logprobs,
            self.prompt,
            "".join(self.reasoning) or None,
            self.calls or None,
        )
        self.texts, self.ntok, self.logprobs, self.prompt, self.reasoning, self.calls = [], 0, None, None, [], []
        self.finish = self.stop = None
        return chunk


def token_logprobs(c, k: int | None):
    """A completion output's per-token log-probabilities as (token, logprob, top-k
    alternatives), None unless asked for. -inf is reported as -9999.0 (as vLLM's server)."""
    if k is None or c.logprobs is None:
        return None
    return [logprob_entry(step, tid, k) for tid, step in zip(c.token_ids, c.logprobs)]


def logprob_entry(step, tid: int, k: int):
    """One position: the token, its logprob and the `k` most likely tokens there."""
    chosen = step[tid]
    top = sorted(step.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 0)[:k] if k else []
    return (
        chosen.decoded_token or "",
        max(chosen.logprob, -9999.0),
        [(lp.decoded_token or "", max(lp.logprob, -9999.0)) for _, lp in top],
    )
