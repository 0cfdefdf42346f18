"""Tokenizer deployment (CPU): chat template, encoding, token counting and the context limit.

The model replica only ever sees token ids, so the GPU never waits on CPU text work, and a
prompt that cannot fit (prompt + max_tokens > max_model_len) is rejected here, before it
takes a GPU slot.

No string a client sends becomes a control token: the chat encoding is
`deployments/chat_encoding.py`'s, the one the training scripts use too.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import logging
from typing import Any

from deployments.api.errors import APIError, bad_request
from deployments.api.protocol import EncodedClassify, EncodedPrompt
from deployments.chat_encoding import ChatEncoder, ControlTextError
from deployments.config import ServiceConfig
from deployments.options import base_options

logger = logging.getLogger("ray.serve")


def tokenizer_class_path(source: str) -> str | None:
    """The class `AutoTokenizer` picks for the tokenizer at `source`, as `"module:Name"`
    (`load_tokenizer`'s argument), found once where the application is built
    (`serve_app.build_app`, whose process usually has torch loaded already: vLLM's parser check
    with the shipped tool-call parser). None when
    the files cannot be read there or the class is not transformers' own (remote code): the
    replica then asks `AutoTokenizer` itself.

    Why: `AutoTokenizer` decides the class from the model's config, which imports transformers'
    model classes and with them torch (~4.5 CPU-s and ~550 MB per tokenizer replica); the class
    it decides on loads without torch. Every branch of `AutoTokenizer.from_pretrained` ends in
    `cls.from_pretrained(source)` with the same arguments, so the replica's tokenizer is the one
    `AutoTokenizer` would have built (tests/test_chat_encoding.py compares them)."""
    try:
        from transformers import AutoTokenizer

        cls = type(AutoTokenizer.from_pretrained(source))
    except Exception as exc:  # files not readable where the app is built: the replica decides
        logger.warning(
            "tokenizer class for %s not resolved at build (%s): each replica asks AutoTokenizer", source, exc
        )
        return None
    if not cls.__module__.startswith("transformers."):
        return None
    return f"{cls.__module__}:{cls.__qualname__}"


def load_tokenizer(source: str, class_path: str | None = None) -> Any:
    """The tokenizer at `source`: of class `class_path` (`tokenizer_class_path`), else the one
    `AutoTokenizer` picks."""
    if class_path:
        module, _, name = class_path.partition(":")
        if not module.startswith("transformers."):
            raise ValueError(f"tokenizer class {class_path!r} is not transformers' own")
        return getattr(importlib.import_module(module), name).from_pretrained(source)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source)


def _bad_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


class PromptTokenizer:
    """Serve deployment class (plain class; `serve_app` applies `serve.deployment`)."""

    # No access line per call: the ingress logs each request once, and this internal hop's line
    # cost ~10 % of its CPU.
    DEFAULT_OPTIONS: dict[str, Any] = base_options(
        "PromptTokenizer",
        logging_config={"encoding": "JSON", "enable_access_log": False},
        max_ongoing_requests=256,
        ray_actor_options={"num_cpus": 0.25},
        health_check_period_s=10,
    )

    def __init__(self, config: dict[str, Any] | ServiceConfig, tokenizer_class: str | None = None):
        """`tokenizer_class`: `tokenizer_class_path`'s answer (the build's), else None."""
        self.config = ServiceConfig.model_validate(config)
        self.max_model_len = self.config.engine.max_model_len
        self.tokenizer = load_tokenizer(self.config.model.resolved_tokenizer(), tokenizer_class)
        if self.tokenizer.chat_template is None:
            raise ValueError(f"tokenizer at {self.config.model.resolved_tokenizer()} has no chat template")

    # Inputs up to this many characters are tokenized on the replica's event loop: a typical
    # prompt encodes in well under a millisecond, less than handing it to a worker thread
    # costs (Serve runs a plain method in one); longer ones go to a thread so they do not
    # hold up the calls queued behind them.
    INLINE_CHARS = 16_000

    # ------------------------------------------------------------------ API

    async def encode_chat(
        self,
        messages: list[dict[str, Any]],
        max_tokens: int,
        add_generation_prompt: bool = True,
        template_kwargs: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> EncodedPrompt:
        """`template_kwargs`: extra chat-template variables (vLLM's `chat_template_kwargs`,
        e.g. Qwen3's `enable_thinking`); `tools`: the request's function tools, which the
        template renders for the model (Qwen3's: into the system turn)."""
        size = sum(len(m.get("content") or "") for m in messages)
        return await self._run(size, self._chat, messages, max_tokens, add_generation_prompt, template_kwargs, tools)

    async def encode_prompt(self, prompt: str | list[int], max_tokens: int) -> EncodedPrompt:
        return await self._run(len(prompt), self._prompt, prompt, max_tokens)

    async def encode_classify(self, texts: list[str], labels: list[str]) -> EncodedClassify:
        return await self._run(sum(map(len, texts)), self.classify_prompts, texts, labels)

    # /tokenize and /detokenize (vLLM's shapes; no context-length check, as vLLM's)

    async def tokenize_prompt(
        self, prompt: str, add_special_tokens: bool = True, return_token_strs: bool = False
    ) -> dict[str, Any]:
        """`{"count", "max_model_len", "tokens", "token_strs"}` of a text prompt."""
        return await self._run(len(prompt), self._tokenize_prompt, prompt, add_special_tokens, return_token_strs)

    async def tokenize_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        add_special_tokens: bool = False,
        return_token_strs: bool = False,
        template_kwargs: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """The same for a conversation, encoded exactly as `encode_chat` encodes it."""
        size = sum(len(m.get("content") or "") for m in messages)
        return await self._run(
            size,
            self._tokenize_chat,
            messages,
            add_generation_prompt,
            add_special_tokens,
            return_token_strs,
            template_kwargs,
            tools,
        )

    async def detokenize(self, tokens: list[int]) -> str:
        """Token ids → text (special tokens kept, as vLLM's /detokenize); a 400 for an id
        outside the vocabulary."""
        return await self._run(4 * len(tokens), self._detokenize, tokens)

    async def _run(self, size: int, fn, *args):
        if size > self.INLINE_CHARS:
            return await asyncio.to_thread(fn, *args)
        return fn(*args)

    def _chat(
        self,
        messages: list[dict[str, Any]],
        max_tokens: int,
        add_generation_prompt: bool = True,
        template_kwargs: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> EncodedPrompt:
        """`messages`: as `ChatMessage.for_template` gives them (content flattened to text)."""
        return self._check_fits(
            self._chat_ids(messages, add_generation_prompt, template_kwargs, tools), max_tokens, "messages"
        )

    def _chat_ids(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        template_kwargs: dict[str, Any] | None,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """A client's conversation → prompt ids (chat completions and /tokenize): a 400 for
        reserved template variables or a conversation the template rejects."""
        reserved = set(template_kwargs or ()) & self._reserved_template_kwargs
        if reserved:
            raise bad_request(f"chat_template_kwargs may not set {sorted(reserved)}", "chat_template_kwargs")
        try:
            return self._encode_chat(messages, add_generation_prompt, template_kwargs, tools)
        except APIError:
            raise
        except Exception as exc:  # a template that rejects the conversation (roles, order)
            logger.info("chat template rejected the conversation: %s", exc)
            raise bad_request(f"messages: {exc}", "messages", "invalid_messages") from None

    @functools.cached_property
    def _encoder(self) -> ChatEncoder:
        return ChatEncoder(self.tokenizer)

    @property
    def _plain_encode(self):
        """`text → ids` with no added token recognised (`ChatEncoder.plain_encode`)."""
        return self._encoder.plain_encode

    @functools.cached_property
    def _reserved_template_kwargs(self) -> frozenset[str]:
        """Names a client's chat_template_kwargs may not set: every named parameter of
        `apply_chat_template` (a request-supplied `chat_template` would run the client's own
        Jinja; `tokenize`, `tools`, `continue_final_message`, … change what is encoded), the
        template's `messages`, and the special-token variables (their text is encoded with
        special tokens parsed, so overriding them would smuggle control tokens into the prompt)."""
        params = inspect.signature(self.tokenizer.apply_chat_template).parameters.values()
        named = {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        return frozenset(
            named
            | {"messages", "conversation", "conversations"}
            | set(self.tokenizer.special_tokens_map)
            | {"bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"}
        )

    def _prompt(self, prompt: str | list[int], max_tokens: int) -> EncodedPrompt:
        """Completions prompt: raw text is encoded as vLLM does (special-token text is parsed,
        since completions callers write their own template); a token-id list is checked."""
        if isinstance(prompt, str):
            if not prompt:
                raise bad_request("prompt must not be empty", "prompt")
            if _bad_text(prompt):
                raise bad_request("prompt is not valid Unicode (lone surrogate)", "prompt")
            ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        else:
            vocab = len(self.tokenizer)
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise bad_request(f"prompt token id {bad[0]} is out of range [0, {vocab})", "prompt")
            ids = list(prompt)
        return self._check_fits(ids, max_tokens, "prompt")

    def classify_prompts(self, texts: list[str], labels: list[str]) -> EncodedClassify:
        """Prompts (the shared classification chat format) and each label's answer tokens
        (label text + end-of-turn), for scoring every label of every text: the one
        classification encoder (the service's `encode_classify`, the batch classifier's workers)."""
        eos = self.tokenizer.eos_token_id
        label_ids = [self.tokenizer.encode(label, add_special_tokens=False) + [eos] for label in labels]
        longest = max(len(ids) for ids in label_ids)
        prompts = []
        for i, text in enumerate(texts):
            if _bad_text(text):
                raise bad_request(f"input[{i}] is not valid Unicode (lone surrogate)", f"input[{i}]")
            ids = self._encoded(self._encoder.classification_prompt, text)
            prompts.append(self._check_fits(ids, longest, f"input[{i}]").token_ids)
        return EncodedClassify(prompts, label_ids)

    def _tokenize_prompt(self, prompt: str, add_special_tokens: bool, return_token_strs: bool) -> dict[str, Any]:
        if _bad_text(prompt):
            raise bad_request("prompt is not valid Unicode (lone surrogate)", "prompt")
        return self._tokens(self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens), return_token_strs)

    def _tokenize_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        add_special_tokens: bool,
        return_token_strs: bool,
        template_kwargs: dict[str, Any] | None,
        tools: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        ids = self._chat_ids(messages, add_generation_prompt, template_kwargs, tools)
        if add_special_tokens:  # vLLM encodes the rendered chat with add_special_tokens=True
            prefix, suffix = self._special_affixes
            ids = prefix + ids + suffix
        return self._tokens(ids, return_token_strs)

    def _detokenize(self, tokens: list[int]) -> str:
        vocab = len(self.tokenizer)
        for i, t in enumerate(tokens):
            if not 0 <= t < vocab:
                raise bad_request(f"tokens[{i}] = {t} is out of range [0, {vocab})", "tokens", "invalid_token_id")
        return self.tokenizer.decode(tokens)

    def _tokens(self, ids: list[int], return_token_strs: bool) -> dict[str, Any]:
        return {
            "count": len(ids),
            "max_model_len": self.max_model_len,
            "tokens": ids,
            "token_strs": self.tokenizer.convert_ids_to_tokens(ids) if return_token_strs else None,
        }

    @functools.cached_property
    def _special_affixes(self) -> tuple[list[int], list[int]]:
        """The ids the tokenizer puts before and after a text when it adds special tokens
        (e.g. Llama's BOS; none for Qwen)."""
        plain = self.tokenizer.encode("a", add_special_tokens=False)
        full = self.tokenizer.encode("a", add_special_tokens=True)
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                return full[:start], full[start + len(plain) :]
        return [], []

    def check_health(self) -> None:
        self.tokenizer.encode("ok", add_special_tokens=False)

    # ------------------------------------------------------------------ internals

    def _check_fits(self, ids: list[int], max_tokens: int, param: str) -> EncodedPrompt:
        if len(ids) + max_tokens > self.max_model_len:
            raise APIError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. "
                f"However, you requested {len(ids) + max_tokens} tokens ({len(ids)} in the "
                f"prompt, {max_tokens} for the completion). Please reduce the prompt or max_tokens.",
                param=param,
                code="context_length_exceeded",
            )
        return EncodedPrompt(ids)

    def _encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        template_kwargs: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        return self._encoded(self._encoder.encode, messages, add_generation_prompt, template_kwargs, tools)

    @staticmethod
    def _encoded(encode, *args) -> list[int]:
        """`encode(*args)` (the chat encoding); a 400 naming a client string the template
        cannot keep plain text."""
        try:
            return encode(*args)
        except ControlTextError as exc:
            raise bad_request(str(exc), exc.field) from None
