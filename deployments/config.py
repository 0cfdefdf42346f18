"""The service configuration: one pydantic model, the single source for `configs/serve_config.yaml`
(the application's `args`), the KubeRay `serveConfigV2` and the documented defaults. A leaf: it
imports only other config models. The environment's part: `config_env.py`; each deployment's
Serve options (its class's defaults, this config's `deployments` section over them): `options.py`.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deployments.admission.auth_config import AuthConfig
from deployments.admission.limits import RateLimitConfig
from deployments.autoscaling import DEFAULTS as _AUTOSCALING_DEFAULTS
from deployments.autoscaling import POLICY_FUNCTION as _POLICY_FUNCTION
from deployments.observability.config import ObservabilityConfig
from deployments.routing.config import RoutingConfig

REPO_ROOT = Path(__file__).resolve().parents[1]

# The application's three Serve deployments (`ServiceConfig.deployments`' keys).
DeploymentName = Literal["ingress", "tokenizer", "model"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelConfig(_Strict):
    """What is served."""

    model_id: str = Field(
        "tiny-qwen3",
        description="Name clients pass as `model`; listed by /v1/models and echoed in responses.",
    )
    model_source: str = Field(
        "models/tiny-qwen3",
        description="Local path (relative paths resolve against the repo root) or model folder "
        "mounted in the pod. Nothing is downloaded from a hub at run time.",
    )
    tokenizer_source: str | None = Field(None, description="Tokenizer path; defaults to `model_source`.")
    owned_by: str = Field("organization", description="`owned_by` reported by /v1/models.")
    default_model: str | None = Field(
        None,
        description="The model (the base `model_id`, an adapter name or an alias) that answers "
        "requests which name none. null: the base model. The shipped config names the fine-tuned "
        "classification adapter, as the replaced service answered every request with it.",
    )
    tool_call_parser: str | None = Field(
        None,
        description="vLLM tool-call parser that reads the model's own tool calls for `tool_choice: "
        "auto` (`hermes` for Qwen's `<tool_call>` format). null: `auto` is refused with a 400; `required`, "
        "a named function and `none` need no parser (forced calls are constrained to the function's schema).",
    )
    reasoning_parser: str | None = Field(
        None,
        description="vLLM reasoning parser that moves the model's reasoning out of the answer into "
        "`reasoning_content` (`qwen3` for `<think>…</think>`). null: the text is returned as generated.",
    )
    aliases: dict[str, str] = Field(
        default_factory=dict,
        description="Other names clients may send as `model` → the base "
        "`model_id` or an adapter name (e.g. the replaced service's `qwen-news-classifier`); "
        "listed by /v1/models.",
    )

    def resolved_source(self) -> str:
        return resolve_path(self.model_source)

    def resolved_tokenizer(self) -> str:
        return resolve_path(self.tokenizer_source or self.model_source)


# engine arguments the service derives from other settings: set there, not in `engine.extra`
_ENGINE_ARGS_SET_ELSEWHERE = {
    "model": "model.model_source",
    "tokenizer": "model.tokenizer_source",
    "served_model_name": "model.model_id",
    "enable_lora": "lora.enabled",
    "max_lora_rank": "lora.max_lora_rank",
    "max_loras": "lora.max_loras",
    "max_cpu_loras": "lora.max_cpu_loras",
    "structured_outputs_config": "engine.structured_outputs",
}


class EngineConfig(_Strict):
    """vLLM engine arguments (`AsyncEngineArgs`). Unknown engine arguments go in `extra`."""

    max_model_len: int = Field(1024, gt=0, description="Context length: prompt + max_tokens.")
    dtype: str = Field("auto", description="Weights/activation dtype (auto, bfloat16, float16, float32).")
    gpu_memory_utilization: float = Field(
        0.90, gt=0, le=1, description="Fraction of GPU memory vLLM may use (GPU platforms)."
    )
    cpu_kvcache_space_gib: float = Field(
        1.0,
        gt=0,
        description="KV-cache size in GiB on the CPU platform (sets VLLM_CPU_KVCACHE_SPACE); "
        "there `gpu_memory_utilization` is replaced by `cpu_memory_utilization`.",
    )
    cpu_memory_utilization: float = Field(
        0.10, gt=0, le=1, description="On the CPU platform, the fraction of host memory vLLM reserves."
    )
    enforce_eager: bool | None = Field(
        None, description="Disable CUDA graphs / compilation. null: true on CPU, false on GPU."
    )
    quantization: str | None = Field(None, description="awq, gptq, fp8, bitsandbytes, … or null.")
    enable_prefix_caching: bool | None = Field(None, description="Prefix caching; null: vLLM's default.")
    max_num_seqs: int | None = Field(None, gt=0, description="Max sequences per engine step; null: vLLM's default.")
    scheduling_policy: Literal["fcfs", "priority"] = Field(
        "priority",
        description="vLLM's scheduler: `priority` orders its waiting queue (and, when KV "
        "memory runs short, which running request is preempted) by tenant priority, then each "
        "request's `priority`, then arrival; `fcfs`: arrival only (a request's `priority` then orders "
        "only the capacity gate's queue).",
    )
    seed: int | None = Field(0, description="Engine seed (per-request `seed` overrides sampling).")
    engine_niceness: int | None = Field(
        0,
        ge=-20,
        le=19,
        description="CPU niceness of vLLM's engine-core process. Ray starts its workers, and so the "
        "engine the model replica spawns, at niceness 15, level with the Serve processes around it; "
        "the engine core steps every token (it drives the GPU, or is the model on CPU), so it gets "
        "the CPU first. Lowering niceness needs CAP_SYS_NICE (root on a host, or a container running "
        "as root with `capabilities: add: [SYS_NICE]`); without it the engine keeps Ray's niceness "
        "and /health says so. null: leave it as Ray started it.",
    )
    structured_outputs: dict[str, Any] = Field(
        default_factory=lambda: {"backend": "xgrammar", "disable_any_whitespace": True},
        description="vLLM's `structured_outputs_config` (constrained decoding for `response_format` "
        "and `structured_outputs`). Compact JSON by default: with vLLM's default a small model pads "
        "JSON with whitespace until max_tokens (`disable_any_whitespace` needs a named backend).",
    )
    extra: dict[str, Any] = Field(
        default_factory=dict,
        description="Any other AsyncEngineArgs, passed through unchanged. An argument this section "
        "names (e.g. `max_model_len`) is taken as that field, so the tokenizer's context check and the "
        "engine agree (both given, different: an error); one the service sets from another section "
        "(`model`, `tokenizer`, LoRA, structured outputs) is an error naming it.",
    )

    @model_validator(mode="before")
    @classmethod
    def _fields_out_of_extra(cls, data: Any) -> Any:
        """`extra` arguments this config has a field for become that field: vLLM gets them
        from `extra` last (`engine_kwargs`), which would silently differ from what the service
        checks against (`engine.extra.max_model_len` vs the tokenizer's context limit)."""
        if not isinstance(data, dict) or not isinstance(data.get("extra"), dict):
            return data
        data, extra = dict(data), dict(data["extra"])
        for key in list(extra):
            if key in _ENGINE_ARGS_SET_ELSEWHERE:
                raise ValueError(f"engine.extra.{key}: set {_ENGINE_ARGS_SET_ELSEWHERE[key]} instead")
            if key in cls.model_fields and key != "extra":
                value = extra.pop(key)
                if key in data and str(data[key]) != str(value):  # one may come from the environment
                    raise ValueError(f"engine.extra.{key} ({value!r}) contradicts engine.{key} ({data[key]!r})")
                data[key] = value
        data["extra"] = extra
        return data


class LimitsConfig(_Strict):
    """Request limits, defaults from the user's single-GPU service."""

    max_tokens_cap: int = Field(
        512, gt=0, description="Largest `max_tokens` served; above it, what `max_tokens_over_cap` says."
    )
    max_tokens_over_cap: Literal["refuse", "clamp"] = Field(
        "refuse",
        description="A request's `max_tokens` above `max_tokens_cap`: `refuse` answers 400 "
        "`max_tokens_too_large`; `clamp` serves it with `max_tokens_cap` (for gateways configured with "
        "a larger fixed value; the response's `usage` shows what was generated).",
    )
    default_max_tokens_chat: int = Field(100, gt=0, description="`max_tokens` when a chat request omits it.")
    default_max_tokens_completion: int = Field(
        16, gt=0, description="`max_tokens` when a completions request omits it (OpenAI's default)."
    )
    default_temperature: float = Field(
        0.7, ge=0, le=2, description="Temperature when a request omits it (the user's API doc value)."
    )
    request_timeout_s: float = Field(
        120.0, gt=0, description="Deadline of a request end to end; past it: 504 and the generation is aborted."
    )
    max_messages: int = Field(1024, gt=0, description="Most chat messages in one request.")
    max_n: int = Field(4, ge=1, le=128, description="Largest `n` (choices per request) accepted; above it: 400.")
    max_request_bytes: int = Field(1_048_576, gt=0, description="Largest request body; above it: 413.")
    request_body_timeout_s: float = Field(
        10.0,
        gt=0,
        description="A request whose body has not fully arrived this many seconds after its "
        "headers gets a 408 `request_timeout` and its connection closed, on both request paths (a stalled "
        "client no longer holds an ingress slot). Headers themselves: on the fast path HAProxy's "
        "`LLM_SERVE_HAPROXY_REQUEST_TIMEOUT_S`; Serve's Python proxy has no header timeout (docs/security.md S18).",
    )
    retry_after_s: int = Field(
        1,
        ge=1,
        description="`Retry-After` seconds on 503 when the model is saturated; at least 1 (HTTP allows 0, "
        "but clients told 0 retry at once into the same saturation).",
    )
    fair_queue: bool = Field(
        True,
        description="Under overload, admit and send to the model by tenant (or key-less client "
        "address) so that each one's share tracks its weight (tenant priority + 1): the next request "
        "sent is from the tenant holding the fewest places per weight, and a newcomer from a lighter "
        "tenant takes the newest waiting place of the one holding the most, which gets the 503. "
        "false: first come, first served (docs/security.md S17).",
    )
    fair_queue_reserve: int = Field(
        0,
        ge=0,
        description="Model slots one tenant (or key-less client address) cannot fill while "
        "another has sent requests within the last 10 s: the other's next request starts at once "
        "instead of waiting for one of the first tenant's to end (its TTFT stays near what it gets "
        "alone); the busy tenant loses up to that many slots meanwhile. Counted per ingress replica "
        "against `max_ongoing_requests` × replicas; 0: work-conserving fair queueing only "
        "(docs/security.md S17). Applies with a bounded queue (`max_queued_requests` ≥ 0).",
    )


class StreamingConfig(_Strict):
    """How generated tokens travel from the model replica to the client."""

    coalesce_ms: float = Field(
        50.0,
        ge=0,
        description="The model replica sends the first token at once, then at most one chunk per "
        "`coalesce_ms` (all tokens generated meanwhile, in one SSE event): fewer hops and writes "
        "per token (50 ms, as Ray Serve LLM's stream batching: 20 updates a second; measured "
        "against 10 ms: 14 % less front-end CPU per request at 32 streams). 0: one chunk per "
        "engine step.",
    )


class LoraConfig(_Strict):
    """LoRA adapters served on the base model (vLLM LoRA + Serve model multiplexing)."""

    adapters: dict[str, str] = Field(
        default_factory=dict,
        description="Adapters to serve: name clients pass as `model` → local adapter folder "
        "(relative paths resolve against the repo root).",
    )
    enabled: bool | None = Field(
        None,
        description="Enable LoRA in the engine. null: when adapters are configured or `allow_runtime_loading` is true.",
    )
    allow_runtime_loading: bool = Field(
        True,
        description="Serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter. Admin routes: off "
        "(403 `admin_routes_disabled`) until an admin key is configured (`auth.admin_env_var`, or "
        "`role: admin` in `auth.file`), then for admin keys only — with auth on or off.",
    )
    adapter_roots: list[str] = Field(
        default_factory=lambda: ["models"],
        min_length=1,
        description="Folders POST /v1/load_lora_adapter may load adapters from (relative paths resolve "
        "against the repo root): a `lora_path` is accepted only if, with symlinks and `..` resolved on "
        "the model replica's node, it lies inside one of them (its weights and config too); else 400 "
        "`lora_path_not_allowed`; every file of the folder must resolve inside too. The adapters of "
        "`adapters` are the operator's own and exempt. Every adapter must ship "
        "`adapter_model.safetensors`, and its folder hold only allowed files (`*.safetensors`, "
        "`*.json`, `*.txt`, `*.md`, `*.jinja`, `tokenizer.model`, `.gitattributes`; subfolders are "
        "not read): 400 `lora_weights_not_safetensors` for pickled weights (`.bin`, `.pt`, …), "
        "`lora_file_not_allowed` for anything else.",
    )
    registry_cache_s: float = Field(
        1.0,
        ge=0,
        description="How long an ingress replica answers adapter names (and the default model, when "
        "it is an adapter) from its copy of the cluster-wide adapter registry before asking it "
        "again: no registry call per request. A name the copy lacks, and a change made through "
        "the same replica, are re-checked at once; other replicas' unloads and replacements are "
        "seen within this. 0: ask the registry on every request.",
    )
    max_lora_rank: int = Field(64, gt=0, description="Largest adapter rank the engine accepts (the user's r=64).")
    max_loras: int = Field(4, gt=0, description="Adapters active in one engine batch.")
    max_cpu_loras: int | None = Field(None, gt=0, description="Adapters cached in host memory; null: vLLM default.")
    max_adapters_per_replica: int = Field(
        8,
        gt=0,
        description="Adapters a model replica keeps loaded (Serve multiplexing LRU); "
        "requests route to replicas that already hold their adapter.",
    )

    def engine_enabled(self) -> bool:
        return self.enabled if self.enabled is not None else bool(self.adapters or self.allow_runtime_loading)


class ClassificationConfig(_Strict):
    """POST /v1/classify."""

    model: str | None = Field(
        None,
        description="The model (base id or adapter name) that classifies when a request names "
        "none. null: the base model. The shipped config names the classification adapter.",
    )
    labels: list[str] | None = Field(
        None,
        description="The label set. null: the model folder's labels.json, else the TNEWS labels "
        "in ../shared/data/tnews/labels.json.",
    )
    max_inputs: int = Field(32, gt=0, description="Most texts in one /v1/classify request.")
    max_input_chars: int = Field(2000, gt=0, description="Longest text accepted, in characters.")


class CompatConfig(_Strict):
    """Compatibility with the replaced Flask service's clients (docs/migration.md). Its other
    fields (/health `gpu` and `limits.*`, /stats `statistics`, the 503's `queue_size`, the
    `vllm_*` gauges) are always present beside ours; only what would change ours is switched."""

    legacy_health_status: bool = Field(
        False,
        description="GET /health says `status: ok` when healthy (the replaced service's "
        "word) instead of `healthy`; `unhealthy` and the HTTP status (200/503) are the same either way.",
    )


class HealthConfig(_Strict):
    """GET /health, /health/live and /health/ready (docs/reliability.md). Liveness answers
    from the ingress process alone; readiness and /health share one cached check: the model
    deployment (a running replica whose engine answers), the tokenizer deployment, and every
    adapter the config names (`lora.adapters`, `model.default_model`, `classification.model`,
    alias targets) registered in the adapter registry."""

    cache_s: float = Field(
        2.0,
        ge=0,
        description="How long one check's result answers /health and /health/ready: under load "
        "(probes, dashboards, clients polling) the model replica and the Serve controller are "
        "asked at most once per this many seconds per ingress replica. 0: every call checks.",
    )
    check_timeout_s: float = Field(
        5.0,
        gt=0,
        description="Deadline of each part of the check (the model replica's engine, Serve's "
        "status, the adapter registry), run at once. An engine that does not answer in time counts "
        "as busy (ready); Serve's status, as unknown (the engine's answer decides); the registry, "
        "as not ready.",
    )


class AutoscalingPolicyConfig(_Strict):
    """How the model deployment's autoscaling decides its replica count (docs/scale-out.md,
    "LLM-aware autoscaling"). Applies only where `deployments.model.autoscaling_config` is set;
    its delays, bounds and `target_ongoing_requests` apply to either policy."""

    policy: Literal["ongoing_requests", "llm"] = Field(
        "ongoing_requests",
        description="`ongoing_requests`: Serve's default policy, `ceil(ongoing requests / "
        "target_ongoing_requests)`. `llm`: `deployments.autoscaling.LLMAutoscalingPolicy`, the largest "
        "of that and the engines' own signals (KV-cache usage, engine waiting requests, TTFT), which the "
        "model replicas then report to Serve's controller; it scales out for a few long requests that "
        "fill the KV cache, where the request count alone would not. A `policy` set in "
        "`deployments.model.autoscaling_config` itself wins.",
    )
    kv_cache_target: float = Field(
        _AUTOSCALING_DEFAULTS["kv_cache_target"],
        gt=0,
        le=1,
        description="`llm` policy: the KV-cache usage (0-1) one replica should run at; replicas wanted = "
        "the replicas' KV-cache usage summed / this.",
    )
    engine_waiting_per_replica: float = Field(
        _AUTOSCALING_DEFAULTS["engine_waiting_per_replica"],
        ge=0,
        description="`llm` policy: engine waiting requests (accepted, not batched: KV cache or batch full) "
        "per replica, averaged over the look-back window, above which the policy scales out to "
        "(running + waiting) / running per replica.",
    )
    ttft_target_s: float | None = Field(
        _AUTOSCALING_DEFAULTS["ttft_target_s"],
        gt=0,
        description="`llm` policy: mean engine time to first token (s) over the look-back window above "
        "which one replica is added (the replaced service's target: 500 ms). null: TTFT is no signal.",
    )
    ttft_scale_in_ratio: float = Field(
        _AUTOSCALING_DEFAULTS["ttft_scale_in_ratio"],
        ge=0,
        le=1,
        description="`llm` policy: while the mean TTFT is above this fraction of `ttft_target_s`, the "
        "policy does not scale in (latency close to the target is no time to give a GPU back).",
    )

    def policy_options(self) -> dict[str, Any] | None:
        """`autoscaling_config.policy` for the `llm` policy (Serve's `AutoscalingPolicy` fields);
        None for Serve's default."""
        if self.policy != "llm":
            return None
        return {"policy_function": _POLICY_FUNCTION, "policy_kwargs": self.model_dump(exclude={"policy"})}


class ServiceConfig(_Strict):
    """Everything `serve_app.build_app` needs. Given as the application's `args`."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="The served model.")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="vLLM engine arguments.")
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Request limits.")
    streaming: StreamingConfig = Field(
        default_factory=StreamingConfig, description="How streamed tokens are chunked on their way to the client."
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapters served on the base model.")
    classification: ClassificationConfig = Field(
        default_factory=ClassificationConfig, description="The /v1/classify endpoint."
    )
    rate_limit: RateLimitConfig = Field(
        default_factory=RateLimitConfig,
        description="Per-client limits, cluster-wide (RATE_LIMIT_PER_MINUTE/RATE_LIMIT_PER_HOUR override).",
    )
    auth: AuthConfig = Field(default_factory=AuthConfig, description="Optional API-key authentication.")
    observability: ObservabilityConfig = Field(
        default_factory=ObservabilityConfig, description="Cluster-wide /stats, /metrics, Prometheus."
    )
    compat: CompatConfig = Field(
        default_factory=CompatConfig, description="Compatibility with the replaced Flask service's clients."
    )
    health: HealthConfig = Field(
        default_factory=HealthConfig, description="/health, liveness and readiness: what is checked, how often."
    )
    routing: RoutingConfig = Field(
        default_factory=RoutingConfig,
        description="How the ingress picks a model replica: session and prefix-cache affinity, or "
        "Serve's power of two.",
    )
    autoscaling: AutoscalingPolicyConfig = Field(
        default_factory=AutoscalingPolicyConfig,
        description="The model deployment's autoscaling policy: Serve's request count (default) or "
        "LLM-aware (KV cache, engine queue, TTFT).",
    )
    accelerator: Literal["auto", "gpu", "cpu"] = Field(
        "auto",
        description="`gpu`: the model replica asks Ray for one GPU (`num_gpus: 1`); `cpu`: none; "
        "`auto`: `gpu` when the Ray cluster has GPU resources (or an autoscaler may add them), "
        "else `cpu`. Resolved once, when the application is built.",
    )
    engine_env: dict[str, str] = Field(
        default_factory=dict, description="Extra environment variables for the model replica (engine)."
    )
    deployments: dict[DeploymentName, dict[str, Any]] = Field(
        default_factory=dict,
        description="Serve deployment options per deployment (`num_replicas`, `autoscaling_config`, "
        "`max_ongoing_requests`, `max_queued_requests`, `ray_actor_options`, …), deep-merged over "
        "each deployment class's defaults.",
    )

    @field_validator("engine_env")
    @classmethod
    def _env_strings(cls, v: dict[str, Any]) -> dict[str, str]:
        return {str(k): str(val) for k, val in v.items()}

    @model_validator(mode="after")
    def _limits_fit_context(self) -> ServiceConfig:
        if self.limits.max_tokens_cap >= self.engine.max_model_len:
            raise ValueError(
                f"limits.max_tokens_cap ({self.limits.max_tokens_cap}) must be below "
                f"engine.max_model_len ({self.engine.max_model_len})"
            )
        known = [self.model.model_id, *self.lora.adapters]
        for alias, target in self.model.aliases.items():
            if alias in known:
                raise ValueError(f"model.aliases: {alias!r} is already the name of a model or adapter")
            if target not in known:
                raise ValueError(
                    f"model.aliases: {alias!r} points at {target!r}, neither the model nor a "
                    f"configured adapter (lora.adapters): one of {known}"
                )
        for field, name in (
            ("classification.model", self.classification.model),
            ("model.default_model", self.model.default_model),
        ):
            if name is not None and name not in known and name not in self.model.aliases:
                raise ValueError(
                    f"{field} {name!r} is neither the model, a configured adapter "
                    f"(lora.adapters) nor an alias: one of {known + list(self.model.aliases)}"
                )
        return self


def resolve_path(p: str) -> str:
    """Relative paths are relative to the repo root, so `serve run` works from any cwd."""
    path = Path(os.path.expandvars(os.path.expanduser(p)))
    if not path.is_absolute():
        path = REPO_ROOT / path
    return str(path)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Return `base` with `override` merged in, the one merge of the code base (deployment
    options, KubeRay overrides, benchmark profiles): nested dicts merge, a `None` value deletes
    the key (what lies beneath applies again: a class default, or Serve's), anything else
    replaces. Neither input is modified."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
