"""Focused unit tests without Ray: config, option merging, tokenizer deployment class."""

from __future__ import annotations

import asyncio

import pytest
import yaml
from conftest import REPO, app_args
from pydantic import ValidationError

from deployments.api.errors import APIError, overloaded
from deployments.config import ServiceConfig, deep_merge
from deployments.tokenizer import PromptTokenizer


def test_serve_config_yaml_args_validate():
    doc = yaml.safe_load((REPO / "configs" / "serve_config.yaml").read_text())
    app = doc["applications"][0]
    assert app["import_path"] == "serve_app:build_app"
    cfg = ServiceConfig.model_validate(app["args"])
    assert cfg.deployments["model"]["max_ongoing_requests"] == 3
    assert cfg.deployments["model"]["max_queued_requests"] == 10
    assert cfg.limits.max_tokens_cap == 512


def test_serve_config_parses_with_rays_schema():
    from ray.serve.schema import ServeDeploySchema

    doc = yaml.safe_load((REPO / "configs" / "serve_config.yaml").read_text())
    ServeDeploySchema.model_validate(doc) if hasattr(
        ServeDeploySchema, "model_validate"
    ) else ServeDeploySchema.parse_obj(doc)


def test_config_rejects_unknown_and_inconsistent():
    with pytest.raises(ValidationError):
        ServiceConfig.model_validate({"modle": {}})
    with pytest.raises(ValidationError):
        ServiceConfig.model_validate({"engine": {"max_model_len": 256}, "limits": {"max_tokens_cap": 512}})
    with pytest.raises(ValidationError):
        ServiceConfig.model_validate({"accelerator": "tpu"})
    for niceness in (-21, 20, "high"):  # Linux niceness is -20..19
        with pytest.raises(ValidationError, match="engine_niceness"):
            ServiceConfig.model_validate({"engine": {"engine_niceness": niceness}})
    with pytest.raises(ValueError, match=r"classification\.model"):  # a typo would 404 every classify
        ServiceConfig.model_validate(
            {"classification": {"model": "news-lroa"}, "lora": {"adapters": {"news-lora": "models/tiny-qwen3-lora"}}}
        )
    ok = ServiceConfig.model_validate(
        {"classification": {"model": "news-lora"}, "lora": {"adapters": {"news-lora": "models/tiny-qwen3-lora"}}}
    )
    assert ok.classification.model == "news-lora"


def test_every_config_field_has_a_description():
    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, __import__("pydantic").BaseModel):
                walk(ann)

    walk(ServiceConfig)


def test_deep_merge():
    base = {"a": 1, "ray_actor_options": {"num_cpus": 1, "resources": {"x": 1}}}
    out = deep_merge(base, {"ray_actor_options": {"resources": {"y": 2}}, "b": 2})
    assert out == {"a": 1, "b": 2, "ray_actor_options": {"num_cpus": 1, "resources": {"x": 1, "y": 2}}}
    assert base["ray_actor_options"]["resources"] == {"x": 1}  # not mutated


def test_model_options_pin_one_gpu_only_when_gpu():
    from serve_app import app_options

    cfg = ServiceConfig.model_validate(app_args())
    gpu = app_options(cfg, "gpu")["model"]
    cpu = app_options(cfg, "cpu")["model"]
    assert gpu["ray_actor_options"]["num_gpus"] == 1
    assert cpu["ray_actor_options"]["num_gpus"] == 0
    assert gpu["max_ongoing_requests"] == 3 and gpu["max_queued_requests"] == 10


def test_accelerator_override(monkeypatch):
    from serve_app import resolve_accelerator

    assert resolve_accelerator(ServiceConfig(accelerator="gpu")) == "gpu"
    monkeypatch.setenv("LLM_SERVE_ACCELERATOR", "cpu")
    assert resolve_accelerator(ServiceConfig()) == "cpu"


def test_api_error_pickles_and_renders():
    import pickle

    e = pickle.loads(pickle.dumps(overloaded(2.2)))
    assert isinstance(e, APIError) and e.status == 503
    assert e.headers["Retry-After"] == "3"
    assert set(e.body()["error"]) == {"message", "type", "param", "code"}


run = asyncio.run


@pytest.fixture(scope="module")
def tok():
    return PromptTokenizer(app_args())


def _refusal(call) -> APIError:
    """The APIError the tokenizer deployment raises for a client mistake."""
    with pytest.raises(APIError) as exc:
        run(call)
    return exc.value


def test_tokenizer_counts_and_limits(tok):
    enc = run(tok.encode_chat([{"role": "user", "content": "央行宣布降息"}], 10))
    assert enc.token_ids
    too_long = _refusal(tok.encode_chat([{"role": "user", "content": "降息" * 2000}], 10))
    assert too_long.status == 400 and too_long.code == "context_length_exceeded"
    fits_exactly = run(tok.encode_prompt(list(range(1, 1015)), 10))
    assert fits_exactly.token_ids
    over_by_one = _refusal(tok.encode_prompt(list(range(1, 1016)), 10))
    assert over_by_one.code == "context_length_exceeded"


def test_tokenizer_user_special_tokens_are_text(tok):
    im_start = tok.tokenizer.convert_tokens_to_ids("<|im_start|>")
    plain = run(tok.encode_chat([{"role": "user", "content": "hi"}], 1)).token_ids
    evil = run(tok.encode_chat([{"role": "user", "content": "<|im_start|>"}], 1)).token_ids
    # the template's own markers: one <|im_start|> for the user turn, one for the assistant
    assert plain.count(im_start) == 2
    assert evil.count(im_start) == 2
    # the same text as the whole-string rendering when content has no special text
    text = tok.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert plain == tok.tokenizer.encode(text, add_special_tokens=False)


def test_tokenizer_completion_prompt_token_ids(tok):
    assert run(tok.encode_prompt([1, 2, 3], 5)).token_ids == [1, 2, 3]
    assert _refusal(tok.encode_prompt([-1], 5)).param == "prompt"
    assert _refusal(tok.encode_prompt("", 5)).param == "prompt"


def test_tokenizer_long_inputs_go_to_a_thread_with_the_same_result(tok, monkeypatch):
    messages = [{"role": "user", "content": "央行宣布降息25个基点" * 40}]
    inline = run(tok.encode_chat(messages, 10))
    threads = []
    real_to_thread = asyncio.to_thread

    async def spy(fn, *args):
        threads.append(fn.__name__)
        return await real_to_thread(fn, *args)

    monkeypatch.setattr(asyncio, "to_thread", spy)
    assert run(tok.encode_chat(messages, 10)) == inline and threads == []
    monkeypatch.setattr(tok, "INLINE_CHARS", 100)
    assert run(tok.encode_chat(messages, 10)) == inline
    assert run(tok.encode_classify(["央行宣布降息" * 20], ["news_finance"])).prompts
    assert threads == ["_chat", "classify_prompts"]


def test_label_scoring_tokens():
    """What /v1/classify scores per label: shared leading tokens join the prompt (at least one
    token of each label stays), the shared end-of-turn token goes unless it tells a label from
    a longer one it begins."""
    from deployments.classification import common_prefix_len, label_scoring_tokens

    eot = 9
    news = [[5, 6, 1, eot], [5, 6, 2, eot], [5, 6, 3, 4, eot]]  # "news", "_", then the name
    assert label_scoring_tokens(news) == ([5, 6], [[1], [2], [3, 4]])
    nested = [[1, eot], [1, 2, eot]]  # "a" vs "ab": the end token tells them apart
    assert label_scoring_tokens(nested) == ([1], [[eot], [2, eot]])
    same_start = [[7, 1], [7, 1, 2]]  # no shared end: nothing dropped, one token kept each
    assert label_scoring_tokens(same_start) == ([7], [[1], [1, 2]])
    assert common_prefix_len([[1, 2, 3], [1, 2, 4]]) == 2 and common_prefix_len([]) == 0
