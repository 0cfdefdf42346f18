"""Configuration by environment (pydantic-settings): every field as LLM_SERVE__<SECTION>__<FIELD>,
the replaced service's container variables as aliases, bad variables refused at start by name."""

from __future__ import annotations

import pytest

from deployments.config import ServiceConfig
from deployments.config_env import LEGACY_ENV, load_config


def test_environment_overrides_the_yaml_args():
    cfg = load_config(
        {"limits": {"default_temperature": 0.3}, "model": {"model_id": "yaml"}},
        {
            "LLM_SERVE__LIMITS__MAX_TOKENS_CAP": "300",
            "LLM_SERVE__MODEL__MODEL_ID": "env",
            "LLM_SERVE__LORA__ADAPTERS": '{"a": "/adapters/a"}',
            "LLM_SERVE__ACCELERATOR": "cpu",
            "LLM_SERVE_API_KEYS": "not a config variable",
        },
    )
    assert cfg.limits.max_tokens_cap == 300 and cfg.limits.default_temperature == 0.3  # merged, not replaced
    assert cfg.model.model_id == "env" and cfg.lora.adapters == {"a": "/adapters/a"} and cfg.accelerator == "cpu"
    assert load_config({}, {}) == ServiceConfig()


def test_the_replaced_services_variables():
    cfg = load_config(
        {"model": {"model_id": "yaml"}},
        {
            "VLLM_MODEL": "/models/qwen3-8b-merged",
            "MODEL_NAME": "qwen-news-classifier",
            "MAX_MODEL_LEN": "4096",
            "GPU_MEMORY_UTILIZATION": "0.8",
        },
    )
    assert (cfg.model.model_source, cfg.model.model_id) == ("/models/qwen3-8b-merged", "qwen-news-classifier")
    assert (cfg.engine.max_model_len, cfg.engine.gpu_memory_utilization) == (4096, 0.8)
    # ours win over the old names
    assert (
        load_config({}, {"MAX_MODEL_LEN": "4096", "LLM_SERVE__ENGINE__MAX_MODEL_LEN": "2048"}).engine.max_model_len
        == 2048
    )
    assert set(LEGACY_ENV) == {"VLLM_MODEL", "MODEL_NAME", "MAX_MODEL_LEN", "GPU_MEMORY_UTILIZATION"}


@pytest.mark.parametrize(
    "env, named",
    [
        ({"LLM_SERVE__FOO": "1"}, "LLM_SERVE__FOO"),
        ({"LLM_SERVE__LIMITS__MAX_TOKENZ_CAP": "1"}, "LLM_SERVE__LIMITS__MAX_TOKENZ_CAP"),
        ({"LLM_SERVE__LIMITS__MAX_TOKENS_CAP": "abc"}, "LLM_SERVE__LIMITS__MAX_TOKENS_CAP"),
        ({"LLM_SERVE__COMPAT__LEGACY_HEALTH_STATUS": "maybe"}, "LLM_SERVE__COMPAT__LEGACY_HEALTH_STATUS"),
        ({"LLM_SERVE__LIMITS__MAX_TOKENS_OVER_CAP": "truncate"}, "LLM_SERVE__LIMITS__MAX_TOKENS_OVER_CAP"),
        ({"MAX_MODEL_LEN": "-5"}, "MAX_MODEL_LEN"),
        ({"GPU_MEMORY_UTILIZATION": "2"}, "GPU_MEMORY_UTILIZATION"),
        ({"LLM_SERVE__LIMITS__MAX_TOKENS_CAP": "5000"}, "LLM_SERVE__LIMITS__MAX_TOKENS_CAP"),
    ],
)
def test_a_bad_variable_is_an_error_naming_it(env, named):
    with pytest.raises(ValueError) as exc:
        load_config({}, env)
    assert named in str(exc.value).splitlines()[0]


def test_the_application_builder_reads_the_environment(monkeypatch):
    """`serve run` builds the app in the process whose environment the user set."""
    from serve_app import build_app

    monkeypatch.setenv("LLM_SERVE__LIMITS__MAX_TOKENZ_CAP", "1")
    with pytest.raises(ValueError, match="LLM_SERVE__LIMITS__MAX_TOKENZ_CAP"):
        build_app({"accelerator": "cpu"})
    monkeypatch.delenv("LLM_SERVE__LIMITS__MAX_TOKENZ_CAP")
    build_app({"accelerator": "cpu"})


@pytest.mark.parametrize("field", ["tool_call_parser", "reasoning_parser"])
def test_an_unknown_parser_stops_the_start_naming_the_field(field):
    from serve_app import build_app

    with pytest.raises(ValueError, match=f"model.{field} 'nope'"):
        build_app({"accelerator": "cpu", "model": {field: "nope"}})
