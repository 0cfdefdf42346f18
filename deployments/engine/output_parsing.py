"""Chat output → reasoning, content and tool calls, through vLLM's own parsers (`vllm.parser`):
the reasoning parser (`<think>…</think>`: Qwen3's `qwen3`) and the tool-call parser (`hermes`:
Qwen's `<tool_call>` JSON blocks) named in the config (`model.reasoning_parser`,
`model.tool_call_parser`). The model replica holds one `OutputParsers` for its engine's
tokenizer and makes a `ChoiceParser` per choice of a chat request.

Forced tool calls (`tool_choice` `required` or a named function) are not parsed here: the
ingress constrains their output to the functions' JSON schemas and turns it into tool calls
itself (`api/tools.py`), so the parsers see them as `tool_choice: none`."""

from __future__ import annotations

from typing import Any


def check_parser_names(tool_parser: str | None, reasoning_parser: str | None) -> None:
    """A parser name vLLM does not have is a config error naming the field (the application
    builder checks it at start, before any replica is made)."""
    if tool_parser is None and reasoning_parser is None:
        return
    from vllm.reasoning import ReasoningParserManager
    from vllm.tool_parsers import ToolParserManager

    for field, name, manager in (
        ("model.tool_call_parser", tool_parser, ToolParserManager),
        ("model.reasoning_parser", reasoning_parser, ReasoningParserManager),
    ):
        if name is not None and name not in (known := manager.list_registered()):
            raise ValueError(f"{field} {name!r} is not one of vLLM's parsers: {sorted(known)}")


class OutputParsers:
    """vLLM's composed parser class for this model, built once per replica."""

    def __init__(self, tokenizer, tool_parser: str | None, reasoning_parser: str | None, model_name: str):
        from vllm.parser.parser_manager import ParserManager

        check_parser_names(tool_parser, reasoning_parser)
        self.tokenizer = tokenizer
        self.auto_tools = tool_parser is not None
        self.cls = ParserManager.get_parser(
            tool_parser_name=tool_parser,
            reasoning_parser_name=reasoning_parser,
            enable_auto_tools=self.auto_tools,
            model_name=model_name,
            tokenizer=tokenizer,
        )

    def for_choice(self, spec: dict[str, Any], prompt_token_ids: list[int]) -> ChoiceParser | None:
        """A parser for one choice of a chat request (`spec`: the request's `tools`,
        `tool_choice` and `chat_template_kwargs`, from `api.tools.parse_spec`); None when this
        model has no parser."""
        if self.cls is None:
            return None
        return ChoiceParser(self, spec, prompt_token_ids)


def _tool_call(tc) -> dict[str, Any]:
    return {"id": tc.id, "type": "function", "function": {"name": tc.name, "arguments": tc.arguments}}


def _delta_tool_call(tc) -> dict[str, Any]:
    out: dict[str, Any] = {"index": tc.index}
    if tc.id is not None:
        out["id"] = tc.id
    if tc.type is not None:
        out["type"] = tc.type
    if tc.function is not None:
        out["function"] = {
            k: v for k, v in (("name", tc.function.name), ("arguments", tc.function.arguments)) if v is not None
        }
    return out


class ChoiceParser:
    """vLLM's per-request parser for one choice: `final` for a whole output, `delta` per
    engine step of a stream (it keeps the stream's state)."""

    def __init__(self, parsers: OutputParsers, spec: dict[str, Any], prompt_token_ids: list[int]):
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        self.parsers = parsers
        self.prompt_token_ids = prompt_token_ids
        self.request = ChatCompletionRequest.model_validate(
            {
                "model": "parser",
                "messages": [{"role": "user", "content": ""}],
                "tools": spec.get("tools"),
                "tool_choice": spec.get("tool_choice") or "none",
                "chat_template_kwargs": spec.get("chat_template_kwargs"),
                "parallel_tool_calls": spec.get("parallel_tool_calls"),
            }
        )
        # parallel_tool_calls: false keeps the first call only, as vLLM's server does
        self.single_call = spec.get("parallel_tool_calls") is False
        self.parser = parsers.cls(
            parsers.tokenizer, self.request.tools, chat_template_kwargs=spec.get("chat_template_kwargs")
        )

    def final(self, text: str, token_ids) -> tuple[str | None, str | None, list[dict[str, Any]]]:
        """(reasoning, content, tool calls) of a whole output."""
        reasoning, content, calls = self.parser.parse(
            text, self.request, enable_auto_tools=self.parsers.auto_tools, model_output_token_ids=list(token_ids)
        )
        calls = [_tool_call(tc) for tc in calls or []]
        return reasoning, content, calls[:1] if self.single_call else calls

    def delta(self, text: str, token_ids, finished: bool) -> tuple[str | None, str | None, list[dict[str, Any]]]:
        """(reasoning, content, tool-call deltas) of one engine step's output."""
        msg = self.parser.parse_delta(text, list(token_ids), self.request, self.prompt_token_ids, finished=finished)
        if msg is None:
            return None, None, []
        deltas = [_delta_tool_call(tc) for tc in msg.tool_calls if not (self.single_call and tc.index > 0)]
        return msg.reasoning, msg.content, deltas
