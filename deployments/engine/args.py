"""vLLM engine arguments (`AsyncEngineArgs` keyword arguments) and the CPU engine's environment,
both derived from a `ServiceConfig`: the model replica builds its engine from them, and the
benchmark gives vLLM's own server the very same."""

from __future__ import annotations

from typing import Any

from deployments.config import ServiceConfig


def engine_kwargs(config: ServiceConfig, on_cpu: bool) -> dict[str, Any]:
    """`AsyncEngineArgs(**engine_kwargs(config, on_cpu))` is the model replica's engine.

    On the CPU platform `gpu_memory_utilization` is the fraction of *host* memory vLLM reserves
    (`engine.cpu_memory_utilization`) and `enforce_eager` defaults to true."""
    e = config.engine
    kw: dict[str, Any] = {
        "model": config.model.resolved_source(),
        "tokenizer": config.model.resolved_tokenizer(),
        "served_model_name": config.model.model_id,
        "max_model_len": e.max_model_len,
        "dtype": e.dtype,
        "gpu_memory_utilization": e.cpu_memory_utilization if on_cpu else e.gpu_memory_utilization,
        "enforce_eager": on_cpu if e.enforce_eager is None else e.enforce_eager,
        "seed": e.seed,
        "disable_log_stats": False,
        "structured_outputs_config": dict(e.structured_outputs),
        "scheduling_policy": e.scheduling_policy,
    }
    for name in ("quantization", "enable_prefix_caching", "max_num_seqs"):
        if getattr(e, name) is not None:
            kw[name] = getattr(e, name)
    lora = config.lora
    if lora.engine_enabled():
        kw.update(enable_lora=True, max_lora_rank=lora.max_lora_rank, max_loras=lora.max_loras)
        if lora.max_cpu_loras is not None:
            kw["max_cpu_loras"] = lora.max_cpu_loras
    kw.update(e.extra)
    return kw


def cpu_engine_env(config: ServiceConfig, num_cpus: float | None) -> dict[str, str]:
    """The environment of the CPU engine (vLLM's CPU build) where `engine_env` is silent.

    - `VLLM_CPU_KVCACHE_SPACE`: `engine.cpu_kvcache_space_gib`.
    - `VLLM_ENABLE_V1_MULTIPROCESSING=0`: the model runs inside the engine-core process
      (uniproc executor) rather than in a worker process whose shared-memory queue the engine
      core busy-polls. Profiled on 2 cores: that polling held most of a core, taken from the
      Serve processes next to it (docs/performance.md); vLLM's own server gains from it too.
    - `OMP_NUM_THREADS`: the model replica's `num_cpus` (what Ray gives the actor anyway).
    """
    return {
        "VLLM_CPU_KVCACHE_SPACE": f"{config.engine.cpu_kvcache_space_gib:g}",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "OMP_NUM_THREADS": str(max(1, int(num_cpus or 1))),
    }


def server_flags(config: ServiceConfig) -> list[str]:
    """The flags that give vLLM's own OpenAI server (`python -m vllm.entrypoints.openai.api_server`)
    what our service adds around the same engine, for side-by-side runs: the configured LoRA
    adapters, the tool-call parser (`auto` tool choice) and the reasoning parser."""
    from deployments.config import resolve_path

    m, flags = config.model, []
    if config.lora.adapters:
        flags += ["--lora-modules", *(f"{name}={resolve_path(path)}" for name, path in config.lora.adapters.items())]
    if m.tool_call_parser:
        flags += ["--enable-auto-tool-choice", "--tool-call-parser", m.tool_call_parser]
    if m.reasoning_parser:
        flags += ["--reasoning-parser", m.reasoning_parser]
    return flags
