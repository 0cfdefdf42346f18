"""Ingress router deployment: the OpenAI-compatible HTTP API (FastAPI through `serve.ingress`).

Request path: validate (protocol) → tokenize (tokenizer deployment, CPU) → generate (model
replica deployment, GPU) → OpenAI JSON or SSE. Everything that can go wrong becomes an OpenAI
error object with the right status (errors module): Serve's backpressure on the model replica
is a 503 with `Retry-After`, never a 500.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
import uuid
import weakref
from typing import Any, AsyncIterator

from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from deployments import admission, errors
from deployments.adapters import AdapterRegistry
from deployments.admission.middleware import Admission, AdmissionMiddleware
from deployments.admission.auth import ApiKeyAuth
from deployments.config import REPO_ROOT, ServiceConfig, current_app_name, deployment_options, resolve_path
from deployments.api.errors import APIError
from deployments.observability import StatsRecorder
from deployments.admission.rate_limit import RateLimiter
from deployments.api.protocol import (
    ChatCompletionRequest,
    ClassifyRequest,
    CompletionRequest,
    GenerationChunk,
    GenerationRequest,
    LoadLoraRequest,
    SamplingFields,
    UnloadLoraRequest,
    chat_chunk,
    chat_completion,
    completion_chunk,
    model_card,
    text_completion,
    usage,
    usage_chunk,
)

logger = logging.getLogger("ray.serve")

app = FastAPI(
    title="LLM serving on Ray Serve",
    description="OpenAI-compatible API: ingress router → tokenizer → vLLM model replica.",
    version="0.1.0",
)
errors.install_exception_handlers(app)
app.add_middleware(AdmissionMiddleware)
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Fields passed to vLLM's SamplingParams when the client set them.
_PASSTHROUGH = (
    "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "stop_token_ids",
)
_SSE_DONE = b"data: [DONE]\n\n"
# How long a request the capacity gate admitted is re-sent when Serve's router refuses it in
# the moment a burst arrives (see `IngressRouter._start`).
ADMISSION_RETRY_S = 2.0


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def _backpressure_types() -> tuple[type, ...]:
    from ray.serve.exceptions import BackPressureError

    return (BackPressureError,)


def _unavailable_types() -> tuple[type, ...]:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from ray.serve.exceptions import DeploymentUnavailableError

    return (ActorDiedError, ActorUnavailableError, RayActorError, DeploymentUnavailableError)


def model_options(config: ServiceConfig) -> dict[str, Any]:
    """The model deployment's Serve options: its defaults with the config's merged over."""
    from deployments.model_replica import ModelReplica

    return deployment_options(ModelReplica.DEFAULT_OPTIONS, config, "model")


class ModelCapacity:
    """Requests this ingress replica has in flight to the model deployment (arrival to end of
    response) against the most Serve admits from one caller: `max_ongoing_requests` × model
    replicas (`max_replicas` when autoscaling) + `max_queued_requests` (Serve's queue is per
    caller). At that count Serve's router would refuse the next request too, so it is refused
    here at once with the same 503 + Retry-After, before it costs a tokenizer call: under
    overload the 503s stay cheap and the engine keeps the CPU. Each ingress replica counts only
    its own requests, so this never refuses what Serve would admit, except in the moment
    between a replica finishing a request and its response reaching here.

    `assured` is the least Serve admits from one caller (`min_replicas` when autoscaling): up
    to that count a refusal by Serve's router is its counting race, not a full queue (see
    `IngressRouter._start`)."""

    def __init__(self, limit: int | None, assured: int | None = None):
        self.limit, self.in_flight = limit, 0
        self.assured = limit if assured is None else assured

    @classmethod
    def from_options(cls, opts: dict[str, Any]) -> "ModelCapacity":
        """From the model deployment's Serve options (`model_options`)."""
        queued = opts.get("max_queued_requests", -1)
        auto = opts.get("autoscaling_config")
        def auto_field(name: str):
            return auto.get(name) if isinstance(auto, dict) else getattr(auto, name, None)

        replicas = auto_field("max_replicas") if auto else opts.get("num_replicas", 1)
        fewest = auto_field("min_replicas") if auto else replicas
        fewest = 1 if fewest is None else fewest  # Serve's default min_replicas
        if queued is None or queued < 0 or not isinstance(replicas, int):
            return cls(None)  # unbounded queue (or "auto" replicas): Serve alone decides
        ongoing = opts["max_ongoing_requests"]
        return cls(ongoing * replicas + queued, ongoing * fewest + queued)

    def acquire(self, retry_after_s: float) -> "_Slot":
        if self.limit is not None and self.in_flight >= self.limit:
            raise errors.overloaded(retry_after_s)
        self.in_flight += 1
        return _Slot(self, self.in_flight)


class _Slot:
    __slots__ = ("owner", "position")

    def __init__(self, owner: ModelCapacity, position: int):
        self.owner: ModelCapacity | None = owner
        self.position = position  # the in-flight count this request made on arrival

    def assured(self) -> bool:
        """Whether Serve admits this request for sure: it arrived (or the count has dropped
        since) within `ModelCapacity.assured`."""
        owner = self.owner
        return owner is not None and owner.assured is not None \
            and min(self.position, owner.in_flight) <= owner.assured

    def release(self) -> None:
        if self.owner is not None:
            self.owner.in_flight -= 1
            self.owner = None


class IngressRouter:
    """Serve deployment class (plain class; `serve_app` wraps it with `serve.ingress(app)`)."""

    DEFAULT_OPTIONS: dict[str, Any] = {
        "name": "IngressRouter",
        "logging_config": {"encoding": "JSON"},  # structured logs with request ids; no prompts
        "num_replicas": 1,
        "max_ongoing_requests": 1000,
        "ray_actor_options": {"num_cpus": 0.25},
        # Old replicas drain on redeploy/downscale: every request ends within request_timeout_s
        # (120 s), so let them finish rather than being force-killed after Serve's default 20 s.
        "graceful_shutdown_wait_loop_s": 2,
        "graceful_shutdown_timeout_s": 130,
    }

    async def __init__(self, tokenizer, model, config: dict[str, Any] | ServiceConfig):
        self.config = ServiceConfig.model_validate(config)
        self.limits = self.config.limits
        self.model_id = self.config.model.model_id
        self.tokenizer = tokenizer
        self.model = model
        self.model_stream = model.options(stream=True)
        self.created = int(time.time())
        self._backpressure = _backpressure_types()
        self._unavailable = _unavailable_types()

        app_name = current_app_name()
        self.stats = StatsRecorder.from_config(self.config.observability, role="ingress", app_name=app_name)
        self.limiter = RateLimiter.from_config(self.config.rate_limit, app_name)
        auth = ApiKeyAuth.from_config(self.config.auth)
        await self.limiter.ready()
        await self.stats.ready()
        self.adapters = AdapterRegistry(app_name)
        for name, path in self.config.lora.adapters.items():
            await self.adapters.register(name, resolve_path(path), True)
        self._handle_cache: dict[str, tuple[Any, Any]] = {}
        self.model_options = model_options(self.config)
        self.capacity = ModelCapacity.from_options(self.model_options)
        from deployments.classification import labels_for_model

        self.labels = list(self.config.classification.labels or labels_for_model(self.config.model.resolved_source()))
        errors.set_rejection_hook(self.stats.record_rejection)
        admission.install(Admission(
            auth=auth, limiter=self.limiter, trusted_proxies=self.config.rate_limit.trusted_proxies,
            max_request_bytes=self.limits.max_request_bytes, stats=self.stats,
            public_paths=frozenset(auth.public_paths),
        ))
        logger.info("ingress ready: rate limits %s, auth %s", self.limiter.describe(),
                    "on" if auth.enabled else "off")

    # ------------------------------------------------------------------ endpoints

    @app.get("/v1/models")
    async def list_models(self) -> JSONResponse:
        """The base model and every registered LoRA adapter."""
        cards = [model_card(self.model_id, self.config.model.owned_by, created=self.created)]
        for ref in await self.adapters.list():
            cards.append(model_card(ref.name, self.config.model.owned_by, root=ref.path,
                                    parent=self.model_id, created=self.created))
        return JSONResponse({"object": "list", "data": cards})

    @app.get("/v1/models/{model_id:path}")
    async def get_model(self, model_id: str) -> JSONResponse:
        _, mux = await self._resolve_model(model_id)
        if mux is None:
            return JSONResponse(model_card(self.model_id, self.config.model.owned_by, created=self.created))
        ref = await self.adapters.get(model_id)
        return JSONResponse(model_card(model_id, self.config.model.owned_by, root=ref.path if ref else None,
                                       parent=self.model_id, created=self.created))

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(self, body: LoadLoraRequest) -> Response:
        """vLLM's shape: register an adapter for every replica; 400 for a bad path or a taken name."""
        self._require_runtime_loading()
        if body.lora_name == self.model_id:
            raise errors.bad_request("lora_name must differ from the base model's name.", "lora_name")
        existing = await self.adapters.get(body.lora_name)
        if existing is not None:
            raise errors.bad_request(f"The lora adapter '{body.lora_name}' has already been loaded.",
                                     "lora_name", "adapter_exists")
        # Client input: never expand ~ or $VARS (the 400 message echoes the path).
        path = body.lora_path if os.path.isabs(body.lora_path) else os.path.join(REPO_ROOT, body.lora_path)
        await self._call(self.model.validate_adapter.remote(path))
        if await self.adapters.register(body.lora_name, path, False) is None:
            raise errors.bad_request(f"The lora adapter '{body.lora_name}' has already been loaded.",
                                     "lora_name", "adapter_exists")
        logger.info("LoRA adapter %s registered from %s", body.lora_name, path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(self, body: UnloadLoraRequest) -> Response:
        self._require_runtime_loading()
        if not await self.adapters.unregister(body.lora_name):
            raise APIError(404, f"The lora adapter '{body.lora_name}' cannot be found.",
                           param="lora_name", code="adapter_not_found")
        self._handle_cache = {k: v for k, v in self._handle_cache.items()
                              if not k.startswith(body.lora_name + "@")}
        logger.info("LoRA adapter %s unregistered", body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.post("/v1/classify")
    async def classify(self, body: ClassifyRequest) -> JSONResponse:
        """Each text gets a label from the label set (label scoring: never an invalid label)
        and the probability of every label."""
        trace = self.stats.request_started("/v1/classify", request_id=_request_id(), stream=False)
        slot = None
        try:
            served, mux = await self._resolve_model(body.model or self.config.classification.model)
            texts, labels = self._check_classify(body)
            slot = self.capacity.acquire(self.limits.retry_after_s)
            async with asyncio.timeout(self.limits.request_timeout_s):
                enc = await self.tokenizer.encode_classify.remote(texts, labels)
                if enc.get("error"):
                    raise APIError(**enc["error"])
                trace.tokenized(sum(len(p) for p in enc["prompts"]))
                trace.dispatched()
                unary, _ = self._handles(mux)
                _, scores = await self._start(
                    slot, lambda: unary.classify.remote(enc["prompts"], enc["label_ids"], mux))
        except TimeoutError:
            trace.finished(504, "timeout")
            raise errors.timed_out(self.limits.request_timeout_s) from None
        except BaseException as exc:
            trace.failed(exc)
            raise
        finally:
            if slot is not None:
                slot.release()
        trace.finished(200, completion_tokens=0)
        data = []
        for i, row in enumerate(scores):
            top = max(row)
            exp = [math.exp(v - top) for v in row]
            total = sum(exp)
            probs = {label: e / total for label, e in zip(labels, exp)}
            data.append({"index": i, "label": labels[row.index(top)], "scores": probs})
        label_tokens = sum(len(ids) for ids in enc["label_ids"])
        prompt_tokens = sum(len(p) + label_tokens for p in enc["prompts"])
        return JSONResponse({"object": "list", "model": served, "data": data,
                             "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}})

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest):
        def prepare():
            max_tokens = self._max_tokens(body.max_completion_tokens or body.max_tokens,
                                          self.limits.default_max_tokens_chat)
            if len(body.messages) > self.limits.max_messages:
                raise errors.bad_request(
                    f"messages: at most {self.limits.max_messages} messages per request "
                    f"(got {len(body.messages)})", "messages", "too_many_messages")
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            return max_tokens, lambda: self.tokenizer.encode_chat.remote(
                messages, max_tokens, body.add_generation_prompt)

        return await self._serve(body, "chat", prepare)

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest):
        def prepare():
            max_tokens = self._max_tokens(body.max_tokens, self.limits.default_max_tokens_completion)
            return max_tokens, lambda: self.tokenizer.encode_prompt.remote(body.prompt, max_tokens)

        return await self._serve(body, "completion", prepare)

    @app.get("/health")
    async def health(self) -> JSONResponse:
        """Healthy only when the model deployment has a running replica whose engine answers."""
        report: dict[str, Any] = {"model": self.model_id, "limits": self._limits_report()}
        ok = True
        try:
            report["replica"] = await asyncio.wait_for(self.model.health.remote(), timeout=5.0)
            ok = report["replica"].get("engine") == "ok"
        except self._backpressure:
            report["replica"] = {"engine": "busy (all slots and queue places taken)"}
        except asyncio.TimeoutError:
            report["replica"] = {"engine": "busy (no answer within 5 s)"}
        except Exception as exc:
            report["replica"] = {"engine": f"unavailable: {type(exc).__name__}"}
            ok = False
        report["deployments"] = self._deployment_states()
        model_state = report["deployments"].get("ModelReplica")
        if model_state is not None and model_state.get("running_replicas", 0) == 0:
            ok = False
        report["status"] = "healthy" if ok else "unhealthy"
        mem = (report.get("replica") or {}).get("accelerator_memory_gb")
        report["accelerator_memory_gb"] = mem
        return JSONResponse(report, status_code=200 if ok else 503)

    @app.get("/stats")
    async def stats(self) -> JSONResponse:
        """The old service's /stats fields, cluster-wide (all ingress and model replicas)."""
        return JSONResponse(await self._stats_call(self.stats.stats))

    @app.get("/metrics")
    async def metrics(self) -> JSONResponse:
        """The old service's /metrics JSON (waiting/running, tokens, TTFT and throughput SLOs)."""
        return JSONResponse(await self._stats_call(self.stats.metrics_json))

    @app.get("/metrics/prometheus")
    async def metrics_prometheus(self) -> Response:
        return Response(await self._stats_call(self.stats.prometheus_text), media_type=PROMETHEUS_CONTENT_TYPE)

    async def _stats_call(self, method):
        try:
            return await asyncio.wait_for(method(), timeout=10)
        except Exception as exc:
            logger.warning("stats actor unavailable: %s", exc)
            raise errors.engine_unavailable("Statistics are briefly unavailable; retry.") from None

    # ------------------------------------------------------------------ request path

    async def _serve(self, body: SamplingFields, kind: str, prepare) -> Any:
        """Validate (`prepare` → max_tokens and the tokenizer call), tokenize, generate."""
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + _request_id()
        endpoint = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        trace = self.stats.request_started(endpoint, request_id=rid, stream=body.stream)
        timeout = min(body.timeout or self.limits.request_timeout_s, self.limits.request_timeout_s)
        deadline = time.monotonic() + timeout
        created = int(time.time())
        slot = None
        try:
            model_name, mux = await self._resolve_model(body.model)
            unary, streaming = self._handles(mux)
            max_tokens, encode = prepare()
            slot = self.capacity.acquire(self.limits.retry_after_s)
            async with asyncio.timeout(timeout):
                enc = await encode()
                if enc.error:
                    raise APIError(**enc.error)
                trace.tokenized(len(enc.token_ids))
                greq = GenerationRequest(rid, enc.token_ids, self._sampling(body, max_tokens), mux)
                trace.dispatched()
                if not body.stream:
                    _, out = await self._start(slot, lambda: unary.generate.remote(greq))
                    slot.release()
                    make = chat_completion if kind == "chat" else text_completion
                    text = out.text
                    if kind == "completion" and getattr(body, "echo", False) and isinstance(body.prompt, str):
                        text = body.prompt + text
                    trace.finished(200, completion_tokens=out.num_tokens)
                    return JSONResponse(
                        make(rid, model_name, created, text, out.finish_reason,
                             len(enc.token_ids), out.num_tokens),
                    )
                stream, first = await self._start(slot, lambda: streaming.generate_stream.remote(greq),
                                                  lambda stream: stream.__anext__())
        except TimeoutError:
            if slot is not None:
                slot.release()
            trace.finished(504, "timeout")
            raise errors.timed_out(timeout) from None
        except BaseException as exc:
            if slot is not None:
                slot.release()
            trace.failed(exc)
            raise
        events = self._sse_events(kind, body, rid, model_name, created, len(enc.token_ids),
                                  first, stream, deadline, timeout, trace, slot)
        weakref.finalize(events, slot.release)  # also when the stream is never iterated
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def _start(self, slot: _Slot, send, first=lambda response: response):
        """Send a call to the model deployment (`send()` → its response) and await the first
        result (`first(response)`: the whole result, or a stream's first chunk, None if the
        stream is empty). Returns (response, first result). On a deadline or cancellation the
        call is cancelled, which aborts its engine request.

        Serve's router counts a request as queued until a replica has taken it, so when
        requests arrive together it refuses some within capacity: with 3 slots and 10 queue
        places, the 11th–13th of 13 simultaneous arrivals while the first 3 are still being
        assigned (Serve's router notes this in `wrap_request_assignment`). When this ingress's
        capacity gate admitted the request within what Serve admits at the fewest replicas
        (`_Slot.assured`), such a refusal is that moment, not a full queue: the call is sent
        again (a refused call never reached a replica) for up to `ADMISSION_RETRY_S`, then the
        503 stands. Past that count (autoscaling: fewer replicas running than the most) Serve's
        refusal is the 503 at once."""
        give_up, pause = time.monotonic() + ADMISSION_RETRY_S, 0.005
        while True:
            response = send()
            try:
                return response, await self._call(first(response))
            except StopAsyncIteration:
                return response, None
            except APIError as exc:  # refused or failed: nothing left to cancel
                if exc.code != "queue_full" or not slot.assured() \
                        or time.monotonic() + pause > give_up:
                    raise
            except BaseException:
                response.cancel()
                raise
            await asyncio.sleep(pause)
            pause = min(2 * pause, 0.1)

    async def _call(self, awaitable):
        """Await a model-replica call, mapping Serve/Ray failures to OpenAI errors."""
        try:
            return await awaitable
        except APIError:
            raise
        except self._backpressure as exc:
            raise errors.overloaded(getattr(exc, "_retry_after_s", None) or self.limits.retry_after_s) from None
        except self._unavailable as exc:
            logger.warning("model replica unavailable: %s", exc)
            raise errors.engine_unavailable(
                "The model replica failed while serving this request; it is being replaced. Retry."
            ) from None

    async def _sse_events(self, kind: str, body: SamplingFields, rid: str, model: str, created: int,
                          prompt_tokens: int, first: GenerationChunk | None, stream,
                          deadline: float, timeout: float, trace, slot: _Slot) -> AsyncIterator[bytes]:
        chat = kind == "chat"
        include_usage, continuous = body.include_usage(), body.continuous_usage()
        completion_tokens = 0
        done = False

        # The hot path: a content chunk is a fixed prefix + the JSON-escaped text + a fixed
        # suffix, so only the text is serialised per chunk.
        template = (chat_chunk(rid, model, created, {"content": "\0"}) if chat
                    else completion_chunk(rid, model, created, "\0"))
        head, tail = _sse(template).split(b'"\\u0000"')

        def render(chunk: GenerationChunk) -> bytes | None:
            nonlocal completion_tokens
            completion_tokens += chunk.num_tokens
            trace.chunk(chunk.num_tokens)
            if not chunk.text and not chunk.finish_reason:
                return None  # an incomplete UTF-8 sequence: its text comes with the next chunk
            if chunk.finish_reason is None and not continuous:
                return head + json.dumps(chunk.text, ensure_ascii=False).encode() + tail
            use = usage(prompt_tokens, completion_tokens) if continuous else None
            if chat:
                return _sse(chat_chunk(rid, model, created, {"content": chunk.text}, chunk.finish_reason, use))
            return _sse(completion_chunk(rid, model, created, chunk.text, chunk.finish_reason, use))

        def fail(exc: APIError) -> bytes:
            trace.finished(exc.status, exc.code, completion_tokens=completion_tokens)
            return _sse(exc.body()) + _SSE_DONE

        # Fewer, larger writes (each costs a send through the ASGI stack and a syscall): the
        # role chunk goes out with the first content, the last content with usage and [DONE].
        held = b""
        try:
            if chat:
                held = _sse(chat_chunk(rid, model, created, {"role": "assistant", "content": ""}))
            if first is not None and (data := render(first)):
                held += data
            if first is not None and first.finish_reason is None and held:
                yield held
                held = b""
            try:
                async with asyncio.timeout_at(asyncio.get_running_loop().time() + (deadline - time.monotonic())):
                    async for chunk in stream:
                        if data := render(chunk):
                            if chunk.finish_reason is None:
                                yield held + data if held else data
                                held = b""
                            else:
                                held += data
            except TimeoutError:
                yield held + fail(errors.timed_out(timeout))
                return
            except APIError as exc:
                yield held + fail(exc)
                return
            except self._unavailable:
                yield held + fail(errors.engine_unavailable("The model replica failed mid-stream."))
                return
            done = True
            trace.finished(200, completion_tokens=completion_tokens)
            if include_usage:
                obj = "chat.completion.chunk" if chat else "text_completion"
                held += _sse(usage_chunk(rid, model, created, obj, usage(prompt_tokens, completion_tokens)))
            yield held + _SSE_DONE
        finally:
            slot.release()
            if not done:
                # Client gone, deadline passed or replica failed: release the engine request.
                stream.cancel()
                trace.finished(499, "client_closed", completion_tokens=completion_tokens)

    # ------------------------------------------------------------------ helpers

    async def _resolve_model(self, name: str | None) -> tuple[str, str | None]:
        """(served name, multiplexed adapter id or None for the base model); 404 if unknown."""
        if name in (None, "", self.model_id):
            return self.model_id, None
        ref = await self.adapters.get(name)
        if ref is None:
            raise errors.model_not_found(name)
        return ref.name, ref.multiplexed_id

    def _handles(self, mux: str | None):
        """(unary, streaming) model handles; adapter requests carry their multiplexed id so
        Serve routes them to replicas that already hold the adapter."""
        if mux is None:
            return self.model, self.model_stream
        if mux not in self._handle_cache:
            h = self.model.options(multiplexed_model_id=mux)
            self._handle_cache[mux] = (h, h.options(stream=True))
        return self._handle_cache[mux]

    def _require_runtime_loading(self) -> None:
        if not self.config.lora.allow_runtime_loading or not self.config.lora.engine_enabled():
            raise APIError(403, "Runtime LoRA loading is disabled (lora.allow_runtime_loading).",
                           code="runtime_lora_disabled")

    def _check_classify(self, body: ClassifyRequest) -> tuple[list[str], list[str]]:
        cfg = self.config.classification
        texts = body.texts()
        if not texts:
            raise errors.bad_request("input must hold at least one text.", "input")
        if len(texts) > cfg.max_inputs:
            raise errors.bad_request(f"at most {cfg.max_inputs} texts per request (got {len(texts)}).",
                                     "input", "too_many_inputs")
        for i, text in enumerate(texts):
            if not text.strip():
                raise errors.bad_request(f"input[{i}] is empty.", f"input[{i}]")
            if len(text) > cfg.max_input_chars:
                raise errors.bad_request(f"input[{i}] is longer than {cfg.max_input_chars} characters.",
                                         f"input[{i}]", "input_too_long")
        labels = body.labels or self.labels
        unknown = [label for label in labels if label not in self.labels]
        if unknown:
            raise errors.bad_request(f"unknown labels {unknown[:5]}; the label set is {self.labels}.",
                                     "labels", "unknown_labels")
        if len(set(labels)) != len(labels):
            raise errors.bad_request("labels must be distinct.", "labels")
        return texts, list(labels)

    def _max_tokens(self, requested: int | None, default: int) -> int:
        value = default if requested is None else requested
        cap = self.limits.max_tokens_cap
        if value > cap:
            raise errors.bad_request(
                f"max_tokens is {value}, above this service's cap of {cap}.", "max_tokens", "max_tokens_too_large")
        return value

    def _sampling(self, body: SamplingFields, max_tokens: int) -> dict[str, Any]:
        temperature = self.limits.default_temperature if body.temperature is None else body.temperature
        s: dict[str, Any] = {
            "max_tokens": max_tokens,
            "temperature": temperature,
            "ignore_eos": body.ignore_eos,
            "min_tokens": body.min_tokens,
            "include_stop_str_in_output": body.include_stop_str_in_output,
            "skip_special_tokens": body.skip_special_tokens,
            "spaces_between_special_tokens": body.spaces_between_special_tokens,
        }
        if body.min_tokens > max_tokens:
            raise errors.bad_request(
                f"min_tokens ({body.min_tokens}) must not exceed max_tokens ({max_tokens}).", "min_tokens")
        if body.stop:
            s["stop"] = body.stop
        for name in _PASSTHROUGH:
            value = getattr(body, name)
            if value is not None:
                s[name] = value
        if s.get("top_k") == 0:
            s["top_k"] = -1
        return s

    def _limits_report(self) -> dict[str, Any]:
        opts = self.model_options
        return {
            "max_ongoing_requests": opts.get("max_ongoing_requests"),
            "max_queued_requests": opts.get("max_queued_requests"),
            "autoscaling": bool(opts.get("autoscaling_config")),
            # this ingress replica's capacity gate: requests it has in flight to the model
            # deployment against the most Serve admits from it (None: Serve alone decides)
            "admission_limit": self.capacity.limit,
            "admitted_in_flight": self.capacity.in_flight,
            "max_tokens_cap": self.limits.max_tokens_cap,
            "max_model_len": self.config.engine.max_model_len,
            "request_timeout_s": self.limits.request_timeout_s,
            "default_temperature": self.limits.default_temperature,
            "rate_limits": self.limiter.describe(),
        }

    def _deployment_states(self) -> dict[str, Any]:
        try:
            from ray import serve

            app_name = serve.get_replica_context().app_name
            status = serve.status().applications[app_name]
        except Exception as exc:  # outside Serve, or the controller is briefly unreachable
            return {"error": f"{type(exc).__name__}"}
        out = {}
        for name, dep in status.deployments.items():
            states = {str(k.value if hasattr(k, "value") else k): v for k, v in dep.replica_states.items()}
            out[name] = {
                "status": str(dep.status.value if hasattr(dep.status, "value") else dep.status),
                "replica_states": states,
                "running_replicas": states.get("RUNNING", 0),
            }
        return out


def _request_id() -> str:
    """Serve's request id: the one in its JSON log lines and in the `X-Request-Id` response
    header (a client-sent `X-Request-Id` is kept), so a response, its logs and its metrics join."""
    try:
        from ray.serve.context import _get_serve_request_context

        rid = _get_serve_request_context().request_id
    except Exception:
        rid = ""
    return rid or uuid.uuid4().hex
