"""OpenAI request schemas and response builders, in one place.

Requests are pydantic models mirroring OpenAI's, plus the sampling parameters vLLM's own
OpenAI server accepts beyond OpenAI's (`top_k`, `min_p`, `repetition_penalty`, `ignore_eos`,
`min_tokens`, `structured_outputs`, `chat_template_kwargs`, …), so clients and benchmarks written
for vLLM work unchanged. A field is honoured or refused, never dropped:

- an unknown field is a 400 naming it (`unknown_parameter`), as OpenAI's API answers;
- OpenAI fields this service does not implement are declared and refused with a 400 naming
  them (`unsupported_parameter`) when a client sets them (`UNSUPPORTED`);
- bookkeeping fields that change no output (`user`, `metadata`, `store`, `service_tier`, …,
  `NO_OPS`) are accepted and change no output; `prompt_cache_key` (else `user`) is the request
  router's session key (`deployments/routing`), as OpenAI uses it to bucket requests for its
  prompt cache.

Responses are plain dicts in OpenAI's shape, built in `responses.py`.

`GenerationRequest` / `GenerationChunk` are what the ingress and the model replica exchange.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

# Integers go to the engine core through msgpack (64-bit at most); token ids and counts fit 32.
_INT32_MAX = 2**31 - 1

# --------------------------------------------------------------------------- requests


class _Strict(BaseModel):
    # Unknown fields are a 400 naming them; NaN/Infinity are rejected.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, protected_namespaces=(), populate_by_name=True)


class StreamOptions(_Strict):
    include_usage: bool = Field(False, description="Send a last chunk with `usage`.")
    continuous_usage_stats: bool = Field(False, description="vLLM extension: `usage` on every chunk.")
    include_obfuscation: bool | None = Field(None, description="OpenAI's stream obfuscation; a no-op here.")


class JsonSchemaFormat(_Strict):
    name: str = Field(description="Name of the response format.", min_length=1, max_length=64)
    description: str | None = Field(None, description="What the format is for.")
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema", description="The JSON Schema.")
    strict: bool | None = Field(None, description="Output always follows the schema here (constrained decoding).")


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"] = Field(description="Output format.")
    json_schema: JsonSchemaFormat | None = Field(None, description="For `json_schema`.")


class StructuredOutputs(_Strict):
    """vLLM's `structured_outputs` extension: exactly one constraint."""

    json_: str | dict[str, Any] | None = Field(None, alias="json", description="A JSON Schema.")
    regex: str | None = Field(None, description="A regular expression.")
    choice: list[str] | None = Field(None, min_length=1, description="One of these strings.")
    grammar: str | None = Field(None, description="An EBNF (xgrammar/GBNF) grammar.")
    json_object: bool | None = Field(None, description="Any JSON object.")
    disable_any_whitespace: bool | None = Field(None, description="Compact JSON (the service default: true).")
    disable_additional_properties: bool | None = Field(None, description="No properties beyond the schema's.")
    whitespace_pattern: str | None = Field(None, description="Whitespace allowed in JSON.")

    @model_validator(mode="after")
    def _one_constraint(self):
        kinds = [k for k in ("json_", "regex", "choice", "grammar", "json_object") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"give exactly one of json, regex, choice, grammar, json_object (got {len(kinds)})")
        return self

    def engine_fields(self) -> dict[str, Any]:
        """Keyword arguments of vLLM's `StructuredOutputsParams` (the set fields)."""
        return self.model_dump(by_alias=True, exclude_none=True)


class TextContentPart(_Strict):
    type: Literal["text"] = Field(description="Only text parts are supported.")
    text: str = Field(description="The text.")


class FunctionDefinition(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$", description="Function name.")
    description: str | None = Field(None, description="What the function does (shown to the model).")
    parameters: dict[str, Any] | None = Field(None, description="The arguments' JSON Schema.")
    strict: bool | None = Field(None, description="Arguments always follow the schema when the call is forced.")


class Tool(_Strict):
    type: Literal["function"] = Field(description="Only function tools.")
    function: FunctionDefinition = Field(description="The function.")


class NamedFunction(_Strict):
    name: str = Field(description="The function to call.")


class NamedToolChoice(_Strict):
    type: Literal["function"] = Field(description="Only function tools.")
    function: NamedFunction = Field(description="The function to call.")


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCallIn(_Strict):
    name: str = Field(description="Function called.")
    arguments: str = Field(description="Its arguments, a JSON string.")


class ToolCallIn(_Strict):
    """A tool call in an assistant message of the conversation."""

    id: str = Field(description="Call id, answered by a tool message's tool_call_id.")
    type: Literal["function"] = Field("function", description="Only function calls.")
    function: FunctionCallIn = Field(description="The call.")


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(description="Author role.")
    content: str | list[TextContentPart] | None = Field(None, description="Text or text parts.")
    name: str | None = Field(None, description="Optional author name.")
    tool_calls: list[ToolCallIn] | None = Field(None, description="An assistant message's tool calls.")
    tool_call_id: str | None = Field(None, description="The call a tool message answers.")
    reasoning_content: str | None = Field(None, description="An assistant message's reasoning (vLLM/Qwen3).")
    reasoning: str | None = Field(None, description="Alias of reasoning_content (vLLM 0.32's name).")

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates read it (Qwen3's: tool calls with their arguments as
        objects, tool results, reasoning)."""
        out: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = [
                {
                    "id": tc.id,
                    "type": "function",
                    "function": {"name": tc.function.name, "arguments": _json_or_text(tc.function.arguments)},
                }
                for tc in self.tool_calls
            ]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if (reasoning := self.reasoning_content or self.reasoning) is not None:
            out["reasoning_content"] = reasoning
        return out


def _json_or_text(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


# Bookkeeping fields of OpenAI's requests that change no output: accepted (`prompt_cache_key`
# and `user` also route: `SamplingFields.session_key`).
NO_OPS = (
    "user",
    "metadata",
    "store",
    "service_tier",
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
)


class SamplingFields(_Strict):
    """Fields shared by chat and completions requests."""

    UNSUPPORTED: ClassVar[tuple[str, ...]] = ()

    model: str | None = Field(None, description="Served model name, alias or adapter; default: `model.default_model`.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate (cap: limits.max_tokens_cap).")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="Sampling temperature.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Nucleus sampling.")
    n: int = Field(1, ge=1, le=128, description="Number of choices (at most limits.max_n).")
    stream: bool = Field(False, description="Server-sent events.")
    stream_options: StreamOptions | None = Field(None, description="Streaming options.")
    stop: str | list[str] | None = Field(None, description="Stop strings (at most 8).")
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1, description="Per-request sampling seed.")
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="Presence penalty.")
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="Frequency penalty.")
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, max_length=1024, description="Token id (as a string) → bias added to its logit."
    )
    # bookkeeping (NO_OPS)
    user: str | None = Field(None, description="End-user id: the routing session key when `prompt_cache_key` is unset.")
    metadata: dict[str, str] | None = Field(None, description="Stored-completion metadata (not used).")
    store: bool | None = Field(None, description="Store the completion (nothing is stored here).")
    service_tier: str | None = Field(None, description="Processing tier (one tier here).")
    safety_identifier: str | None = Field(None, description="End-user id for abuse detection (not used).")
    prompt_cache_key: str | None = Field(
        None, description="Session key: requests with the same key go to the same model replica (routing.policy)."
    )
    prompt_cache_retention: str | None = Field(None, description="Cache hint (not used).")
    # vLLM extensions
    top_k: int | None = Field(None, ge=-1, le=_INT32_MAX, description="vLLM: top-k (-1 or 0: off).")
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="vLLM: min-p.")
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0, description="vLLM: repetition penalty.")
    ignore_eos: bool = Field(False, description="vLLM: keep generating past EOS (benchmarks).")
    min_tokens: int = Field(0, ge=0, le=_INT32_MAX, description="vLLM: generate at least this many tokens.")
    stop_token_ids: list[Annotated[int, Field(ge=0, le=_INT32_MAX)]] | None = Field(
        None, description="vLLM: stop on these token ids."
    )
    include_stop_str_in_output: bool = Field(False, description="vLLM: keep the stop string.")
    skip_special_tokens: bool = Field(True, description="vLLM: drop special tokens from the text.")
    spaces_between_special_tokens: bool = Field(True, description="vLLM: detokenizer option.")
    structured_outputs: StructuredOutputs | None = Field(
        None, description="vLLM: constrained decoding (json, regex, choice, grammar, json_object)."
    )
    timeout: float | None = Field(
        None, gt=0, description="Per-request deadline in seconds (capped by limits.request_timeout_s)."
    )
    priority: int = Field(
        0,
        ge=-(2**20),
        le=2**20,
        description="vLLM: the request's priority, lower first (default 0): orders this tenant's own "
        "requests in the capacity gate's queue and, with `engine.scheduling_policy: priority`, in the "
        "engine's; never ahead of another tenant's share (docs/security.md S17).",
    )

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v):
        if isinstance(v, list) and len(v) > 8:
            raise ValueError("at most 8 stop sequences")
        if isinstance(v, str):
            return [v] if v else None
        return [s for s in v if s] or None if v is not None else None

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, v):
        for key in v or {}:
            if not key.isdigit() or int(key) > _INT32_MAX:
                raise ValueError(f"logit_bias keys are token ids; {key!r} is not one")
        return v

    def session_key(self) -> str | None:
        """What the request router keeps together (`deployments.routing`): OpenAI's cache key,
        else the end-user id, as OpenAI documents `user` for cache bucketing."""
        return self.prompt_cache_key or self.user or None

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data):
        """OpenAI fields this service does not implement: a 400 naming the first one set (an
        explicit null is fine)."""
        if isinstance(data, dict):
            for name in cls.UNSUPPORTED:
                if data.get(name) is not None:
                    raise PydanticCustomError(
                        "unsupported_parameter", "{param} is not supported by this service.", {"param": name}
                    )
            data = {k: v for k, v in data.items() if k not in cls.UNSUPPORTED}
        return data

    def num_logprobs(self) -> int | None:
        """Alternatives per generated token to return (vLLM's `SamplingParams.logprobs`)."""
        raise NotImplementedError

    def structured(self) -> dict[str, Any] | None:
        """The constraint for vLLM's `StructuredOutputsParams`, if any."""
        return self.structured_outputs.engine_fields() if self.structured_outputs else None


class ChatCompletionRequest(SamplingFields):
    UNSUPPORTED: ClassVar[tuple[str, ...]] = (
        "audio",
        "function_call",
        "functions",
        "prediction",
        "web_search_options",
        "verbosity",
        "moderation",
        "prompt_cache_options",
        "reasoning_effort",
    )

    messages: list[ChatMessage] = Field(description="The conversation, oldest first.", min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Alias of max_tokens (newer OpenAI name).")
    logprobs: bool = Field(False, description="Return each output token's log-probability.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="Alternatives per token (needs logprobs).")
    response_format: ResponseFormat | None = Field(None, description="text, json_object or json_schema.")
    modalities: list[Literal["text"]] | None = Field(None, description="Only text output.")
    add_generation_prompt: bool = Field(True, description="vLLM: end the prompt with the assistant header.")
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="vLLM: extra variables for the chat template (e.g. enable_thinking)."
    )
    tools: list[Tool] | None = Field(None, description="Functions the model may call.")
    tool_choice: ToolChoice | None = Field(
        None, description="none, auto (default with tools), required, or a named function."
    )
    parallel_tool_calls: bool | None = Field(None, description="Allow more than one call (default true).")
    include_reasoning: bool = Field(True, description="vLLM: return the reasoning (when the model has a parser).")

    @model_validator(mode="after")
    def _check_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def structured(self) -> dict[str, Any] | None:
        rf = self.response_format
        if rf is None or rf.type == "text":
            return super().structured()
        base = super().structured() or {}
        for key in ("json", "regex", "choice", "grammar", "json_object"):
            base.pop(key, None)  # response_format wins, as in vLLM's server
        if rf.type == "json_object":
            return {**base, "json_object": True}
        if rf.json_schema is None:
            raise ValueError("response_format: json_schema is required when type is json_schema")
        return {**base, "json": rf.json_schema.schema_}


class CompletionRequest(SamplingFields):
    UNSUPPORTED: ClassVar[tuple[str, ...]] = ("suffix",)

    prompt: str | list[int] | list[str] = Field(
        description="Prompt text, a token-id list, or a one-element list of text."
    )
    echo: bool = Field(False, description="Prepend the prompt to the completion text.")
    logprobs: int | None = Field(None, ge=0, le=5, description="Log-probabilities of this many alternatives per token.")
    best_of: int | None = Field(None, ge=1, description="Must equal n when set (no server-side best-of here).")

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

    @model_validator(mode="after")
    def _check_best_of(self):
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of must equal n: this service returns every sequence it generates")
        return self

    def num_logprobs(self) -> int | None:
        return self.logprobs


class ClassifyRequest(_Strict):
    """POST /v1/classify, in the style of OpenAI's embeddings endpoint."""

    model: str | None = Field(None, description="Base model or adapter name; default: the base model.")
    input: str | list[str] = Field(description="One text or a list of texts to classify.")
    labels: list[str] | None = Field(
        None, min_length=2, description="A subset of the configured label set; default: all of it."
    )

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class LoadLoraRequest(_Strict):
    """POST /v1/load_lora_adapter (vLLM's shape)."""

    lora_name: str = Field(
        min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$", description="Name clients will pass as `model`."
    )
    lora_path: str = Field(min_length=1, description="Adapter folder on the model replicas' nodes.")


class UnloadLoraRequest(_Strict):
    """POST /v1/unload_lora_adapter (vLLM's shape)."""

    lora_name: str = Field(min_length=1, description="Adapter to remove.")


# ------------------------------------------------------------------- internal messages

# above the surrogates: every token id of a vocabulary under ~1 M maps to a valid code point
_TOKEN_CODE_POINT_BASE = 0x10000


@dataclass
class GenerationRequest:
    """What the ingress sends the model replica."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: dict[str, Any]
    lora: str | None = None
    # chat requests on a model with output parsers: what they need (`api.tools.parse_spec`)
    parse: dict[str, Any] | None = None
    # vLLM's scheduling priority (lower first; `admission.capacity.engine_priority`)
    priority: int = 0
    # the request's session key (`prompt_cache_key`, else `user`): the request router's
    # affinity key (deployments/routing); the engine never sees it
    session: str | None = None

    @property
    def prompt(self) -> str:
        """The token ids as a string, one code point per token, for Ray Serve LLM's
        `PrefixCacheAffinityRouter` (`routing.policy: ray_prefix`), which matches prefixes of a
        `prompt` string: a character prefix here is exactly a token prefix."""
        return "".join(map(chr, (_TOKEN_CODE_POINT_BASE + t for t in self.prompt_token_ids)))


@dataclass
class GenerationChunk:
    """A coalesced piece of one choice's output: the text and token count since the previous
    chunk of that choice, and (when asked for) each token's log-probability as
    (token text, logprob, [(alternative text, logprob), ...])."""

    text: str
    num_tokens: int
    finish_reason: str | None = None
    stop_reason: Any = None
    index: int = 0
    logprobs: list[tuple[str, float, list[tuple[str, float]]]] | None = None
    # the prompt's tokens with their log-probabilities (completions `echo` + `logprobs`; the
    # first token has none): in the first chunk of each choice
    prompt_logprobs: list[tuple[str, float | None, list[tuple[str, float]]]] | None = None
    # chat on a model with output parsers: the reasoning moved out of `text`, and the tool
    # calls the model made (whole when not streaming; OpenAI stream deltas when streaming)
    reasoning: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


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
