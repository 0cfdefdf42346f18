"""Model replica deployment: one vLLM `AsyncLLM` engine pinned to one GPU (or the CPU).

It takes token ids (never text) from the ingress, runs them through the engine and returns
the output as coalesced chunks: vLLM merges the deltas that pile up while a chunk is in
flight, so a slow consumer gets fewer, larger chunks instead of a backlog of one-token ones.
Cancelling the call (client gone, deadline passed) aborts the engine request.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from deployments.adapter_paths import check_adapter
from deployments.adapters import AdapterRegistry, LoraIds
from deployments.api.errors import APIError, engine_unavailable, model_not_found
from deployments.api.protocol import GenerationChunk, GenerationRequest
from deployments.autoscaling import engine_autoscaling_stats, uses_llm_policy
from deployments.config import ServiceConfig, resolve_path
from deployments.engine import prioritise_engine
from deployments.engine.factory import start_engine
from deployments.engine.gpu_memory import gpu_memory_gb
from deployments.engine.label_scoring import score_labels
from deployments.engine.outputs import PendingChunk, logprob_entry, token_logprobs
from deployments.engine.process import exit_on_engine_death, shutdown_engine
from deployments.observability import StatsRecorder
from deployments.observability.engine_metrics import EngineMetrics, engine_stat_loggers
from deployments.observability.tracing import engine_span
from deployments.options import base_options, current_app_name
from deployments.routing.prefill import PrefillSpeed

logger = logging.getLogger("ray.serve")


class ModelReplica:
    """Serve deployment class (plain class; `serve_app` applies `serve.deployment`)."""

    # The user's GPU semaphore (3) and waiting queue (10). graceful_shutdown_timeout_s is derived
    # from limits.request_timeout_s (serve_app.app_options).
    DEFAULT_OPTIONS: dict[str, Any] = base_options(
        "ModelReplica",
        max_ongoing_requests=3,
        max_queued_requests=10,
        ray_actor_options={"num_cpus": 1},
        health_check_period_s=10,
        health_check_timeout_s=30,
        graceful_shutdown_wait_loop_s=2,
    )

    async def __init__(  # type: ignore[misc]  # Serve awaits an async __init__
        self, config: dict[str, Any] | ServiceConfig, options: dict[str, Any]
    ):
        """`options`: this deployment's Serve options as the builder computed them
        (`serve_app.app_options`): its capacity and CPU share size the engine."""
        self.config = ServiceConfig.model_validate(config)
        t0 = time.monotonic()
        obs = self.config.observability
        # vLLM's own stat loggers (observability/engine_metrics.py); None: vLLM's defaults
        stat_loggers = engine_stat_loggers(obs.ray_metrics) if obs.engine_metrics and obs.enabled else None
        num_cpus = (options.get("ray_actor_options") or {}).get("num_cpus")
        started = start_engine(self.config, num_cpus, stat_loggers)
        self.engine, self.engine_args, self.on_cpu = started.engine, started.args, started.on_cpu
        from vllm.platforms import current_platform

        self.vllm_traces = bool(getattr(self.engine_args, "otlp_traces_endpoint", None))  # vLLM's own spans
        # vLLM re-reads its environment variables on every access unless cached; its engine
        # core caches them once started, its API server does not. The output path reads several
        # per engine step, so this process caches them too (the environment is final by now).
        from vllm.envs import enable_envs_cache

        enable_envs_cache()
        self.gpu_ids = self._gpu_ids()
        self.engine_priority = prioritise_engine(os.getpid(), self.config.engine.engine_niceness)
        capacity = options["max_ongoing_requests"]
        if not uses_llm_policy(options.get("autoscaling_config")):
            # Serve then collects no custom metrics from us
            self.record_autoscaling_stats = None  # type: ignore[method-assign, assignment]
        self.prefill_speed = PrefillSpeed()
        if self.config.routing.policy != "cache_affinity" or stat_loggers is None:
            # no router reads it (or no engine counters to measure it from): Serve asks nothing
            self.record_routing_stats = None  # type: ignore[method-assign, assignment]
        self.stats = StatsRecorder.from_config(
            self.config.observability, role="model", app_name=current_app_name(), capacity=capacity
        )
        if stat_loggers is not None:
            self.stats.engine_source = EngineMetrics(self.on_cpu).snapshot
        try:
            await self.stats.ready()
        except Exception as exc:  # stats never keep the engine from serving: pushes retry
            logger.warning("stats aggregator not reachable at start (%s: %s)", type(exc).__name__, exc)
        self.stats.start()  # heartbeat: this replica's capacity counts while it lives
        self.adapters = AdapterRegistry(current_app_name())
        self.lora_ids = LoraIds()  # the engine's LoRA ids: never one id for two adapters
        m = self.config.model
        self.parsers = None
        if m.tool_call_parser or m.reasoning_parser:  # vLLM's own output parsers (engine/output_parsing)
            from deployments.engine.output_parsing import OutputParsers

            self.parsers = OutputParsers(self.engine.tokenizer, m.tool_call_parser, m.reasoning_parser, m.model_id)
        # Serve model multiplexing: keeps up to N adapters per replica (LRU) and routes
        # requests for an adapter to replicas that already hold it.
        from ray import serve

        async def load_adapter(multiplexed_id: str):  # a plain function: Serve tags it
            return await self._load_adapter(multiplexed_id)

        self._adapter = serve.multiplexed(max_num_models_per_replica=self.config.lora.max_adapters_per_replica)(
            load_adapter
        )
        logger.info(
            "engine for %s ready in %.1f s (platform=%s, ray gpu ids=%s, CUDA_VISIBLE_DEVICES=%s)",
            self.config.model.model_id,
            time.monotonic() - t0,
            current_platform.device_name,
            self.gpu_ids,
            os.environ.get("CUDA_VISIBLE_DEVICES"),
        )

    @staticmethod
    def _gpu_ids() -> list:
        try:
            import ray

            return list(ray.get_gpu_ids())
        except Exception:  # outside Ray (unit tests)
            return []

    def _sampling_params(self, sampling: dict[str, Any], final_only: bool = False):
        """vLLM's `SamplingParams` from the ingress's translation of the request
        (`api.generation.sampling_params`); what vLLM refuses is a 400."""
        from vllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

        kind = RequestOutputKind.FINAL_ONLY if final_only else RequestOutputKind.DELTA
        sampling = dict(sampling)
        try:
            if sampling.get("structured_outputs") is not None:
                sampling["structured_outputs"] = StructuredOutputsParams(**sampling["structured_outputs"])
            if sampling.get("logit_bias") is not None:
                sampling["logit_bias"] = {int(k): v for k, v in sampling["logit_bias"].items()}
            return SamplingParams(**sampling, output_kind=kind)
        except (ValueError, TypeError) + _vllm_client_errors() as exc:
            param = getattr(exc, "parameter", None) or (
                "structured_outputs" if "structured" in str(exc) or "constraint" in str(exc) else None
            )
            raise APIError(400, f"Invalid sampling parameters: {exc}", param=param, code="invalid_value") from None

    # ------------------------------------------------------------------ adapters

    async def _load_adapter(self, multiplexed_id: str):
        """Serve calls this (through `self._adapter`) the first time this replica sees an
        adapter version; the LoRARequest is cached, LRU, per replica."""
        from vllm.lora.request import LoRARequest

        name, _, version = multiplexed_id.rpartition("@")
        ref = await self.adapters.get(name)
        if ref is None:
            raise model_not_found(name)
        if str(ref.version) != version:  # replaced since the ingress looked it up (its copy is older)
            raise APIError(
                503,
                f"The adapter {name!r} was just replaced; retry.",
                code="adapter_changed",
                headers={"Retry-After": "1"},
            )
        # Checked again on this node at load time (a runtime adapter: inside lora.adapter_roots,
        # resolved; every adapter: safetensors only); messages name the adapter, not its path.
        configured = ref.path in {resolve_path(p) for p in self.config.lora.adapters.values()}
        folder, _ = check_adapter(ref.path, self.config.lora, f"LoRA adapter {name!r}", configured=configured)
        # Not the registry's version: an id of this engine's own (LoraIds), so an id the engine
        # already holds never stands for other weights, whatever happened to the registry.
        lora_id = self.lora_ids.id_for(ref.name, folder, ref.version)
        lora = LoRARequest(lora_name=ref.name, lora_int_id=lora_id, lora_path=folder)
        try:
            await self.engine.add_lora(lora)
        except Exception as exc:
            detail = str(exc).replace(folder, "<adapter folder>").replace(ref.path, "<adapter folder>")
            raise APIError(
                400,
                f"The engine could not load adapter {name!r}: {detail}",
                param="lora_path",
                code="invalid_lora_adapter",
            ) from None
        logger.info("loaded LoRA adapter %s (v%s, engine id %d) from %s", ref.name, ref.version, lora_id, folder)
        return lora

    async def validate_adapter(self, path: str, shown: str | None = None) -> dict[str, Any]:
        """For POST /v1/load_lora_adapter: the adapter must be loadable from this node, from inside
        `lora.adapter_roots`, as safetensors. `shown`: the client's `lora_path`, the only path
        a message names."""
        if not self.config.lora.engine_enabled():
            raise APIError(400, "LoRA is disabled on this deployment (lora.enabled: false).", code="lora_disabled")
        shown = path if shown is None else shown
        return check_adapter(path, self.config.lora, f"LoRA adapter path {shown!r}")[1]

    async def _lora_request(self, multiplexed_id: str | None):
        return None if not multiplexed_id else await self._adapter(multiplexed_id)

    # ------------------------------------------------------------------ classification

    async def classify(
        self, prompts: list[list[int]], label_ids: list[list[int]], lora: str | None = None
    ) -> list[list[float]]:
        """Log-probability of each label's answer tokens after each prompt, up to a term common
        to all labels (label scoring, so the answer is always a valid label):
        `deployments.engine.label_scoring`, shared with the batch job."""
        import uuid

        lora_request = await self._lora_request(lora)
        tag = uuid.uuid4().hex[:12]
        with self.stats.engine_request(f"cls-{tag}", sum(len(p) for p in prompts)):
            return await score_labels(self.engine, prompts, label_ids, lora_request, tag)

    # ------------------------------------------------------------------ generation

    async def _outputs(self, req: GenerationRequest, final_only: bool = False) -> AsyncIterator[Any]:
        """The engine's outputs: a delta per engine step, or (`final_only`) one at the end."""
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

        params = self._sampling_params(req.sampling, final_only)
        lora_request = await self._lora_request(req.lora)
        try:
            with (
                self.stats.engine_request(req.request_id, len(req.prompt_token_ids)) as trace,
                engine_span(req.request_id, len(req.prompt_token_ids), self.vllm_traces) as span,
            ):
                async for out in self.engine.generate(
                    TokensPrompt(prompt_token_ids=req.prompt_token_ids),
                    params,
                    req.request_id,
                    lora_request=lora_request,
                    trace_headers=span.headers,
                    priority=req.priority,
                ):
                    if final_only:
                        timing = out.metrics  # vLLM's RequestStateStats (None without log stats)
                        trace.completed(
                            sum(len(o.token_ids) for o in out.outputs),
                            timing.first_token_latency if timing else None,
                            timing.last_token_ts - timing.first_token_ts if timing else None,
                        )
                    else:
                        trace.output(sum(len(o.token_ids) for o in out.outputs))
                    yield out
                span.set("llm.completion_tokens", trace.tokens)
        except EngineDeadError as exc:
            exit_on_engine_death(f"generate: {exc}")
            raise engine_unavailable("The model engine died; this replica is being replaced.") from None
        except EngineGenerateError as exc:
            # vLLM wraps what failed before the engine core saw the request (e.g. a value that
            # does not serialise); the engine itself is fine.
            if isinstance(exc.__cause__, (ValueError, TypeError, OverflowError)):
                raise APIError(400, f"Invalid request for the engine: {exc.__cause__}", code="invalid_value") from None
            raise
        except APIError:
            raise
        except (ValueError,) + _vllm_client_errors() as exc:  # vLLM's request validation
            raise APIError(400, str(exc), param=getattr(exc, "parameter", None), code="invalid_value") from None

    async def generate(self, req: GenerationRequest) -> list[GenerationChunk]:
        """Whole completion in one answer (non-streaming requests): one chunk per choice. The
        engine sends only the final output (as vLLM's server does for these): no per-step
        output to build and pass."""
        final = None
        async for out in self._outputs(req, final_only=True):
            final = out
        if final is None:
            return [GenerationChunk("", 0)]
        k = req.sampling.get("logprobs")
        prompt = self._prompt_logprobs(final, req)
        chunks = []
        for c in final.outputs:
            chunk = GenerationChunk(
                c.text, len(c.token_ids), c.finish_reason, c.stop_reason, c.index, token_logprobs(c, k), prompt
            )
            if (parser := self._choice_parser(req)) is not None:
                reasoning, content, calls = parser.final(c.text, c.token_ids)
                chunk.text, chunk.tool_calls = content or "", calls or None
                chunk.reasoning = reasoning if req.parse is None or req.parse.get("include_reasoning", True) else None
                if calls and c.finish_reason == "stop":
                    chunk.finish_reason = "tool_calls"
            chunks.append(chunk)
        return chunks

    def _choice_parser(self, req: GenerationRequest):
        """vLLM's output parser for one choice of a chat request (None without parsers)."""
        if self.parsers is None or req.parse is None:
            return None
        return self.parsers.for_choice(req.parse, req.prompt_token_ids)

    async def generate_stream(self, req: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Streamed completion. The first output goes out at once; after it, the outputs of
        the next `streaming.coalesce_ms` travel as one chunk per choice (and vLLM itself
        merges deltas that wait while a chunk is in flight), so a token costs far less than
        one hop."""
        interval = self.config.streaming.coalesce_ms / 1000.0
        k = req.sampling.get("logprobs")
        pending: dict[int, PendingChunk] = {}
        last = 0.0
        prompt = None
        async for out in self._outputs(req):
            finished = False
            if prompt is None:
                prompt = self._prompt_logprobs(out, req)
            for c in out.outputs:
                if c.index not in pending:
                    pending[c.index] = PendingChunk(
                        prompt, self._choice_parser(req), req.parse is None or req.parse.get("include_reasoning", True)
                    )
                p = pending[c.index]
                p.add(c, k)
                finished |= c.finish_reason is not None
            now = time.monotonic()
            if finished or now - last >= interval:
                for index in sorted(pending):
                    if pending[index].ready():
                        yield pending[index].flush(index)
                last = now
        for index in sorted(pending):
            if pending[index].ready():
                yield pending[index].flush(index)

    def _prompt_logprobs(self, out, req: GenerationRequest):
        """The prompt's (token, logprob, alternatives) when the request asked for them (an
        echoed completions prompt); the first token has no logprob."""
        k = req.sampling.get("prompt_logprobs")
        if k is None or out.prompt_logprobs is None:
            return None
        entries: list[tuple[str, float | None, list[tuple[str, float]]]] = []
        for tid, step in zip(req.prompt_token_ids, out.prompt_logprobs):
            if step is None:
                entries.append((self.engine.tokenizer.decode([tid]), None, []))
            else:
                entries.append(logprob_entry(step, tid, k))
        return entries

    # ------------------------------------------------------------------ health

    async def _engine_error(self, where: str) -> Exception | None:
        """The engine's own check: None while it runs, else what failed. A dead engine ends this
        replica (`exit_on_engine_death`: vLLM cannot start a new engine core in a live
        `AsyncLLM`), so that Serve replaces it at once."""
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            await self.engine.check_health()
        except Exception as exc:
            if isinstance(exc, EngineDeadError):
                exit_on_engine_death(f"{where}: {type(exc).__name__}")
            return exc
        return None

    async def check_health(self) -> None:
        """Serve's periodic health check: fails when the engine is dead."""
        error = await self._engine_error("health check")
        self.stats.set_healthy(error is None)
        if error is not None:
            raise error

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metrics hook: the engine's KV-cache usage, running and
        waiting requests and TTFT totals for the LLM-aware policy (deployments/autoscaling.py).
        Only with that policy (`__init__` hides it otherwise)."""
        return engine_autoscaling_stats()

    async def record_routing_stats(self) -> dict[str, float]:
        """Serve's routing-stats hook: this engine's measured prefill speed, which bounds how
        long `cache_affinity` lets a request wait for this replica (routing/prefill.py). Only
        with that policy and the engine's metrics on (`__init__` hides it otherwise)."""
        return self.prefill_speed.routing_stats()

    async def engine_metrics(self) -> dict[str, Any] | None:
        """vLLM's engine figures as this replica reads them now (what its pushes carry);
        None with `observability.engine_metrics` off."""
        source = self.stats.engine_source
        return source() if source is not None else None

    async def health(self) -> dict[str, Any]:
        """Deep health for GET /health: engine state, pinning and accelerator memory."""
        error = await self._engine_error("/health")
        return {
            "engine": "ok" if error is None else f"dead: {type(error).__name__}",
            "platform": "cpu" if self.on_cpu else "gpu",
            "ray_gpu_ids": [str(g) for g in self.gpu_ids],
            "node_id": _node_id(),
            "pid": os.getpid(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "num_unfinished_requests": self.engine.get_num_unfinished_requests(),
            "engine_priority": self.engine_priority,
            "accelerator_memory_gb": _accelerator_memory(self.on_cpu),
            "gpu": gpu_memory_gb(self.on_cpu),  # the replaced service's /health `gpu` (NVML)
        }

    def __del__(self):
        shutdown_engine(self)


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:
        return None


def _vllm_client_errors() -> tuple[type[BaseException], ...]:
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:  # older vLLM: VLLMValidationError is a ValueError
        return ()
    return (VLLMClientError,)


def _accelerator_memory(on_cpu: bool) -> dict[str, float] | None:
    if on_cpu:
        return None
    try:
        import torch

        free, total = torch.cuda.mem_get_info()
        gb = 1024**3
        return {
            "allocated": round(torch.cuda.memory_allocated() / gb, 3),
            "reserved": round(torch.cuda.memory_reserved() / gb, 3),
            "free": round(free / gb, 3),
            "total": round(total / gb, 3),
        }
    except Exception:
        return None
