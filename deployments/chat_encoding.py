"""The one chat encoding: a conversation → the prompt's token ids, for serving and training.

The tokenizer deployment (`deployments/tokenizer.py`) sends these ids to the engine, and the
training scripts (`scripts/train_lora.py`, `scripts/build_tiny_model.py`) train on them, so an
adapter learns on exactly the ids it is served with. Takes a Hugging Face tokenizer; imports
neither Ray nor torch.

No client string becomes a control token: control-token text (a literal ``<|im_start|>``, or
an added marker such as ``<think>``/``<tool_call>``) in any field the chat template renders is
encoded as plain text. Message contents, and every other client string (names, reasoning, tool
call ids, names and arguments, tool definitions, chat_template_kwargs values) that holds
control-token text, are swapped for sentinels before the template is rendered; the template's
own text is encoded with special tokens parsed, the client strings without any
(`_ClientStrings`, `ChatEncoder.plain_encode`).
"""

from __future__ import annotations

import functools
import json
import logging
import re
import weakref
from typing import Any

from deployments.classification import CHAT_TEMPLATE_KWARGS, build_messages

logger = logging.getLogger("ray.serve")

# A client string's stand-in while the template renders. The `"` shows whether the template
# JSON-encoded it (`tool | tojson`: `\"`), so the string is put back escaped the same way.
_SENTINEL = '\ue000{}"\ue001'
_SENTINEL_RE = re.compile('\ue000(\\d+)(\\\\?)"\ue001')
_MARKS = ("\ue000", "\ue001")


class ControlTextError(ValueError):
    """A client string holding control text that the chat template does not render verbatim
    (so it cannot be kept plain text); `field` names it (`messages[1].content`)."""

    def __init__(self, field: str):
        super().__init__(
            f"{field} contains control-token text, which this model's chat template does not render "
            "verbatim, so it cannot be kept plain text."
        )
        self.field = field


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


_ENCODERS: weakref.WeakKeyDictionary[Any, ChatEncoder] = weakref.WeakKeyDictionary()


class ChatEncoder:
    """A tokenizer's chat encoding. Thread-safe once built (the plain-text tokenizer is its own
    object); `ChatEncoder.of(tokenizer)` shares one per tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    @classmethod
    def of(cls, tokenizer) -> ChatEncoder:
        encoder = _ENCODERS.get(tokenizer)
        if encoder is None:
            encoder = _ENCODERS[tokenizer] = cls(tokenizer)
        return encoder

    def encode(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        template_kwargs: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """The template's text encoded with special tokens parsed, every client string that
        could hold control text (`_ClientStrings`) encoded as plain text in its place.
        `messages`: as `ChatMessage.for_template` gives them (content flattened to text);
        `template_kwargs`: extra chat-template variables; `tools`: function tools.
        Raises `ControlTextError`, or what the template raises for a conversation it rejects."""
        client = _ClientStrings(self.control)
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
                ids.extend(self.plain_encode(text))
        return ids

    def classification_prompt(self, text: str) -> list[int]:
        """The prompt asking for `text`'s label (`deployments/classification.py`'s format)."""
        return self.encode(build_messages(text), True, CHAT_TEMPLATE_KWARGS)

    @functools.cached_property
    def control(self) -> _ControlText:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        normalizer = getattr(backend, "normalizer", None)
        return _ControlText(list(self.tokenizer.get_added_vocab()), normalizer.normalize_str if normalizer else None)

    @functools.cached_property
    def plain_encode(self):
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
        control text; otherwise a `ControlTextError` naming the field."""
        unsafe = client.unsafe_fields()
        if unsafe:
            raise ControlTextError(unsafe[0])
        logger.warning("chat template altered a client string; encoding the rendered text (no control text in it)")
        kwargs = {**(template_kwargs or {}), **({"tools": tools} if tools else {})}
        rendered = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
        )
        return self.tokenizer.encode(rendered, add_special_tokens=False)
