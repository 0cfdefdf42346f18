"""Tokenizer deployment (CPU): chat template, encoding, token counting and the context limit.

The model replica only ever sees token ids, so the GPU never waits on CPU text work, and a
prompt that cannot fit (prompt + max_tokens > max_model_len) is rejected here, before it
takes a GPU slot.

No string a client sends becomes a control token: control-token text (a literal
``<|im_start|>``, or an added marker such as ``<think>``/``<tool_call>``) in any field the chat
template renders is encoded as plain text. Message contents, and every other client string
(names, reasoning, tool call ids, names and arguments, tool definitions, chat_template_kwargs
values) that holds control-token text, are swapped for sentinels before the template is
rendered; the template's own text is encoded with special tokens parsed, the client strings
without any (`_ClientStrings`).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import logging
import re
from typing import Any

from deployments.api.errors import APIError, bad_request
from deployments.api.protocol import EncodedClassify, EncodedPrompt
from deployments.config import ServiceConfig, base_options

logger = logging.getLogger("ray.serve")

# A client string's stand-in while the template renders. The `"` shows whether the template
# JSON-encoded it (`tool | tojson`: `\"`), so the string is put back escaped the same way.
_SENTINEL = '\ue000{}"\ue001'
_SENTINEL_RE = re.compile('\ue000(\\d+)(\\\\?)"\ue001')
_MARKS = ("\ue000", "\ue001")


def _bad_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


class _ControlText:
    """Which client strings could become control tokens if rendered into the template's text.

    Control text: every added token of the tokenizer, special (`<|im_start|>`) or not
    (`<think>`, `<tool_call>`: the markers the chat template, the reasoning parser and the tool
    parser read; a client's text must not forge them either), and the sentinels' marks. A
    string is unsafe when it, or its normalized form, holds control text, or could complete
    one with its neighbour: it ends with a start of one (`<|im_`) or begins with an end of one
    (`_end|>`)."""

    def __init__(self, texts: list[str], normalize=None):
        texts = sorted({t for t in [*texts, *_MARKS] if t}, key=len, reverse=True)
        self.search = re.compile("|".join(map(re.escape, texts))).search
        self.starts = frozenset(t[:k] for t in texts for k in range(1, len(t)))
        self.ends = frozenset(t[k:] for t in texts for k in range(1, len(t)))
        self.longest = max(map(len, texts))
        self.normalize = normalize

    def unsafe(self, s: str) -> bool:
        if self._unsafe(s):
            return True
        return self.normalize is not None and self._unsafe(self.normalize(s))

    def _unsafe(self, s: str) -> bool:
        if self.search(s):
            return True
        n = min(self.longest, len(s))
        return any(s[-k:] in self.starts or s[:k] in self.ends for k in range(1, n))


class _ClientStrings:
    """A request's client strings swapped for sentinels before the chat template renders:
    every message's non-empty content (as always), and every other string the template may
    render (names, reasoning, tool call ids, names and arguments, tool definitions, their
    schemas' keys and values, chat_template_kwargs values) that is unsafe (`_ControlText`).
    Safe strings render as themselves, so a template that reads them (a schema's `"type"`)
    renders exactly as vLLM's server does."""

    def __init__(self, control: _ControlText):
        self.control = control
        self.texts: list[str] = []
        self.fields: list[str] = []

    def message(self, m: dict[str, Any], i: int) -> dict[str, Any]:
        out = {}
        for key, value in m.items():
            field = f"messages[{i}].{key}"
            if key == "role":  # one of five names (validated), which templates compare
                out[key] = value
            elif key == "content" and isinstance(value, str) and value:
                out[key] = self._swap(value, field)
            else:
                out[key] = self.walk(value, field)
        return out

    def walk(self, value: Any, field: str) -> Any:
        if isinstance(value, str):
            return self._swap(value, field) if value and self.control.unsafe(value) else value
        if isinstance(value, dict):
            return {self.walk(k, field): self.walk(v, f"{field}.{k}") for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.walk(v, f"{field}[{j}]") for j, v in enumerate(value)]
        return value

    def _swap(self, text: str, field: str) -> str:
        self.texts.append(text)
        self.fields.append(field)
        return _SENTINEL.format(len(self.texts) - 1)

    def unsafe_fields(self) -> list[str]:
        return [f for t, f in zip(self.texts, self.fields) if self.control.unsafe(t)]


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

    def __init__(self, config: dict[str, Any] | ServiceConfig):
        from transformers import AutoTokenizer

        self.config = ServiceConfig.model_validate(config)
        self.max_model_len = self.config.engine.max_model_len
        self.tokenizer = AutoTokenizer.from_pretrained(self.config.model.resolved_tokenizer())
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
        return await self._run(sum(map(len, texts)), self._classify, texts, labels)

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
    def _control(self) -> _ControlText:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        normalizer = getattr(backend, "normalizer", None)
        return _ControlText(list(self.tokenizer.get_added_vocab()), normalizer.normalize_str if normalizer else None)

    @functools.cached_property
    def _plain_encode(self):
        """`text → ids` with no added token recognised, special or not: a client's
        `<|im_start|>` or `<think>` is the plain text's tokens. A copy of the fast tokenizer
        with every added token marked special and special tokens split, its own object: the
        Hugging Face wrapper's `split_special_tokens` flips a flag on the shared tokenizer per
        call, which two threads encoding at once could see flipped by the other."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:  # a slow (Python) tokenizer: its non-special added tokens stay
            return lambda text: self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
        from tokenizers import Tokenizer

        doc = json.loads(backend.to_str())
        for token in doc.get("added_tokens", []):
            token["special"] = True
        plain = Tokenizer.from_str(json.dumps(doc))
        plain.encode_special_tokens = True
        return lambda text: plain.encode(text, add_special_tokens=False).ids

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

    def _classify(self, texts: list[str], labels: list[str]) -> EncodedClassify:
        """Prompts (the shared classification chat format) and each label's answer tokens
        (label text + end-of-turn), for scoring every label of every text."""
        from deployments.classification import CHAT_TEMPLATE_KWARGS, build_messages

        eos = self.tokenizer.eos_token_id
        label_ids = [self.tokenizer.encode(label, add_special_tokens=False) + [eos] for label in labels]
        longest = max(len(ids) for ids in label_ids)
        prompts = []
        for i, text in enumerate(texts):
            if _bad_text(text):
                raise bad_request(f"input[{i}] is not valid Unicode (lone surrogate)", f"input[{i}]")
            ids = self._encode_chat(build_messages(text), True, CHAT_TEMPLATE_KWARGS)
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
        """The template's text encoded with special tokens parsed, every client string that
        could hold control text (`_ClientStrings`) encoded as plain text in its place."""
        client = _ClientStrings(self._control)
        # Only non-empty contents get a sentinel: a template renders an empty one differently
        # (Qwen3's: no newline between an assistant's empty content and its tool calls).
        masked = [client.message(m, i) for i, m in enumerate(messages)]
        # the variables' names stay (the template reads them by name); their values are client text
        kwargs = {k: client.walk(v, f"chat_template_kwargs.{k}") for k, v in (template_kwargs or {}).items()}
        if tools:
            kwargs["tools"] = client.walk(tools, "tools")
        rendered = self.tokenizer.apply_chat_template(
            masked, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
        )
        pieces = _SENTINEL_RE.split(rendered)
        # pieces: [template, index, escaped, template, index, escaped, ..., template]
        template, found = pieces[::3], pieces[1::3]
        if (
            any(mark in piece for piece in template for mark in _MARKS)
            or "\\ue000" in rendered
            or any(int(i) >= len(client.texts) for i in found)
        ):
            return self._encode_unmasked(client, messages, add_generation_prompt, template_kwargs, tools)
        ids: list[int] = []
        for k, piece in enumerate(template):
            if piece:
                ids.extend(self.tokenizer.encode(piece, add_special_tokens=False))
            if k < len(found):
                text = client.texts[int(found[k])]
                if pieces[3 * k + 2]:  # rendered through tojson: put back JSON-escaped, as it would be
                    text = json.dumps(text, ensure_ascii=False)[1:-1]
                ids.extend(self._plain_encode(text))
        return ids

    def _encode_unmasked(
        self,
        client: _ClientStrings,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        template_kwargs: dict[str, Any] | None,
        tools: list[dict[str, Any]] | None,
    ) -> list[int]:
        """A template that altered a sentinel (sliced it, escaped it otherwise than tojson):
        the real strings rendered and parsed, which is only safe when none of them holds
        control text; otherwise a 400 naming the field."""
        unsafe = client.unsafe_fields()
        if unsafe:
            raise bad_request(
                f"{unsafe[0]} contains control-token text, which this model's chat template does not render "
                "verbatim, so it cannot be kept plain text.",
                unsafe[0],
            )
        logger.warning("chat template altered a client string; encoding the rendered text (no control text in it)")
        kwargs = {**(template_kwargs or {}), **({"tools": tools} if tools else {})}
        rendered = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
        )
        return self.tokenizer.encode(rendered, add_special_tokens=False)
