"""Ingress router deployment: the OpenAI-compatible HTTP API (FastAPI through `serve.ingress`).
Routes and calls only; the handling behind them lives in `deployments/api/`.

Request path: admission (`admission/middleware.py`: body size, API key, rate limit) → route →
`api/generation.py` or `api/classify.py` → tokenizer deployment (`tokenizer.py`, CPU) → model
replica deployment (`model_replica.py`, GPU) → OpenAI JSON or SSE (`api/sse.py`). Everything
that can go wrong becomes an OpenAI error object with the right status (`api/errors.py`):
Serve's backpressure on the model replica is a 503 with `Retry-After`, never a 500.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from deployments.adapters import AdapterRegistry
from deployments.admission.auth import ApiKeyAuth
from deployments.admission.capacity import ModelCalls, ModelCapacity, tenant_of, watch_model_replicas
from deployments.admission.client_address import ClientAddress
from deployments.admission.middleware import Admission, AdmissionMiddleware, is_admin
from deployments.admission.rate_limit import RateLimiter
from deployments.api import errors
from deployments.api.classify import ServingClassify
from deployments.api.errors import APIError
from deployments.api.generation import ServingGeneration
from deployments.api.health import PROBE_PATHS, ServingHealth
from deployments.api.models import ModelDirectory
from deployments.api.protocol import (
    ChatCompletionRequest,
    ClassifyRequest,
    CompletionRequest,
    LoadLoraRequest,
    UnloadLoraRequest,
)
from deployments.api.responses_protocol import ResponsesRequest
from deployments.api.serving_responses import ServingResponses
from deployments.api.tokenize import DetokenizeRequest, ServingTokenize, TokenizeRequest
from deployments.classification import labels_for_model
from deployments.config import REPO_ROOT, ServiceConfig, resolve_path
from deployments.observability import PROMETHEUS_CONTENT_TYPE, StatsRecorder
from deployments.options import base_options, current_app_name

logger = logging.getLogger("ray.serve")

app = FastAPI(
    title="LLM serving on Ray Serve",
    description="OpenAI-compatible API: ingress router → tokenizer → vLLM model replica.",
    version="0.1.0",
)
errors.install_exception_handlers(app)
app.add_middleware(AdmissionMiddleware)


class IngressRouter:
    """Serve deployment class (plain class; `serve_app` wraps it with `serve.ingress(app)`)."""

    # Old replicas drain on redeploy/downscale; graceful_shutdown_timeout_s is derived from
    # limits.request_timeout_s (serve_app.app_options) so every request reaches its deadline.
    DEFAULT_OPTIONS: dict[str, Any] = base_options(
        "IngressRouter",
        max_ongoing_requests=1000,
        ray_actor_options={"num_cpus": 0.25},
        graceful_shutdown_wait_loop_s=2,
    )
    # The app Serve serves (a frozen copy of `app`): a property of the class `serve.ingress(app)`
    # derives from this one. Declared only, so it does not hide that property.
    app: FastAPI

    async def __init__(  # type: ignore[misc]  # Serve awaits an async __init__
        self, tokenizer, model, config: dict[str, Any] | ServiceConfig, model_options: dict[str, Any]
    ):
        """`model_options`: the model deployment's Serve options as the builder computed them
        (`serve_app.app_options`): they size the capacity gate and /health's limits report."""
        self.config = ServiceConfig.model_validate(config)
        self.limits = self.config.limits
        self.model_id = self.config.model.model_id
        self.model = model
        self.model_options = model_options

        app_name = current_app_name()
        self.recorder = StatsRecorder.from_config(self.config.observability, role="ingress", app_name=app_name)
        # env={}: RATE_LIMIT_* were applied where the app was built (config_env.load_config); this
        # replica's own environment does not change the limits
        self.limiter = RateLimiter.from_config(self.config.rate_limit, app_name, env={})
        self.auth = ApiKeyAuth.from_config(self.config.auth)
        self.client_address = await ClientAddress.for_ingress_replica()
        # Neither is a reason not to serve: a limiter that cannot be reached fails open or
        # closed per request (rate_limit.fail_open) and is retried on use; stats are pushed
        # again when the aggregator answers.
        for what, part in (("rate limiter", self.limiter), ("stats aggregator", self.recorder)):
            try:
                await part.ready()
            except Exception as exc:
                logger.warning("%s not reachable at start (%s: %s); serving without it", what, type(exc).__name__, exc)
        adapters = AdapterRegistry(app_name, cache_s=self.config.lora.registry_cache_s)
        for name, path in self.config.lora.adapters.items():
            await adapters.register(name, resolve_path(path), True)
        m = self.config.model
        self.models = ModelDirectory(
            self.model_id, m.owned_by, int(time.time()), model, adapters, m.default_model, m.aliases
        )
        self.calls = ModelCalls(
            ModelCapacity.from_options(model_options, self.limits.fair_queue_reserve, self.limits.fair_queue),
            self.limits.retry_after_s,
        )
        gate = self.calls.capacity
        if gate.running_limit is not None and gate.replica_range[0] != gate.replica_range[1]:
            self._replica_watch = asyncio.get_running_loop().create_task(watch_model_replicas(gate))
        labels = list(self.config.classification.labels or labels_for_model(self.config.model.resolved_source()))
        self.generation = ServingGeneration(tokenizer, self.models, self.calls, self.limits, self.recorder, m)
        self.responses = ServingResponses(self.generation, self.limits)
        self.classifier = ServingClassify(
            tokenizer, self.models, self.calls, self.limits, self.config.classification, labels, self.recorder
        )
        self.tokenization = ServingTokenize(tokenizer, self.models, self.limits)
        self.health_check = ServingHealth(
            model, self.config, model_options, self.calls, self.limiter, self.auth.enabled, adapters
        )
        logger.log(*self.auth.startup_summary())
        logger.info(
            "ingress ready: rate limits %s, auth %s", self.limiter.describe(), "on" if self.auth.enabled else "off"
        )

    def __serve_build_asgi_app__(self):
        """Serve calls this once the constructor has run, for the app it serves (a frozen copy
        of `app`): admission and the rejection counter go on that app's state, where the
        middleware and the exception handlers read them."""
        served = self.app
        served.state.admission = Admission(
            auth=self.auth,
            limiter=self.limiter,
            trusted_proxies=self.config.rate_limit.trusted_proxies,
            max_request_bytes=self.limits.max_request_bytes,
            stats=self.recorder,
            public_paths=frozenset(self.auth.public_paths) | PROBE_PATHS,
            client_address=self.client_address,
            capacity=self.calls.capacity,
            retry_after_s=self.limits.retry_after_s,
            body_timeout_s=self.limits.request_body_timeout_s,
            max_tokens_cap=self.limits.max_tokens_cap,
            default_max_tokens={
                "/v1/chat/completions": self.limits.default_max_tokens_chat,
                "/v1/completions": self.limits.default_max_tokens_completion,
                "/v1/responses": self.limits.default_max_tokens_chat,
                "/v1/classify": 1,
            },
        )
        served.state.on_rejection = self.recorder.record_rejection
        return served

    # ------------------------------------------------------------------ OpenAI API

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        return await self.generation.chat(body, tenant_of(request.scope))

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request):
        return await self.generation.completion(body, tenant_of(request.scope))

    @app.post("/v1/responses")
    async def create_response(self, body: ResponsesRequest, request: Request):
        """OpenAI's Responses API, served by the chat path (`api/serving_responses.py`)."""
        return await self.responses.create(body, tenant_of(request.scope))

    @app.api_route("/v1/responses/{response_id}", methods=["GET", "DELETE"])
    @app.api_route("/v1/responses/{response_id}/{action}", methods=["GET", "POST"])
    async def stored_response(self, response_id: str) -> Response:
        """Retrieve, delete, cancel, input_items: 404, nothing is stored (as vLLM's server by default)."""
        raise self.responses.not_stored(response_id)

    @app.post("/v1/classify")
    async def classify(self, body: ClassifyRequest, request: Request) -> JSONResponse:
        return await self.classifier.classify(body, tenant_of(request.scope))

    @app.post("/tokenize")
    async def tokenize(self, body: TokenizeRequest) -> JSONResponse:
        """vLLM's /tokenize: `prompt` or chat `messages` → `count`, `max_model_len`, `tokens`
        (`token_strs` with `return_token_strs`); the chat count is chat completions' prompt_tokens."""
        return await self.tokenization.tokenize(body)

    @app.post("/detokenize")
    async def detokenize(self, body: DetokenizeRequest) -> JSONResponse:
        """vLLM's /detokenize: `tokens` → `prompt` (the text)."""
        return await self.tokenization.detokenize(body)

    @app.get("/v1/models")
    async def list_models(self) -> JSONResponse:
        """The base model and every registered LoRA adapter."""
        return JSONResponse({"object": "list", "data": await self.models.cards()})

    @app.get("/v1/models/{model_id:path}")
    async def get_model(self, model_id: str) -> JSONResponse:
        _, mux = await self.models.resolve(model_id)
        if mux is None:
            return JSONResponse(self.models.card(self.model_id))
        ref = await self.models.adapters.lookup(model_id)
        return JSONResponse(self.models.card(model_id, ref.path if ref else None))

    # ------------------------------------------------------------------ LoRA adapters

    # Admin routes (auth.admin_paths), with auth on or off: the admission middleware answers 403
    # `admin_routes_disabled` while no admin key is configured, else 401 without a key and 403
    # for a client key, before the body is read.

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(self, body: LoadLoraRequest) -> Response:
        """vLLM's shape: register an adapter for every replica; 400 for a bad path or a taken name."""
        self._require_runtime_loading()
        if body.lora_name == self.model_id:
            raise errors.bad_request("lora_name must differ from the base model's name.", "lora_name")
        taken = errors.bad_request(
            f"The lora adapter '{body.lora_name}' has already been loaded.", "lora_name", "adapter_exists"
        )
        if await self.models.adapters.get(body.lora_name) is not None:
            raise taken
        # Client input: never expand ~ or $VARS (the 400 message echoes the path as sent). The
        # model replica checks it on its node: inside lora.adapter_roots once symlinks and `..`
        # are resolved, safetensors weights only (deployments/adapter_paths.py check_adapter).
        path = body.lora_path if os.path.isabs(body.lora_path) else os.path.join(REPO_ROOT, body.lora_path)
        await self.calls.call(self.model.validate_adapter.remote(path, body.lora_path))
        if await self.models.adapters.register(body.lora_name, path, False) is None:
            raise taken
        logger.info("LoRA adapter %s registered from %s", body.lora_name, path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(self, body: UnloadLoraRequest) -> Response:
        self._require_runtime_loading()
        if not await self.models.adapters.unregister(body.lora_name):
            raise APIError(
                404,
                f"The lora adapter '{body.lora_name}' cannot be found.",
                param="lora_name",
                code="adapter_not_found",
            )
        self.models.forget(body.lora_name)
        logger.info("LoRA adapter %s unregistered", body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    def _require_runtime_loading(self) -> None:
        if not self.config.lora.allow_runtime_loading or not self.config.lora.engine_enabled():
            raise APIError(
                403, "Runtime LoRA loading is disabled (lora.allow_runtime_loading).", code="runtime_lora_disabled"
            )

    # ------------------------------------------------------------------ health and figures

    @app.get("/health")
    async def health(self, request: Request) -> JSONResponse:
        """Healthy only when the model deployment has a running replica whose engine answers.
        Public: the status and the replaced service's fields; the details with an admin key
        (with auth on or off, as the admin routes)."""
        return await self.health_check.health(detailed=is_admin(request.scope, self.auth))

    @app.get("/health/live")
    async def health_live(self) -> JSONResponse:
        """Liveness: this ingress replica's process and event loop answer (calls nothing)."""
        return self.health_check.live()

    @app.get("/health/ready")
    async def health_ready(self, request: Request) -> JSONResponse:
        """Readiness: 200 when the model, the tokenizer, the default model and every configured
        adapter can serve; 503 otherwise (what is missing: with an admin key, or auth off).
        Cached for `health.cache_s`, as /health."""
        return await self.health_check.ready(detailed=is_admin(request.scope, self.auth))

    @app.get("/stats")
    async def stats(self) -> JSONResponse:
        """The old service's /stats fields, cluster-wide (all ingress and model replicas)."""
        return JSONResponse(await self._stats_call(self.recorder.stats))

    @app.get("/metrics")
    async def metrics(self) -> JSONResponse:
        """The old service's /metrics JSON (waiting/running, tokens, TTFT and throughput SLOs)."""
        return JSONResponse(await self._stats_call(self.recorder.metrics_json))

    @app.get("/metrics/prometheus")
    async def metrics_prometheus(self) -> Response:
        return Response(await self._stats_call(self.recorder.prometheus_text), media_type=PROMETHEUS_CONTENT_TYPE)

    async def _stats_call(self, method):
        try:
            return await asyncio.wait_for(method(), timeout=10)
        except Exception as exc:
            logger.warning("stats actor unavailable: %s", exc)
            raise APIError(
                503,
                "Statistics are briefly unavailable; retry.",
                code="stats_unavailable",
                headers={"Retry-After": "1"},
            ) from None
