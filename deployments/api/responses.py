"""OpenAI response bodies, as plain dicts (fast to serialise on the streaming path): completions,
chat completions and their stream chunks, logprobs objects, usage, model cards. Checked against
OpenAI's published document in the tests (`tests/openai_schema.py`)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deployments.api.protocol import GenerationChunk


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_logprobs(entries) -> dict[str, Any] | None:
    """OpenAI's chat `logprobs` object from (token, logprob, alternatives) entries."""
    if entries is None:
        return None

    def one(token: str, lp: float) -> dict[str, Any]:
        return {"token": token, "logprob": lp, "bytes": list(token.encode("utf-8", "surrogatepass"))}

    return {
        "content": [{**one(t, lp), "top_logprobs": [one(a, alp) for a, alp in alts]} for t, lp, alts in entries],
        "refusal": None,
    }


def completion_logprobs(entries, text_offset: int = 0) -> dict[str, Any] | None:
    """OpenAI's legacy completions `logprobs` object; `text_offset` counts from the start of
    the choice's text. Each position's `top_logprobs` holds the sampled token and the `k` most
    likely ones (up to k+1, as OpenAI's legacy API); an echoed prompt's first token has none."""
    if entries is None:
        return None
    offsets, pos = [], text_offset
    for t, _, _ in entries:
        offsets.append(pos)
        pos += len(t)
    return {
        "tokens": [t for t, _, _ in entries],
        "token_logprobs": [lp for _, lp, _ in entries],
        "top_logprobs": [None if lp is None else {t: lp, **{a: alp for a, alp in alts}} for t, lp, alts in entries],
        "text_offset": offsets,
    }


def echoed_logprobs(chunk: GenerationChunk):
    """A completions choice's logprobs entries, the echoed prompt's first."""
    if chunk.logprobs is None or chunk.prompt_logprobs is None:
        return chunk.logprobs
    return chunk.prompt_logprobs + chunk.logprobs


def chat_message(
    content: str | None, tool_calls: list[dict[str, Any]] | None = None, reasoning: str | None = None
) -> dict[str, Any]:
    """An assistant message: `tool_calls` only when there are some; the reasoning (when the
    model has a reasoning parser) as `reasoning_content` and vLLM 0.32's `reasoning`."""
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    if reasoning is not None:
        message["reasoning_content"] = message["reasoning"] = reasoning
    return message


def chat_choice(index: int, message: dict[str, Any], finish: str | None, logprobs=None) -> dict[str, Any]:
    return {"index": index, "message": message, "logprobs": chat_logprobs(logprobs), "finish_reason": finish}


def text_choice(index: int, text: str, finish: str | None, logprobs=None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": completion_logprobs(logprobs), "finish_reason": finish}


def chat_completion(
    rid: str, model: str, created: int, choices: list[dict[str, Any]], prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
    }


def text_completion(
    rid: str, model: str, created: int, choices: list[dict[str, Any]], prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chat_chunk(
    rid: str,
    model: str,
    created: int,
    delta: dict[str, Any],
    finish: str | None = None,
    use: dict[str, int] | None = None,
    index: int = 0,
    logprobs=None,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": index, "delta": delta, "logprobs": chat_logprobs(logprobs), "finish_reason": finish}],
    }
    if use is not None:
        out["usage"] = use
    return out


def completion_chunk(
    rid: str,
    model: str,
    created: int,
    text: str,
    finish: str | None = None,
    use: dict[str, int] | None = None,
    index: int = 0,
    logprobs=None,
    text_offset: int = 0,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": index,
                "text": text,
                "logprobs": completion_logprobs(logprobs, text_offset),
                "finish_reason": finish,
            }
        ],
    }
    if use is not None:
        out["usage"] = use
    return out


def usage_chunk(rid: str, model: str, created: int, obj: str, use: dict[str, int]) -> dict[str, Any]:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": use}


def model_card(
    model_id: str, owned_by: str, root: str | None = None, parent: str | None = None, created: int | None = None
) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": created or int(time.time()),
        "owned_by": owned_by,
        "root": root or model_id,
        "parent": parent,
    }
