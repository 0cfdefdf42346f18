"""Differential test against vLLM's own OpenAI server: the same requests, the same model and
engine arguments (`engine_kwargs_for` + `vllm_cli_args`, as the benchmark starts it), the same
answers — status, response shape (JSON key sets), greedy text, tokens and usage; logprobs equal
within rounding. Streams are compared by their concatenated text, logprobs and usage: chunk
boundaries differ by design (ours coalesces tokens).

Where ours deliberately differs from vLLM's server, a test says so explicitly:

1. `error.code` is a string (OpenAI's `"invalid_value"`, ...), vLLM's is the HTTP status as an
   integer; `error.type` is OpenAI's `"invalid_request_error"`, vLLM's `"BadRequestError"`.
2. The chat `logprobs` object carries OpenAI's `refusal: null` (vLLM's lacks it);
   `message.refusal: null` is present (vLLM 0.32 sends it too).
3. An unknown request field is a 400 `unknown_parameter` naming it; vLLM ignores it.
4. OpenAI fields we don't implement (`tools`, `tool_choice`, ...) are a 400
   `unsupported_parameter`; vLLM honours or ignores them.
5. prompt + max_tokens over the context is a 400 `context_length_exceeded` (as OpenAI's API
   answers, checked by the tokenizer deployment before a GPU slot is taken); vLLM's server
   shortens max_tokens to what is left of the context and answers 200.
6. vLLM's extension fields in responses (`stop_reason`, `token_ids`, `prompt_logprobs`,
   `kv_transfer_params`, ...) and a few optional OpenAI ones (`system_fingerprint`,
   `service_tier`, `usage.*_details`, `message.annotations`/`audio`/`function_call`) are not
   sent by ours: listed in `VLLM_ONLY`, and each must be null in vLLM's answer unless listed in
   `VLLM_ONLY_VALUES` (information ours does not give).
7. Completions take one prompt per request (a list of prompts is a 400); limits of ours
   (`limits.max_tokens_cap`, completions `logprobs` <= 5 as OpenAI's) are not vLLM's.
8. Chat `top_logprobs` are the most likely tokens (OpenAI's meaning); vLLM's server lists the
   sampled token first, so a token forced by `logit_bias` displaces the most likely one.
9. A named tool choice's arguments always follow the function's schema.

vLLM's server (`conftest.vllm_server`) is started once per session, only when a module that uses
it runs, and stopped (by pid, with everything it spawned) at the end of the session.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any

import conftest
import httpx
import pytest
from conftest import VllmServer

MODEL = "tiny-qwen3"
ADAPTER = "news-lora"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "user", "content": "央行宣布降息25个基点"}]
PROMPT = "央行宣布"
LABELS = ["news_finance", "news_sports", "news_tech"]
SCHEMA = {
    "type": "object",
    "properties": {"label": {"type": "string", "enum": LABELS}},
    "required": ["label"],
    "additionalProperties": False,
}
GREEDY = {"temperature": 0, "seed": 0}
TIMEOUT_S = 120
# Both engines run the same kernels with the same thread count (OMP_NUM_THREADS from
# cpu_engine_env) on the same requests, one at a time: in practice the values are bit-identical.
LOGPROB_TOL = 1e-3

# Fields of vLLM's responses (and stream chunks) that ours does not send, by position
# ("" the response/chunk, "choices.*" a choice, ...): vLLM's extensions and optional OpenAI fields.
VLLM_ONLY: dict[str, set[str]] = {
    "": {
        "service_tier",
        "system_fingerprint",  # OpenAI, optional
        "prompt_logprobs",
        "prompt_token_ids",
        "prompt_text",  # vLLM extensions
        "kv_transfer_params",
        "ec_transfer_params",
        "metrics",
    },
    "choices.*": {"stop_reason", "token_ids", "routed_experts", "prompt_logprobs", "prompt_token_ids"},
    "choices.*.message": {
        "annotations",
        "audio",
        "function_call",  # OpenAI, optional
        "reasoning",
    },  # vLLM (reasoning parsers)
    "usage": {"prompt_tokens_details", "completion_tokens_details"},  # OpenAI, optional
}
# ... of which these may carry a value in vLLM's answer (information ours does not give); every
# other VLLM_ONLY field must be null there.
VLLM_ONLY_VALUES = {
    "system_fingerprint",  # "vllm-<version>-<hash>"
    "choices.*.stop_reason",  # the stop string or token id that ended the choice
    "choices.*.prompt_logprobs",  # with `echo` + `logprobs`: the prompt's logprobs by token id
    "choices.*.prompt_token_ids",  # a streamed `echo`: the prompt's token ids in the first chunk
}
# Fields only ours sends. Deliberate difference (2): OpenAI's chat logprobs object has `refusal`.
OURS_ONLY_CHAT: dict[str, set[str]] = {"choices.*.logprobs": {"refusal"}}
# Different on every call.
VOLATILE = {"id", "created"}


# ----------------------------------------------------------------------------- requests


@dataclass
class Reply:
    status: int
    body: Any = None  # JSON body (non-streamed, or an error)
    chunks: list[dict[str, Any]] = field(default_factory=list)  # streamed: the data events
    done: bool = False  # streamed: ended with [DONE]

    def dump(self) -> str:
        obj = self.body if self.body is not None else self.chunks
        return f"HTTP {self.status} " + json.dumps(obj, ensure_ascii=False)[:4000]


def call(base: str, path: str, body: dict[str, Any]) -> Reply:
    if not body.get("stream"):
        r = httpx.post(base + path, json=body, timeout=TIMEOUT_S)
        return Reply(r.status_code, r.json())
    with httpx.stream("POST", base + path, json=body, timeout=TIMEOUT_S) as r:
        if r.status_code != 200:
            r.read()
            return Reply(r.status_code, r.json())
        reply = Reply(200)
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            if data == "[DONE]":
                reply.done = True
            else:
                reply.chunks.append(json.loads(data))
        return reply


def both(base_url: str, vllm: VllmServer, path: str, body: dict[str, Any]) -> tuple[Reply, Reply]:
    """(ours, vLLM's) answers to the same request."""
    return call(base_url, path, body), call(vllm.url, path, body)


# ----------------------------------------------------------------------------- comparing


def pattern(path: tuple) -> str:
    return ".".join("*" if isinstance(p, int) else str(p) for p in path)


def differences(ours: Any, theirs: Any, chat: bool, path: tuple = ()) -> list[str]:
    """Where `ours` differs from vLLM's `theirs` (JSON values), beyond the documented
    differences: key sets (VLLM_ONLY / OURS_ONLY_CHAT), values (floats within LOGPROB_TOL)."""
    where = pattern(path) or "<response>"
    if isinstance(ours, dict) and isinstance(theirs, dict):
        out = []
        pat = pattern(path)
        only_ours = set(ours) - set(theirs) - (OURS_ONLY_CHAT.get(pat, set()) if chat else set())
        only_vllm = set(theirs) - set(ours) - VLLM_ONLY.get(pat, set())
        if only_ours:
            out.append(f"{where}: only ours sends {sorted(only_ours)}")
        if only_vllm:
            out.append(f"{where}: only vLLM sends {sorted(only_vllm)}")
        for key in sorted(set(theirs) - set(ours)):
            name = f"{pat}.{key}" if pat else key
            if theirs[key] is not None and key in VLLM_ONLY.get(pat, ()) and name not in VLLM_ONLY_VALUES:
                out.append(f"{where}: vLLM's {key}={theirs[key]!r} carries information ours does not send")
        for key in sorted(set(ours) & set(theirs)):
            if path == () and key in VOLATILE:
                continue
            out += differences(ours[key], theirs[key], chat, path + (key,))
        return out
    if isinstance(ours, list) and isinstance(theirs, list):
        if len(ours) != len(theirs):
            return [f"{where}: {len(ours)} items (ours) vs {len(theirs)} (vLLM): {ours!r} vs {theirs!r}"]
        out = []
        for i, (a, b) in enumerate(zip(ours, theirs)):
            out += differences(a, b, chat, path + (i,))
        return out
    numbers = (int, float)
    if (
        (isinstance(ours, float) or isinstance(theirs, float))
        and isinstance(ours, numbers)
        and isinstance(theirs, numbers)
        and not isinstance(ours, bool)
        and not isinstance(theirs, bool)
    ):
        return [] if abs(ours - theirs) <= LOGPROB_TOL else [f"{where}: {ours!r} (ours) vs {theirs!r} (vLLM)"]
    return [] if ours == theirs else [f"{where}: {ours!r} (ours) vs {theirs!r} (vLLM)"]


def key_sets(obj: Any, path: tuple = (), out: dict[str, set[str]] | None = None) -> dict[str, set[str]]:
    """Every object's key set by position (union over list items); not inside the completions
    `top_logprobs` maps, whose keys are tokens."""
    out = {} if out is None else out
    if isinstance(obj, dict):
        out.setdefault(pattern(path), set()).update(obj)
        for k, v in obj.items():
            if not (k == "top_logprobs" and "tokens" in obj):  # completions: {token text: logprob}
                key_sets(v, path + (k,), out)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            key_sets(v, path + (i,), out)
    return out


def chunk_shape_differences(ours: Reply, theirs: Reply, chat: bool) -> list[str]:
    """The streams' chunks: every position's key set (union over the chunks) compared."""
    a, b = {}, {}
    for c in ours.chunks:
        key_sets(c, (), a)
    for c in theirs.chunks:
        key_sets(c, (), b)
    out = []
    for pat in sorted(set(a) | set(b)):
        ka, kb = a.get(pat, set()), b.get(pat, set())
        only_ours = ka - kb - (OURS_ONLY_CHAT.get(pat, set()) if chat else set())
        only_vllm = kb - ka - VLLM_ONLY.get(pat, set())
        if only_ours:
            out.append(f"chunks {pat or '<chunk>'}: only ours sends {sorted(only_ours)}")
        if only_vllm:
            out.append(f"chunks {pat or '<chunk>'}: only vLLM sends {sorted(only_vllm)}")
    return out


def assemble(reply: Reply, chat: bool) -> dict[str, Any]:
    """A stream as the non-streamed response it adds up to: per choice the concatenated text
    (chat: `message` with the first delta's role), logprobs and the finish reason; the usage."""
    first = reply.chunks[0] if reply.chunks else {}
    choices: dict[int, dict[str, Any]] = {}
    usage = None
    for chunk in reply.chunks:
        if chunk.get("usage") is not None:
            usage = chunk["usage"]
        for c in chunk.get("choices", []):
            acc = choices.setdefault(
                c["index"], {"index": c["index"], "text": "", "role": None, "logprobs": None, "finish_reason": None}
            )
            if chat:
                acc["text"] += c["delta"].get("content") or ""
                acc["role"] = acc["role"] or c["delta"].get("role")
            else:
                acc["text"] += c.get("text") or ""
            lp = c.get("logprobs")
            if lp is not None:
                keys = ("content",) if chat else ("tokens", "token_logprobs", "top_logprobs", "text_offset")
                prev = acc["logprobs"] or {k: [] for k in keys}
                acc["logprobs"] = {k: prev[k] + (lp[k] or []) for k in keys}
            if c.get("finish_reason") is not None:
                acc["finish_reason"] = c["finish_reason"]
    out_choices = []
    for i in sorted(choices):
        acc = choices[i]
        if chat:
            out_choices.append(
                {
                    "index": i,
                    "message": {"role": acc["role"], "content": acc["text"]},
                    "logprobs": acc["logprobs"],
                    "finish_reason": acc["finish_reason"],
                }
            )
        else:
            out_choices.append(
                {"index": i, "text": acc["text"], "logprobs": acc["logprobs"], "finish_reason": acc["finish_reason"]}
            )
    out = {"object": first.get("object"), "model": first.get("model"), "choices": out_choices}
    if usage is not None:
        out["usage"] = usage
    return out


def stream_layout(reply: Reply) -> dict[str, Any]:
    """What the two streams must agree on besides the assembled content: [DONE] at the end,
    usage only in the last chunk, which has no choices (`stream_options.include_usage`)."""
    with_usage = [i for i, c in enumerate(reply.chunks) if c.get("usage") is not None]
    return {
        "done": reply.done,
        "usage_chunks": [i - len(reply.chunks) for i in with_usage],
        "last_chunk_choices": len(reply.chunks[-1]["choices"]) if with_usage else None,
        "ids": len({c["id"] for c in reply.chunks}),
        "objects": sorted({c["object"] for c in reply.chunks}),
    }


def assert_same(ours: Reply, theirs: Reply, chat: bool) -> None:
    ctx = f"\nours: {ours.dump()}\nvLLM: {theirs.dump()}"
    assert ours.status == theirs.status == 200, ctx
    if ours.body is not None or theirs.body is not None:
        assert ours.body is not None and theirs.body is not None, ctx
        assert ours.body["id"].split("-")[0] == theirs.body["id"].split("-")[0], ctx  # chatcmpl- / cmpl-
        diffs = differences(ours.body, theirs.body, chat)
    else:
        diffs = chunk_shape_differences(ours, theirs, chat)
        if stream_layout(ours) != stream_layout(theirs):
            diffs.append(f"stream layout: {stream_layout(ours)} (ours) vs {stream_layout(theirs)} (vLLM)")
        diffs += differences(assemble(ours, chat), assemble(theirs, chat), chat)
    assert not diffs, "\n".join(diffs) + ctx


def assert_same_error(ours: Reply, theirs: Reply, status: int = 400, same_param: bool = True) -> None:
    ctx = f"\nours: {ours.dump()}\nvLLM: {theirs.dump()}"
    assert ours.status == theirs.status == status, ctx
    o, v = ours.body["error"], theirs.body["error"]
    assert set(o) == set(v) == {"message", "type", "param", "code"}, ctx
    # Deliberate difference (1): OpenAI's string codes and type; vLLM: the status, an int.
    assert isinstance(o["code"], str) and o["code"], ctx
    assert v["code"] == status, ctx
    assert o["type"] == "invalid_request_error" and v["type"] == "BadRequestError", ctx
    assert isinstance(o["message"], str) and o["message"], ctx
    if same_param:
        assert o["param"] == v["param"], ctx


# ----------------------------------------------------------------------------- the matrix


@dataclass
class Case:
    id: str
    path: str
    body: dict[str, Any]
    streams: tuple[bool, ...] = (False, True)
    marks: tuple = ()


def chat(**kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": MESSAGES, **GREEDY, **kw}


def completion(**kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": PROMPT, **GREEDY, **kw}


@functools.lru_cache(maxsize=1)
def tokenizer():
    """The model folder's tokenizer: both servers'."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(conftest.MODEL_DIR)


BIAS_TEXT = "体育"  # logit_bias {"<bias>": v}: the first token of this text
PROMPT_IDS = "<prompt ids>"  # `prompt`: PROMPT as token ids
JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "label", "schema": SCHEMA, "strict": True}}

CASES = [
    # chat
    Case("chat-plain", CHAT, chat(max_tokens=8, ignore_eos=True)),
    Case("chat-stop", CHAT, chat(max_tokens=12, ignore_eos=True, stop=["车"])),
    Case("chat-max_tokens-1", CHAT, chat(max_tokens=1, ignore_eos=True)),
    Case("chat-max_completion_tokens", CHAT, chat(max_completion_tokens=3, ignore_eos=True)),
    Case("chat-logprobs", CHAT, chat(max_tokens=6, ignore_eos=True, logprobs=True, top_logprobs=3)),
    # n > 1 with temperature 0 is a 400 on both (vLLM refuses it): the error cases; seeded sampling here.
    Case("chat-n2-seeded", CHAT, chat(max_tokens=4, ignore_eos=True, n=2, temperature=1.0, seed=7)),
    Case("chat-json_schema-lora", CHAT, chat(model=ADAPTER, max_tokens=30, response_format=JSON_SCHEMA_FORMAT)),
    Case(
        "chat-choice-lora",
        CHAT,
        chat(model=ADAPTER, max_tokens=20, logprobs=True, structured_outputs={"choice": LABELS}),
    ),
    Case("chat-logit_bias", CHAT, chat(max_tokens=2, logit_bias={"<bias>": 100}, logprobs=True), (False,)),
    # completions
    Case("completion-plain", COMPLETIONS, completion(max_tokens=8, ignore_eos=True)),
    Case("completion-stop", COMPLETIONS, completion(max_tokens=8, ignore_eos=True, stop=["银行"])),
    Case("completion-logprobs", COMPLETIONS, completion(max_tokens=5, ignore_eos=True, logprobs=2)),
    # OpenAI: "the API will always return the logprob of the sampled token, so there may be up to
    # logprobs+1 elements" in each top_logprobs map; vLLM's server does so.
    Case("completion-logprobs0", COMPLETIONS, completion(max_tokens=3, ignore_eos=True, logprobs=0), (False,)),
    Case(
        "completion-logit_bias", COMPLETIONS, completion(max_tokens=2, logit_bias={"<bias>": 100}, logprobs=1), (False,)
    ),
    Case("completion-echo", COMPLETIONS, completion(max_tokens=4, ignore_eos=True, echo=True)),
    # A prompt given as token ids is echoed as its text.
    Case(
        "completion-echo-token_ids",
        COMPLETIONS,
        completion(prompt=PROMPT_IDS, max_tokens=4, ignore_eos=True, echo=True),
        (False,),
    ),
    Case(
        "completion-echo-logprobs",
        COMPLETIONS,
        completion(max_tokens=4, ignore_eos=True, echo=True, logprobs=1),
        (False,),
    ),
]


def _params() -> list:
    out = []
    for case in CASES:
        for stream in case.streams:
            out.append(pytest.param(case, stream, id=f"{case.id}-{'stream' if stream else 'json'}", marks=case.marks))
    return out


def resolve(body: dict[str, Any]) -> dict[str, Any]:
    body = json.loads(json.dumps(body))
    if "logit_bias" in body:
        bias = tokenizer().encode(BIAS_TEXT, add_special_tokens=False)[0]
        body["logit_bias"] = {str(bias): v for v in body["logit_bias"].values()}
    if body.get("prompt") == PROMPT_IDS:
        body["prompt"] = tokenizer().encode(PROMPT, add_special_tokens=False)
    return body


@pytest.mark.parametrize("case, stream", _params())
def test_same_answer(base_url, vllm_server, case: Case, stream: bool):
    body = resolve(case.body)
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    ours, theirs = both(base_url, vllm_server, case.path, body)
    assert_same(ours, theirs, chat=case.path == CHAT)
    if case.path == CHAT and not stream:
        message = ours.body["choices"][0]["message"]
        assert "refusal" in message and message["refusal"] is None  # OpenAI's schema (vLLM 0.32 too)


def test_chat_top_logprobs_with_logit_bias(base_url, vllm_server):
    """Deliberate difference (8): vLLM's chat `top_logprobs` are the first `top_logprobs` entries
    of the engine's logprobs dict, the sampled token first (vLLM 0.32,
    vllm/entrypoints/openai/chat_completion/serving.py `_get_top_logprobs`), so a token forced
    by logit_bias displaces the most likely one; ours lists the most likely tokens, OpenAI's
    meaning. Both report raw log-probabilities (before the bias), and agree on everything else.
    Without logit_bias, greedy, the sampled token is the most likely: the same (chat-logprobs)."""
    body = resolve(chat(max_tokens=2, logit_bias={"<bias>": 100}, logprobs=True, top_logprobs=1))
    forced = tokenizer().decode([int(next(iter(body["logit_bias"])))])
    ours, theirs = both(base_url, vllm_server, CHAT, body)
    ctx = f"\nours: {ours.dump()}\nvLLM: {theirs.dump()}"
    assert ours.status == theirs.status == 200, ctx
    o, t = (r.body["choices"][0]["logprobs"]["content"] for r in (ours, theirs))
    assert [x["token"] for x in o] == [x["token"] for x in t] == [forced, forced], ctx
    for a, b in zip(o, t):
        assert abs(a["logprob"] - b["logprob"]) <= LOGPROB_TOL, ctx
        assert [x["token"] for x in b["top_logprobs"]] == [forced], ctx  # vLLM: the sampled token
        [top] = a["top_logprobs"]  # ours: the most likely one, at least as likely as the forced token
        assert top["logprob"] >= a["logprob"] - LOGPROB_TOL, ctx
    # ours' first position is the most likely token the unbiased request sees (the same raw logprobs)
    plain = call(base_url, CHAT, chat(max_tokens=1, logprobs=True, top_logprobs=1))
    [want] = plain.body["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    [got] = o[0]["top_logprobs"]
    assert got["token"] == want["token"] and abs(got["logprob"] - want["logprob"]) <= LOGPROB_TOL, ctx


def test_stream_without_usage(base_url, vllm_server):
    """No `stream_options`: neither server sends a usage chunk."""
    ours, theirs = both(base_url, vllm_server, CHAT, chat(max_tokens=4, ignore_eos=True, stream=True))
    assert_same(ours, theirs, chat=True)
    assert "usage" not in assemble(ours, True) and "usage" not in assemble(theirs, True)


def test_same_tokens(base_url, vllm_server):
    """The same token ids: the prompt's (/tokenize, chat template included) and the generated
    ones (vLLM's `return_token_ids`, a vLLM extension; ours: each logprobs token's text equals
    that id's decoding)."""
    for body in ({"model": MODEL, "messages": MESSAGES}, {"model": MODEL, "prompt": PROMPT}):
        ours, theirs = both(base_url, vllm_server, "/tokenize", body)
        assert ours.status == theirs.status == 200, f"{ours.dump()}\n{theirs.dump()}"
        assert ours.body["tokens"] == theirs.body["tokens"] and ours.body["count"] == theirs.body["count"]
    ids = call(vllm_server.url, COMPLETIONS, completion(max_tokens=6, ignore_eos=True, return_token_ids=True)).body[
        "choices"
    ][0]["token_ids"]
    ours = call(base_url, COMPLETIONS, completion(max_tokens=6, ignore_eos=True, logprobs=0))
    assert ours.body["choices"][0]["logprobs"]["tokens"] == [tokenizer().decode([i]) for i in ids], ours.dump()


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "path, body",
    [
        pytest.param(CHAT, chat(max_tokens=3000), id="max_tokens-over-context"),
        pytest.param(CHAT, chat(max_tokens=4, structured_outputs={"regex": "("}), id="bad-regex"),
        pytest.param(CHAT, chat(max_tokens=4, n=2), id="n2-greedy"),
        pytest.param(COMPLETIONS, completion(max_tokens=4, logprobs=21), id="completion-logprobs-21"),
    ],
)
def test_same_error(base_url, vllm_server, path, body):
    ours, theirs = both(base_url, vllm_server, path, body)
    assert_same_error(ours, theirs)


def test_prompt_over_context(base_url, vllm_server):
    """A prompt that alone exceeds the context: both 400. `param` names the request field for
    ours (OpenAI's meaning); vLLM's names `input_tokens`, not a request field."""
    body = completion(prompt="央行宣布降息 " * 200, max_tokens=1)  # 1200 tokens
    ours, theirs = both(base_url, vllm_server, COMPLETIONS, body)
    assert_same_error(ours, theirs, same_param=False)
    assert (ours.body["error"]["param"], ours.body["error"]["code"]) == ("prompt", "context_length_exceeded")
    assert theirs.body["error"]["param"] == "input_tokens"


def test_prompt_plus_max_tokens_over_context(base_url, vllm_server):
    """Deliberate difference (5): prompt + max_tokens over the context is a 400 for ours (as
    OpenAI's API answers, before the request takes a GPU slot); vLLM shortens max_tokens."""
    body = completion(prompt="央行宣布降息 " * 160, max_tokens=100, ignore_eos=True)  # 960 + 100 > 1024
    ours, theirs = both(base_url, vllm_server, COMPLETIONS, body)
    assert theirs.status == 200 and theirs.body["usage"]["total_tokens"] == 1024, theirs.dump()
    assert ours.status == 400 and ours.body["error"]["code"] == "context_length_exceeded", ours.dump()


@pytest.mark.parametrize(
    "path, extra",
    [
        pytest.param(CHAT, {"temprature": 0.5}, id="chat"),
        pytest.param(COMPLETIONS, {"best_off": 2}, id="completions"),
    ],
)
def test_unknown_field(base_url, vllm_server, path, extra):
    """Deliberate difference (3): vLLM's server ignores an unknown field; ours refuses it."""
    body = (chat if path == CHAT else completion)(max_tokens=3, **extra)
    ours, theirs = both(base_url, vllm_server, path, body)
    assert theirs.status == 200, theirs.dump()
    assert ours.status == 400, ours.dump()
    assert ours.body["error"]["code"] == "unknown_parameter" and ours.body["error"]["param"] == next(iter(extra))


def test_unimplemented_openai_field(base_url, vllm_server):
    """Deliberate difference (4): OpenAI fields ours does not implement (the deprecated
    `functions`, `reasoning_effort`, …) are a 400 `unsupported_parameter`; vLLM's server
    accepts `functions` and drops it."""
    ours, theirs = both(base_url, vllm_server, CHAT, chat(max_tokens=3, functions=[{"name": "f"}]))
    assert theirs.status == 200, theirs.dump()
    assert ours.status == 400, ours.dump()
    assert (ours.body["error"]["code"], ours.body["error"]["param"]) == ("unsupported_parameter", "functions")


def test_tools_with_tool_choice_none(base_url, vllm_server):
    """Tools rendered into the prompt, no call parsed: the same prompt and greedy answer as vLLM's
    server (Qwen3's template, hermes format)."""
    tools = [
        {
            "type": "function",
            "function": {
                "name": "f",
                "description": "天气",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    ours, theirs = both(
        base_url, vllm_server, CHAT, chat(max_tokens=6, tools=tools, tool_choice="none", ignore_eos=True)
    )
    assert ours.status == theirs.status == 200, (ours.dump(), theirs.dump())
    assert same_counts(ours.body["usage"], theirs.body["usage"])
    assert ours.body["choices"][0]["message"]["content"] == theirs.body["choices"][0]["message"]["content"]


def same_counts(ours: dict[str, Any], theirs: dict[str, Any]) -> bool:
    keys = ("prompt_tokens", "completion_tokens", "total_tokens")
    return all(ours[k] == theirs[k] for k in keys)


def test_tool_conversation_prompt(base_url, vllm_server):
    """A conversation with an assistant's tool call and the tool's result: the same prompt tokens
    and greedy answer as vLLM's server renders from it."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = MESSAGES + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "北京"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "晴"},
    ]
    ours, theirs = both(
        base_url,
        vllm_server,
        CHAT,
        chat(max_tokens=4, messages=messages, tools=tools, tool_choice="none", ignore_eos=True),
    )
    assert ours.status == theirs.status == 200, (ours.dump(), theirs.dump())
    assert same_counts(ours.body["usage"], theirs.body["usage"])
    assert ours.body["choices"][0]["message"]["content"] == theirs.body["choices"][0]["message"]["content"]


def test_named_tool_choice_arguments(base_url, vllm_server):
    """Deliberate difference (9): a named tool choice's arguments are always valid against the
    function's schema here (the output is constrained to it); vLLM 0.32's server does not
    guarantee that (seen: a number for a string enum), so only its status is compared."""
    import jsonschema

    schema = {
        "type": "object",
        "properties": {
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
        },
        "required": ["unit", "days"],
        "additionalProperties": False,
    }
    body = chat(
        max_tokens=40,
        tools=[{"type": "function", "function": {"name": "w", "parameters": schema}}],
        tool_choice={"type": "function", "function": {"name": "w"}},
    )
    ours, theirs = both(base_url, vllm_server, CHAT, body)
    assert ours.status == theirs.status == 200, (ours.dump(), theirs.dump())
    [call] = ours.body["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "w"
    jsonschema.validate(json.loads(call["function"]["arguments"]), schema)


def test_batched_prompts(base_url, vllm_server):
    """Deliberate difference (7): one prompt per completions request; a list of prompts is a 400
    naming `prompt` (vLLM's server answers one choice per prompt)."""
    body = completion(prompt=["央行", "体育"], max_tokens=2)
    ours, theirs = both(base_url, vllm_server, COMPLETIONS, body)
    assert theirs.status == 200 and len(theirs.body["choices"]) == 2, theirs.dump()
    assert ours.status == 400 and ours.body["error"]["param"] == "prompt", ours.dump()


# ----------------------------------------------------------------------------- same engine


def test_same_engine_and_models(base_url, vllm_server):
    """vLLM's server got our engine arguments, constrained-decoding config included, and serves
    the same models (ours also lists the configured aliases)."""
    argv = vllm_server.argv
    cfg = json.loads(argv[argv.index("--structured-outputs-config") + 1])
    assert cfg == {"backend": "xgrammar", "disable_any_whitespace": True}
    assert argv[argv.index("--served-model-name") + 1] == MODEL and "--enable-lora" in argv
    assert vllm_server.env.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
    theirs = {m["id"] for m in httpx.get(vllm_server.url + "/v1/models", timeout=30).json()["data"]}
    ours = {m["id"] for m in httpx.get(base_url + "/v1/models", timeout=30).json()["data"]}
    assert theirs == {MODEL, ADAPTER}
    assert theirs <= ours and ours - theirs <= set(conftest.app_args()["model"].get("aliases") or {})
