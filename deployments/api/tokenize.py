"""POST /tokenize and POST /detokenize, in vLLM's shapes (vLLM 0.32,
`vllm/entrypoints/serve/tokenize/`): no model time, served by the tokenizer deployment.

- /tokenize: `prompt` text, or chat `messages` rendered by the chat template exactly as
  /v1/chat/completions renders them (same encoding, so `count` is the `usage.prompt_tokens`
  a chat completion of those messages reports) →
  `{"count", "max_model_len", "tokens", "token_strs"}` (`token_strs`: null unless
  `return_token_strs`).
- /detokenize: `{"tokens": [...]}` → `{"prompt": text}`; an id outside the vocabulary is a 400.

vLLM has one request type per kind (completion / chat) and ignores unknown fields; here one
type holds both kinds and, as everywhere in this API, an unknown field is a 400 naming it,
a chat-only field on a `prompt` request too; vLLM's fields this service does not implement
(a request-supplied `chat_template`, `tools`, multimodal options, `continue_final_message`)
are a 400 naming them. Not rate limited (admission/middleware.py RATE_LIMITED_PATHS), but
behind the API key when auth is on.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

from fastapi.responses import JSONResponse
from pydantic import Field

from deployments.admission.capacity import dependency_call
from deployments.api import errors, tools
from deployments.api.models import ModelDirectory
from deployments.api.protocol import ChatMessage, Tool, _Strict
from deployments.config import LimitsConfig


class TokenizeRequest(_Strict):
    """POST /tokenize: exactly one of `prompt` (vLLM's TokenizeCompletionRequest) and
    `messages` (vLLM's TokenizeChatRequest)."""

    # chat-only fields vLLM accepts that are not implemented here: a 400 naming them when set
    UNSUPPORTED: ClassVar[tuple[str, ...]] = (
        "continue_final_message",
        "chat_template",
        "media_io_kwargs",
        "mm_processor_kwargs",
    )
    CHAT_ONLY: ClassVar[tuple[str, ...]] = ("add_generation_prompt", "chat_template_kwargs", "tools") + UNSUPPORTED

    model: str | None = Field(None, description="Served model name, alias or adapter; default: the default model.")
    prompt: str | None = Field(None, description="Text to tokenize (give this or `messages`).")
    messages: list[ChatMessage] | None = Field(
        None, min_length=1, description="A conversation, rendered by the chat template as chat completions do."
    )
    add_special_tokens: bool | None = Field(
        None,
        description="Add the tokenizer's special tokens (e.g. BOS) around the tokens; default: true "
        "for `prompt`, false for `messages` (the chat template adds its own).",
    )
    add_generation_prompt: bool | None = Field(
        None, description="Chat only: end with the assistant header (default true, as chat completions)."
    )
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="Chat only: extra chat-template variables (e.g. enable_thinking)."
    )
    return_token_strs: bool | None = Field(False, description="Also return each token's string.")
    continue_final_message: bool | None = Field(None, description="Not supported here (a 400 when true).")
    chat_template: str | None = Field(None, description="Not supported here: the model's own template is used.")
    tools: list[Tool] | None = Field(None, description="Chat only: tools, rendered as chat completions render them.")
    media_io_kwargs: dict[str, Any] | None = Field(None, description="Not supported here (text only).")
    mm_processor_kwargs: dict[str, Any] | None = Field(None, description="Not supported here (text only).")


class DetokenizeRequest(_Strict):
    """POST /detokenize."""

    model: str | None = Field(None, description="Served model name, alias or adapter; default: the default model.")
    tokens: list[int] = Field(description="Token ids to turn back into text.")


def _is_set(value: Any) -> bool:
    return value not in (None, False) and value != [] and value != {}


class ServingTokenize:
    """POST /tokenize and /detokenize: validation here, the work on the tokenizer deployment."""

    def __init__(self, tokenizer, models: ModelDirectory, limits: LimitsConfig):
        self.tokenizer, self.models, self.limits = tokenizer, models, limits

    async def tokenize(self, body: TokenizeRequest) -> JSONResponse:
        await self.models.resolve(body.model)  # an unknown model is a 404; adapters share the tokenizer
        for name in TokenizeRequest.UNSUPPORTED:
            if _is_set(getattr(body, name)):
                raise errors.unsupported(name)
        if body.messages is None:
            if body.prompt is None:
                raise errors.bad_request("Give either prompt (text) or messages (a conversation).", "prompt")
            for name in TokenizeRequest.CHAT_ONLY:
                if name in body.model_fields_set and getattr(body, name) is not None:
                    raise errors.bad_request(f"{name} applies to chat requests (messages) only.", name)
            call = self.tokenizer.tokenize_prompt.remote(
                body.prompt, _default(body.add_special_tokens, True), bool(body.return_token_strs)
            )
        else:
            if body.prompt is not None:
                raise errors.bad_request("Give either prompt or messages, not both.", "prompt")
            if len(body.messages) > self.limits.max_messages:
                raise errors.bad_request(
                    f"messages: at most {self.limits.max_messages} messages per request (got {len(body.messages)})",
                    "messages",
                    "too_many_messages",
                )
            # the same messages and tools as ServingGeneration.chat, so the count is the same
            messages = [m.for_template() for m in body.messages]
            call = self.tokenizer.tokenize_chat.remote(
                messages,
                _default(body.add_generation_prompt, True),
                _default(body.add_special_tokens, False),
                bool(body.return_token_strs),
                body.chat_template_kwargs,
                tools.for_template(body.tools) if body.tools else None,
            )
        return JSONResponse(await self._call(call))

    async def detokenize(self, body: DetokenizeRequest) -> JSONResponse:
        await self.models.resolve(body.model)
        return JSONResponse({"prompt": await self._call(self.tokenizer.detokenize.remote(body.tokens))})

    async def _call(self, call):
        try:
            async with asyncio.timeout(self.limits.request_timeout_s):
                return await dependency_call(call, "tokenizer")
        except TimeoutError:
            call.cancel()
            raise errors.timed_out(self.limits.request_timeout_s) from None


def _default(value: bool | None, default: bool) -> bool:
    return default if value is None else value
