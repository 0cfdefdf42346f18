"""Config values that used to be silently ignored (issue 24, "found by reading the code"):

- `limits.max_tokens_over_cap: clamp`: the token reservation of a budget reserved the request's
  `max_tokens` even though it is served with at most `max_tokens_cap` (a 429 up front for a
  request that fits); and a key-less client's reservation was dropped altogether;
- `engine.extra.max_model_len`: vLLM got it, the tokenizer's context check kept
  `engine.max_model_len`;
- `limits.retry_after_s: 0`: sent as 1;
- `RATE_LIMIT_PER_MINUTE` / `_HOUR`: read by each ingress replica from its own environment, not
  where the app is built as every other variable (end to end: tests/test_python_proxy_address.py,
  whose ingress has `RATE_LIMIT_PER_MINUTE=1000` in its environment and still limits at 10).
"""

from __future__ import annotations

import pytest
from conftest import app_args
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import ValidationError

from deployments.admission.auth import ApiKeyAuth
from deployments.admission.limits import RateDecision
from deployments.admission.middleware import Admission, AdmissionMiddleware
from deployments.admission.rate_limit import RateLimiter
from deployments.api.errors import APIError
from deployments.config import ServiceConfig
from deployments.config_env import load_config
from deployments.engine import engine_kwargs


class _TokenBudget:
    """A limiter with a token budget: records what each request reserves."""

    enabled = True

    def __init__(self):
        self.reserved: list[int] = []

    def counts_tokens(self, identity=None) -> bool:
        return True

    async def check(self, key, identity=None, reserve_tokens=0):
        self.reserved.append(reserve_tokens)
        return RateDecision(allowed=True, limit=10, remaining=9)

    def release(self, lease, tokens) -> None:
        pass


def reservations(cap: int | None, bodies: list[dict]) -> list[int]:
    app = FastAPI()
    app.add_middleware(AdmissionMiddleware)
    app.post("/v1/chat/completions")(lambda: {"ok": True})
    limiter = _TokenBudget()
    app.state.admission = Admission(
        auth=ApiKeyAuth(False, []),
        limiter=limiter,
        trusted_proxies=[],
        max_request_bytes=1 << 20,
        max_tokens_cap=cap,
    )
    with TestClient(app) as http:
        for body in bodies:
            assert http.post("/v1/chat/completions", json=body).status_code == 200
    return limiter.reserved


def test_a_clamped_request_reserves_at_most_the_cap():
    bodies = [{"max_tokens": 2000}, {"max_tokens": 2000, "n": 2}, {"max_completion_tokens": 100}, {}]
    assert reservations(512, bodies) == [512, 1024, 100, 100]
    assert reservations(None, bodies) == [2000, 4000, 100, 100]  # no cap known: as asked


def test_the_ingress_gives_admission_the_cap():
    """The ingress builds `Admission(max_tokens_cap=limits.max_tokens_cap, ...)`."""
    import inspect

    from deployments import ingress

    assert "max_tokens_cap=self.limits.max_tokens_cap" in inspect.getsource(ingress.IngressRouter)


def test_engine_extra_max_model_len_is_the_context_limit():
    from deployments.tokenizer import PromptTokenizer

    cfg = ServiceConfig.model_validate(app_args(engine={"extra": {"max_model_len": 2048, "kv_cache_dtype": "auto"}}))
    assert cfg.engine.max_model_len == 2048 and cfg.engine.extra == {"kv_cache_dtype": "auto"}
    assert engine_kwargs(cfg, on_cpu=True)["max_model_len"] == 2048
    tok = PromptTokenizer(cfg.model_dump())
    assert tok.max_model_len == 2048
    assert len(tok._prompt("体育 " * 600, 500).token_ids) + 500 > 1024  # past the old limit, inside the new
    with pytest.raises(APIError) as err:
        tok._prompt("体育 " * 1600, 500)
    assert err.value.code == "context_length_exceeded" and "2048" in err.value.message


@pytest.mark.parametrize(
    "engine, named",
    [
        ({"max_model_len": 1024, "extra": {"max_model_len": 2048}}, "engine.extra.max_model_len"),
        ({"extra": {"model": "/elsewhere"}}, "model.model_source"),
        ({"extra": {"enable_lora": False}}, "lora.enabled"),
        ({"extra": {"max_model_len": 256}}, "max_tokens_cap"),  # below the cap: the usual check applies
    ],
)
def test_engine_extra_that_would_disagree_is_an_error(engine, named):
    with pytest.raises(ValidationError, match=named.replace(".", r"\.")):
        ServiceConfig.model_validate({"engine": engine})


def test_retry_after_zero_is_refused_at_start():
    with pytest.raises(ValidationError, match=r"limits\.retry_after_s"):
        ServiceConfig.model_validate({"limits": {"retry_after_s": 0}})
    assert ServiceConfig.model_validate({"limits": {"retry_after_s": 3}}).limits.retry_after_s == 3


def test_rate_limit_variables_apply_where_the_app_is_built():
    cfg = load_config(
        {"rate_limit": {"per_minute": 10}}, {"RATE_LIMIT_PER_MINUTE": " 0 ", "RATE_LIMIT_PER_HOUR": "5000"}
    )
    assert (cfg.rate_limit.per_minute, cfg.rate_limit.per_hour) == (0, 5000)
    assert load_config({}, {"RATE_LIMIT_PER_MINUTE": ""}).rate_limit.per_minute == 10  # empty: unset
    # the replica takes the built config as it is, whatever its own environment says
    limiter = RateLimiter.from_config(cfg.rate_limit, "x", env={})
    assert [(w.limit, w.period_s) for w in limiter.windows] == [(5000, 3600)]


@pytest.mark.parametrize("value", ["-1", "ten"])
def test_a_bad_rate_limit_variable_is_an_error_naming_it(value):
    with pytest.raises(ValueError) as exc:
        load_config({}, {"RATE_LIMIT_PER_MINUTE": value})
    assert "RATE_LIMIT_PER_MINUTE" in str(exc.value).splitlines()[0]


def test_the_ingress_does_not_read_rate_limit_variables_again():
    import inspect

    from deployments import ingress

    assert "RateLimiter.from_config(self.config.rate_limit, app_name, env={})" in inspect.getsource(
        ingress.IngressRouter
    )
