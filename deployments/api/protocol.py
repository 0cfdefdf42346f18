"""OpenAI request schemas and response builders, in one place.

Requests are pydantic models mirroring OpenAI's, plus the sampling parameters vLLM's own
OpenAI server accepts beyond OpenAI's (`top_k`, `min_p`, `repetition_penalty`, `ignore_eos`,
`min_tokens`, …), so clients and benchmarks written for vLLM work unchanged. Unknown fields are
ignored, as OpenAI and vLLM do. Responses are plain dicts in OpenAI's shape (fast to serialise
on the streaming path; the `openai` SDK parses them in the tests).

`GenerationRequest` / `GenerationChunk` are what the ingress and the model replica exchange.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Integers go to the engine core through msgpack (64-bit at most); token ids and counts fit 32.
_INT32_MAX = 2**31 - 1

# --------------------------------------------------------------------------- requests


class _Lenient(BaseModel):
    # Unknown fields are ignored (OpenAI/vLLM behaviour); NaN/Infinity are rejected.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, protected_namespaces=())


class StreamOptions(_Lenient):
    include_usage: bool = Field(False, description="Send a last chunk with `usage`.")
    continuous_usage_stats: bool = Field(False, description="vLLM extension: `usage` on every chunk.")


class TextContentPart(_Lenient):
    type: Literal["text"] = Field(description="Only text parts are supported.")
    text: str = Field(description="The text.")


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(description="Author role.")
    content: Union[str, list[TextContentPart], None] = Field(None, description="Text or text parts.")
    name: str | None = Field(None, description="Optional author name.")

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class SamplingFields(_Lenient):
    """Fields shared by chat and completions requests."""

    model: str | None = Field(None, description="Served model name (or adapter); default: the base model.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate (cap: limits.max_tokens_cap).")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="Sampling temperature.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Nucleus sampling.")
    n: int = Field(1, ge=1, le=1, description="Number of choices (only 1 is supported).")
    stream: bool = Field(False, description="Server-sent events.")
    stream_options: StreamOptions | None = Field(None, description="Streaming options.")
    stop: Union[str, list[str], None] = Field(None, description="Stop strings (at most 8).")
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1, description="Per-request sampling seed.")
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="Presence penalty.")
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="Frequency penalty.")
    user: str | None = Field(None, description="End-user id (logged, not used).")
    # vLLM extensions
    top_k: int | None = Field(None, ge=-1, le=_INT32_MAX, description="vLLM: top-k (-1 or 0: off).")
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="vLLM: min-p.")
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0, description="vLLM: repetition penalty.")
    ignore_eos: bool = Field(False, description="vLLM: keep generating past EOS (benchmarks).")
    min_tokens: int = Field(0, ge=0, le=_INT32_MAX, description="vLLM: generate at least this many tokens.")
    stop_token_ids: list[Annotated[int, Field(ge=0, le=_INT32_MAX)]] | None = Field(
        None, description="vLLM: stop on these token ids.")
    include_stop_str_in_output: bool = Field(False, description="vLLM: keep the stop string.")
    skip_special_tokens: bool = Field(True, description="vLLM: drop special tokens from the text.")
    spaces_between_special_tokens: bool = Field(True, description="vLLM: detokenizer option.")
    timeout: float | None = Field(
        None, gt=0, description="Per-request deadline in seconds (capped by limits.request_timeout_s)."
    )

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v):
        if isinstance(v, list) and len(v) > 8:
            raise ValueError("at most 8 stop sequences")
        if isinstance(v, str):
            return [v] if v else None
        return [s for s in v if s] or None if v is not None else None

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(description="The conversation, oldest first.", min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Alias of max_tokens (newer OpenAI name).")
    add_generation_prompt: bool = Field(True, description="vLLM: end the prompt with the assistant header.")


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[int], list[str]] = Field(
        description="Prompt text, a token-id list, or a one-element list of text."
    )
    echo: bool = Field(False, description="Prepend the prompt to the completion text.")

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be empty")
            if isinstance(v[0], str):
                if len(v) != 1:
                    raise ValueError("only one prompt per request is supported")
                return v[0]
        return v


class ClassifyRequest(_Lenient):
    """POST /v1/classify, in the style of OpenAI's embeddings endpoint."""

    model: str | None = Field(None, description="Base model or adapter name; default: the base model.")
    input: Union[str, list[str]] = Field(description="One text or a list of texts to classify.")
    labels: list[str] | None = Field(
        None, min_length=2, description="A subset of the configured label set; default: all of it."
    )

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class LoadLoraRequest(_Lenient):
    """POST /v1/load_lora_adapter (vLLM's shape)."""

    lora_name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$",
                           description="Name clients will pass as `model`.")
    lora_path: str = Field(min_length=1, description="Adapter folder on the model replicas' nodes.")


class UnloadLoraRequest(_Lenient):
    """POST /v1/unload_lora_adapter (vLLM's shape)."""

    lora_name: str = Field(min_length=1, description="Adapter to remove.")


# ------------------------------------------------------------------- internal messages


@dataclass
class GenerationRequest:
    """What the ingress sends the model replica."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: dict[str, Any]
    lora: str | None = None


@dataclass
class GenerationChunk:
    """A coalesced piece of output: the text and token count since the previous chunk."""

    text: str
    num_tokens: int
    finish_reason: str | None = None
    stop_reason: Any = None


@dataclass
class EncodedPrompt:
    """What the tokenizer deployment returns for a chat or completions prompt (a client
    mistake is raised as `APIError` instead)."""

    token_ids: list[int]


@dataclass
class EncodedClassify:
    """What the tokenizer deployment returns for /v1/classify: each text's prompt and each
    label's answer tokens."""

    prompts: list[list[int]]
    label_ids: list[list[int]]


# ------------------------------------------------------------------- responses


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_completion(rid: str, model: str, created: int, text: str, finish: str | None,
                    prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish,
        }],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def text_completion(rid: str, model: str, created: int, text: str, finish: str | None,
                    prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chat_chunk(rid: str, model: str, created: int, delta: dict[str, Any],
               finish: str | None = None, use: dict[str, int] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if use is not None:
        out["usage"] = use
    return out


def completion_chunk(rid: str, model: str, created: int, text: str,
                     finish: str | None = None, use: dict[str, int] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
    }
    if use is not None:
        out["usage"] = use
    return out


def usage_chunk(rid: str, model: str, created: int, obj: str, use: dict[str, int]) -> dict[str, Any]:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": use}


def model_card(model_id: str, owned_by: str, root: str | None = None, parent: str | None = None,
               created: int | None = None) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": created or int(time.time()),
        "owned_by": owned_by,
        "root": root or model_id,
        "parent": parent,
    }
