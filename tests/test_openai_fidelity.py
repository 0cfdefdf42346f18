"""OpenAI API fidelity with the official `openai` SDK: every request field is honoured (as vLLM's
server honours it) or refused with a 400 naming it — never accepted and dropped."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import openai
import pytest
from invariants import assert_text_of_tokens, special_tokens

MODEL = "tiny-qwen3"
ADAPTER = "news-lora"
MESSAGES = [{"role": "user", "content": "央行宣布降息25个基点"}]
LABELS = ["news_finance", "news_sports", "news_tech"]


def refused(call, param: str, code: str | None = None) -> dict:
    """The call is a 400 naming `param`; returns the error object."""
    with pytest.raises(openai.BadRequestError) as exc:
        call()
    err = exc.value.body
    assert exc.value.status_code == 400 and err["param"] == param, err
    if code:
        assert err["code"] == code, err
    return err


# ----------------------------------------------------------------------------- honoured or refused


def test_unknown_field_is_a_400_naming_it(client):
    err = refused(
        lambda: client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=2, extra_body={"temprature": 0.1}
        ),
        "temprature",
        "unknown_parameter",
    )
    assert "temprature" in err["message"]
    refused(
        lambda: client.completions.create(model=MODEL, prompt="hi", max_tokens=2, extra_body={"best_off": 2}),
        "best_off",
        "unknown_parameter",
    )


@pytest.mark.parametrize(
    "field, value",
    [
        ("functions", [{"name": "f"}]),
        ("function_call", "auto"),
        ("reasoning_effort", "low"),
        ("audio", {"voice": "alloy", "format": "mp3"}),
        ("prediction", {"type": "content", "content": "x"}),
    ],
)
def test_unimplemented_openai_fields_are_refused(client, field, value):
    refused(
        lambda: client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, extra_body={field: value}),
        field,
        "unsupported_parameter",
    )


def test_completions_suffix_and_best_of(client):
    refused(
        lambda: client.completions.create(model=MODEL, prompt="hi", max_tokens=2, suffix="end"),
        "suffix",
        "unsupported_parameter",
    )
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2, n=1, best_of=3)
    assert len(client.completions.create(model=MODEL, prompt="hi", max_tokens=2, n=2, best_of=2).choices) == 2


def test_bookkeeping_fields_are_accepted(client):
    resp = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=2,
        user="u1",
        metadata={"k": "v"},
        store=False,
        service_tier="auto",
        extra_body={"safety_identifier": "s", "prompt_cache_key": "c"},
        stream_options=None,
    )
    assert resp.choices[0].message.refusal is None


def test_priority_is_honoured_within_bounds(client):
    """vLLM's `priority` (lower first): served on chat and completions (the engine runs vLLM's
    priority scheduler, `engine.scheduling_policy`); outside ±2^20 a 400 naming it (tenants'
    bands must not be jumped, docs/security.md S17)."""
    for p in (-3, 0, 7):
        assert client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=2, temperature=0, extra_body={"priority": p}
        ).choices
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2, extra_body={"priority": -1}).choices
    refused(
        lambda: client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=2, extra_body={"priority": 2**21}
        ),
        "priority",
    )


# ----------------------------------------------------------------------------- logprobs


def test_chat_logprobs(client, hf_tokenizer):
    resp = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens == 6
    # the text is the tokens without the special ones (`<|endoftext|>` under ignore_eos is a
    # logprobs token, skipped in the text, as vLLM's server answers)
    assert_text_of_tokens(resp.choices[0].message.content, [t.token for t in content], special_tokens(hf_tokenizer))
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert t.bytes == list(t.token.encode())
        # greedy: the chosen token is the most likely one
        assert t.logprob == pytest.approx(max(a.logprob for a in t.top_logprobs), abs=1e-4)
    none = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    assert none.choices[0].logprobs is None
    refused(
        lambda: client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=2, logprobs=True, top_logprobs=21
        ),
        "top_logprobs",
    )


def test_chat_logprobs_streamed(client, hf_tokenizer):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    tokens, text, usage = [], "", None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            if c.logprobs and c.logprobs.content:
                tokens += c.logprobs.content
    assert len(tokens) == usage.completion_tokens == 8
    assert_text_of_tokens(text, [t.token for t in tokens], special_tokens(hf_tokenizer), "streamed text")


def test_completion_logprobs_and_echo(client, hf_tokenizer):
    prompt = "央行宣布"
    resp = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=5, temperature=0, logprobs=2, echo=True, extra_body={"ignore_eos": True}
    )
    choice = resp.choices[0]
    lp = choice.logprobs
    # the echoed prompt's tokens come first, as in OpenAI's legacy API (the first has no logprob)
    prompt_tokens = [hf_tokenizer.decode([i]) for i in hf_tokenizer.encode(prompt, add_special_tokens=False)]
    n = len(prompt_tokens)
    assert len(lp.tokens) == n + 5 == n + resp.usage.completion_tokens
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(lp.tokens)
    assert lp.tokens[:n] == prompt_tokens and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert choice.text.startswith(prompt)
    assert_text_of_tokens(choice.text, lp.tokens, special_tokens(hf_tokenizer), "echoed text")
    # offsets: where each token starts, the generated ones after the prompt
    assert lp.text_offset[0] == 0 and lp.text_offset[n] == len("".join(prompt_tokens))
    assert lp.text_offset == sorted(lp.text_offset)
    # each position: the sampled token and the 2 most likely (up to 3 entries)
    assert all(tok in alts and len(alts) <= 3 for tok, alts in zip(lp.tokens[1:], lp.top_logprobs[1:]))
    streamed = client.completions.create(
        model=MODEL,
        prompt="央行宣布",
        max_tokens=5,
        temperature=0,
        echo=True,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == choice.text


# ----------------------------------------------------------------------------- n


def test_n_choices(client, hf_tokenizer):
    resp = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=4, n=3, temperature=1.0, seed=7, extra_body={"ignore_eos": True}
    )
    assert sorted(c.index for c in resp.choices) == [0, 1, 2]
    assert resp.usage.completion_tokens == 12
    # each streamed choice adds up to its own text: the same seeded request, not streamed,
    # gives each choice's text and tokens
    kw = dict(model=MODEL, prompt="hi", max_tokens=4, n=2, temperature=1.0, seed=11, extra_body={"ignore_eos": True})
    whole = client.completions.create(logprobs=0, **kw)
    expected = {c.index: c.text for c in whole.choices}
    assert sorted(expected) == [0, 1] and whole.usage.completion_tokens == 8
    for c in whole.choices:
        assert len(c.logprobs.tokens) == 4
        assert_text_of_tokens(c.text, c.logprobs.tokens, special_tokens(hf_tokenizer), f"choice {c.index}")
    texts, finished = {0: "", 1: ""}, set()
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1} and texts == expected
    refused(lambda: client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, n=5), "n")


# ----------------------------------------------------------------------------- structured outputs


SCHEMA = {
    "type": "object",
    "properties": {"label": {"type": "string", "enum": LABELS}},
    "required": ["label"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("stream", [False, True])
def test_response_format_json_schema(client, stream):
    kw = dict(
        model=ADAPTER,
        messages=MESSAGES,
        max_tokens=40,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "label", "schema": SCHEMA, "strict": True}},
    )
    if stream:
        text = "".join(
            c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw) if c.choices
        )
    else:
        text = client.chat.completions.create(**kw).choices[0].message.content
    assert json.loads(text)["label"] in LABELS
    assert " " not in text  # compact JSON by default


def test_response_format_json_object(client):
    resp = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=60, temperature=0, response_format={"type": "json_object"}
    )
    text = resp.choices[0].message.content
    assert text.startswith("{")
    if resp.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_structured_outputs_choice_and_regex(client):
    resp = client.chat.completions.create(
        model=ADAPTER,
        messages=MESSAGES,
        max_tokens=20,
        temperature=0,
        logprobs=True,
        extra_body={"structured_outputs": {"choice": LABELS}},
    )
    assert resp.choices[0].message.content in LABELS
    assert resp.choices[0].logprobs.content  # a confidence for the label
    resp = client.completions.create(
        model=MODEL,
        prompt="日期：",
        max_tokens=20,
        temperature=0,
        extra_body={"structured_outputs": {"regex": r"20[0-9]{2}-[01][0-9]"}},
    )
    assert re.fullmatch(r"20[0-9]{2}-[01][0-9]", resp.choices[0].text)


@pytest.mark.parametrize(
    "extra",
    [
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
        {"structured_outputs": {"regex": "("}},
        {"structured_outputs": {"choice": LABELS, "regex": "a"}},
        {"structured_outputs": {"grammar": "root ::= (("}},
        {"response_format": {"type": "json_schema"}},
    ],
)
def test_bad_constraints_are_400s(client, extra):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, extra_body=extra)
    assert exc.value.status_code == 400


def test_huge_enum_schema_is_bounded(base_url):
    """A tool-sized schema with a 5,000-value enum answers (200 or 400), never a 500 or a hang."""
    schema = {"type": "object", "properties": {"x": {"enum": [f"v{i}" for i in range(5000)]}}}
    r = httpx.post(
        f"{base_url}/v1/chat/completions",
        timeout=120,
        json={
            "model": MODEL,
            "messages": MESSAGES,
            "max_tokens": 8,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        },
    )
    assert r.status_code in (200, 400), r.text


# ----------------------------------------------------------------------------- logit_bias, templates


def test_logit_bias(client, hf_tokenizer):
    target = hf_tokenizer.encode("体育", add_special_tokens=False)[0]
    resp = client.completions.create(
        model=MODEL, prompt="央行宣布", max_tokens=1, temperature=0, logit_bias={str(target): 100}, logprobs=0
    )
    assert resp.choices[0].logprobs.tokens[0] == hf_tokenizer.decode([target])
    refused(
        lambda: client.completions.create(model=MODEL, prompt="x", max_tokens=1, logit_bias={"not-a-token": 1}),
        "logit_bias",
    )


def test_chat_template_kwargs(client):
    resp = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=2, extra_body={"chat_template_kwargs": {"enable_thinking": False}}
    )
    assert resp.choices[0].message.content is not None
    refused(
        lambda: client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=2, extra_body={"chat_template_kwargs": {"messages": []}}
        ),
        "chat_template_kwargs",
    )


# ----------------------------------------------------------------------------- model names


def test_alias_of_the_replaced_service(client):
    ids = [m.id for m in client.models.list().data]
    assert "qwen-news-classifier" in ids
    resp = client.chat.completions.create(model="qwen-news-classifier", messages=MESSAGES, max_tokens=2)
    assert resp.model == ADAPTER


def test_default_model_answers_requests_without_model():
    """`model.default_model`: a request naming no model goes there (the shipped config: the
    fine-tuned adapter, as the replaced service)."""
    from deployments.adapters import AdapterRef
    from deployments.api.models import ModelDirectory

    class Registry:
        async def get(self, name):
            return AdapterRef(name, "/a", 3) if name == ADAPTER else None

        lookup = get  # the ingress's cached copy answers the same way

    class Handle:
        def options(self, **kw):
            return self

    shipped = ModelDirectory(MODEL, "me", 0, Handle(), Registry(), ADAPTER, {"qwen-news-classifier": ADAPTER})
    assert asyncio.run(shipped.resolve(None)) == (ADAPTER, f"{ADAPTER}@3")
    assert asyncio.run(shipped.resolve("qwen-news-classifier")) == (ADAPTER, f"{ADAPTER}@3")
    assert asyncio.run(shipped.resolve(MODEL)) == (MODEL, None)
    plain = ModelDirectory(MODEL, "me", 0, Handle(), Registry())
    assert asyncio.run(plain.resolve(None)) == (MODEL, None)


def test_shipped_config_defaults_to_the_classifier():
    import yaml
    from conftest import REPO

    from deployments.config import ServiceConfig

    doc = yaml.safe_load((REPO / "configs" / "serve_config.yaml").read_text())
    cfg = ServiceConfig.model_validate(doc["applications"][0]["args"])
    assert cfg.model.default_model == ADAPTER and cfg.model.aliases["qwen-news-classifier"] == ADAPTER
    with pytest.raises(ValueError, match="default_model"):
        ServiceConfig.model_validate({"model": {"default_model": "nope"}})
    with pytest.raises(ValueError, match="aliases"):
        ServiceConfig.model_validate({"model": {"aliases": {"x": "nope"}}})
