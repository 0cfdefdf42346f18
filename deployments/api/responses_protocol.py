"""OpenAI's Responses API (`POST /v1/responses`): the request schema and the input items it
carries. The serving side (`serving_responses.py`) translates a request into the internal chat
completions request and the chat path's result into Response objects and stream events.

The same contract as chat completions (`protocol.py`): a field is honoured, or refused with a
400 naming it; never accepted and dropped.

- Honoured: `model`, `input` (a string, or a list of items: messages with text parts,
  `function_call`, `function_call_output`, `reasoning`), `instructions`, `max_output_tokens`,
  `temperature`, `top_p`, `tools` (function tools), `tool_choice`, `parallel_tool_calls`,
  `text.format`, `stream`, `include: ["message.output_text.logprobs"]` with `top_logprobs`,
  `metadata` (echoed, OpenAI's limits), `max_tool_calls` (echoed: there are no built-in tools
  to call), vLLM's sampling extensions as on chat.
- Bookkeeping that changes no output, as on chat (`protocol.NO_OPS`): `user`,
  `safety_identifier`, `prompt_cache_key`, `prompt_cache_retention`, `service_tier`,
  `stream_options.include_obfuscation`.
- Refused: `store: true`, `previous_response_id`, `background: true` (nothing is stored:
  vLLM's server stores nothing either unless started with VLLM_ENABLE_RESPONSES_API_STORE, and
  by default drops `store: true` silently, which this contract rules out); `truncation: "auto"`;
  any `reasoning` setting; `text.verbosity`; `prompt`, `conversation`, `context_management`,
  `moderation`, `prompt_cache_options`; tools other than functions; input parts other than
  text (images, files, audio); input items other than those above.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, TypeAdapter, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from deployments.api.protocol import _INT32_MAX, StructuredOutputs, _Strict

# The include values honoured (logprobs of the output text).
INCLUDE_LOGPROBS = "message.output_text.logprobs"


def _refuse(param: str, why: str = "", what: str = "") -> PydanticCustomError:
    """A 400 `unsupported_parameter` naming `param` (`errors.validation_error_response`)."""
    return PydanticCustomError(
        "unsupported_parameter",
        "{what} is not supported by this service{why}.",
        {"param": param, "what": what or param, "why": why},
    )


# --------------------------------------------------------------------------- request parts


class FunctionTool(_Strict):
    """A function tool, in the Responses API's flat shape."""

    type: Literal["function"] = Field(description="Only function tools.")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$", description="Function name.")
    description: str | None = Field(None, description="What the function does (shown to the model).")
    parameters: dict[str, Any] | None = Field(None, description="The arguments' JSON Schema.")
    strict: bool | None = Field(None, description="Arguments always follow the schema when the call is forced.")


class ToolChoiceFunction(_Strict):
    type: Literal["function"] = Field(description="Force a call of this function.")
    name: str = Field(description="The function to call.")


class TextFormatText(_Strict):
    type: Literal["text"]


class TextFormatJsonObject(_Strict):
    type: Literal["json_object"]


class TextFormatJsonSchema(_Strict):
    type: Literal["json_schema"]
    name: str = Field(min_length=1, max_length=64, description="Name of the format.")
    description: str | None = Field(None, description="What the format is for.")
    schema_: dict[str, Any] = Field(alias="schema", description="The JSON Schema the output follows.")
    strict: bool | None = Field(None, description="Output always follows the schema here (constrained decoding).")


TextFormat = Annotated[TextFormatText | TextFormatJsonObject | TextFormatJsonSchema, Field(discriminator="type")]


class ResponseText(_Strict):
    format: TextFormat | None = Field(None, description="text (default), json_object or json_schema.")
    verbosity: str | None = Field(None, description="Not supported (a 400 when set).")

    @model_validator(mode="before")
    @classmethod
    def _refuse_verbosity(cls, data):
        if isinstance(data, dict) and data.get("verbosity") is not None:
            raise _refuse("text.verbosity")
        return data


class Reasoning(_Strict):
    """OpenAI's reasoning settings: none is honoured (a reasoning parser returns the model's
    reasoning whatever they say), so setting any is a 400."""

    effort: str | None = None
    summary: str | None = None
    generate_summary: str | None = None
    mode: str | None = None
    context: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_settings(cls, data):
        if isinstance(data, dict):
            for name, value in data.items():
                if value is not None and name in cls.model_fields:
                    raise _refuse(f"reasoning.{name}")
        return data


class ResponseStreamOptions(_Strict):
    include_obfuscation: bool | None = Field(None, description="OpenAI's stream obfuscation; a no-op here.")


def _check_metadata(v: dict[str, str] | None) -> dict[str, str] | None:
    if v is None:
        return v
    if len(v) > 16:
        raise ValueError("at most 16 key-value pairs")
    for key, value in v.items():
        if len(key) > 64:
            raise ValueError(f"keys are at most 64 characters ({key[:20]!r}… is {len(key)})")
        if len(value) > 512:
            raise ValueError(f"values are at most 512 characters (the value of {key!r} is {len(value)})")
    return v


# --------------------------------------------------------------------------- the request


class ResponsesRequest(_Strict):
    """POST /v1/responses (OpenAI's `CreateResponse`, plus vLLM's sampling extensions)."""

    UNSUPPORTED: ClassVar[tuple[str, ...]] = (
        "prompt",
        "conversation",
        "context_management",
        "moderation",
        "prompt_cache_options",
    )

    model: str | None = Field(None, description="Served model name, alias or adapter; default: `model.default_model`.")
    input: str | list[Any] = Field(
        description="A user message's text, or a list of input items (messages, function calls and "
        "their outputs, reasoning), oldest first."
    )
    instructions: str | None = Field(None, description="A system message put before the input.")
    max_output_tokens: int | None = Field(
        None, ge=1, description="Most tokens to generate (default: limits.default_max_tokens_chat)."
    )
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="Sampling temperature.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Nucleus sampling.")
    tools: list[FunctionTool] | None = Field(None, description="Functions the model may call.")
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | None = Field(
        None, description="none, auto (default with tools), required, or a named function."
    )
    parallel_tool_calls: bool | None = Field(None, description="Allow more than one call (default true).")
    max_tool_calls: int | None = Field(None, ge=1, description="Built-in tool calls (there are none here): echoed.")
    text: ResponseText | None = Field(None, description="The output's format.")
    stream: bool = Field(False, description="Server-sent events (the ResponseStreamEvent sequence).")
    stream_options: ResponseStreamOptions | None = Field(None, description="Streaming options.")
    include: list[str] | None = Field(None, description="Only `message.output_text.logprobs`.")
    top_logprobs: int | None = Field(
        None, ge=0, le=20, description="Alternatives per token (with include message.output_text.logprobs)."
    )
    metadata: dict[str, str] | None = Field(None, description="Echoed in the response (16 pairs at most).")
    # refused when set (nothing is stored): see the module docstring
    store: bool | None = Field(None, description="Only false or unset: responses are not stored here.")
    previous_response_id: str | None = Field(None, description="Not supported: responses are not stored here.")
    background: bool | None = Field(None, description="Only false or unset (needs stored responses).")
    truncation: Literal["auto", "disabled"] | None = Field(None, description="Only `disabled` (the default).")
    reasoning: Reasoning | None = Field(None, description="Not supported when it sets anything.")
    # bookkeeping (protocol.NO_OPS)
    user: str | None = Field(None, description="End-user id (echoed, not used).")
    safety_identifier: str | None = Field(None, description="End-user id for abuse detection (echoed, not used).")
    prompt_cache_key: str | None = Field(None, description="Cache hint (prefix caching is automatic here).")
    prompt_cache_retention: str | None = Field(None, description="Cache hint (not used).")
    service_tier: str | None = Field(None, description="Processing tier (one tier here: `default`).")
    # vLLM extensions, as on chat completions
    top_k: int | None = Field(None, ge=-1, le=_INT32_MAX, description="vLLM: top-k (-1 or 0: off).")
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="vLLM: min-p.")
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0, description="vLLM: repetition penalty.")
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="vLLM: presence penalty.")
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="vLLM: frequency penalty.")
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1, description="vLLM: per-request sampling seed.")
    stop: str | list[str] | None = Field(None, description="vLLM: stop strings (at most 8).")
    stop_token_ids: list[Annotated[int, Field(ge=0, le=_INT32_MAX)]] | None = Field(
        None, description="vLLM: stop on these token ids."
    )
    ignore_eos: bool = Field(False, description="vLLM: keep generating past EOS (benchmarks).")
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, max_length=1024, description="vLLM: token id (as a string) → bias added to its logit."
    )
    skip_special_tokens: bool = Field(True, description="vLLM: drop special tokens from the text.")
    include_stop_str_in_output: bool = Field(False, description="vLLM: keep the stop string.")
    structured_outputs: StructuredOutputs | None = Field(
        None, description="vLLM: constrained decoding (not with text.format json_object/json_schema)."
    )
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="vLLM: extra variables for the chat template (e.g. enable_thinking)."
    )
    include_reasoning: bool = Field(True, description="vLLM: return the reasoning (when the model has a parser).")
    priority: int = Field(0, ge=-(2**20), le=2**20, description="vLLM: the request's priority, lower first.")
    timeout: float | None = Field(
        None, gt=0, description="Per-request deadline in seconds (capped by limits.request_timeout_s)."
    )

    @field_validator("metadata")
    @classmethod
    def _metadata_limits(cls, v):
        return _check_metadata(v)

    @field_validator("include")
    @classmethod
    def _check_include(cls, v):
        for value in v or ():
            if value != INCLUDE_LOGPROBS:
                raise _refuse("include", f" (only {INCLUDE_LOGPROBS!r} is)", f"include value {value!r}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data):
        """OpenAI fields and values this service does not implement: a 400 naming the first."""
        if not isinstance(data, dict):
            return data
        for name in cls.UNSUPPORTED:
            if data.get(name) is not None:
                raise _refuse(name)
        data = {k: v for k, v in data.items() if k not in cls.UNSUPPORTED}
        if data.get("store") is True:
            raise _refuse("store", ": responses are not stored (send store: false, or leave it out)")
        if data.get("previous_response_id") is not None:
            raise _refuse("previous_response_id", ": responses are not stored (send the conversation as input)")
        if data.get("background") is True:
            raise _refuse("background", ": responses are not stored")
        if data.get("truncation") == "auto":
            raise _refuse("truncation", " (an input over the context is a 400)", "truncation 'auto'")
        return data

    @field_validator("top_logprobs")
    @classmethod
    def _check_top_logprobs(cls, v, info: ValidationInfo):
        if v and INCLUDE_LOGPROBS not in (info.data.get("include") or ()):
            raise ValueError(f"top_logprobs needs include: [{INCLUDE_LOGPROBS!r}]")
        return v

    def wants_logprobs(self) -> bool:
        return INCLUDE_LOGPROBS in (self.include or ())


# --------------------------------------------------------------------------- input items
# Parsed one by one by the serving side (`parse_item`), so a bad item's 400 names it exactly
# (`input.3.content.0.type`) rather than every branch of a union.


class InputText(_Strict):
    type: Literal["input_text"]
    text: str


class OutputText(_Strict):
    """An assistant message's text, as a previous response returned it."""

    type: Literal["output_text"]
    text: str
    annotations: list[dict[str, Any]] | None = None
    logprobs: list[dict[str, Any]] | None = None


TextPart = Annotated[InputText | OutputText, Field(discriminator="type")]


class MessageItem(_Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[TextPart]
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    phase: Literal["commentary", "final_answer"] | None = None

    def texts(self) -> list[str]:
        return [self.content] if isinstance(self.content, str) else [p.text for p in self.content]


class FunctionCallItem(_Strict):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class FunctionCallOutputItem(_Strict):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str | list[InputText]
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(p.text for p in self.output)


class SummaryText(_Strict):
    type: Literal["summary_text"]
    text: str


class ReasoningText(_Strict):
    type: Literal["reasoning_text"]
    text: str


class ReasoningItem(_Strict):
    type: Literal["reasoning"]
    summary: list[SummaryText] = Field(default_factory=list)
    content: list[ReasoningText] | None = None
    id: str | None = None
    encrypted_content: None = Field(None, description="Not supported (never produced here).")
    status: Literal["in_progress", "completed", "incomplete"] | None = None

    def text(self) -> str:
        if self.content:
            return self.content[0].text
        return self.summary[0].text if self.summary else ""


InputItem = MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem

ITEM_TYPES: dict[str, TypeAdapter[Any]] = {
    "message": TypeAdapter(MessageItem),
    "function_call": TypeAdapter(FunctionCallItem),
    "function_call_output": TypeAdapter(FunctionCallOutputItem),
    "reasoning": TypeAdapter(ReasoningItem),
}


def item_type(item: Any) -> Any:
    """An input item's type (messages may leave it out: OpenAI's EasyInputMessage)."""
    return item.get("type", "message") if isinstance(item, dict) else None
