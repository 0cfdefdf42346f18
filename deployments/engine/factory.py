"""The one engine factory: a vLLM `AsyncLLM` from the service config, as the model replica and
the batch classifier's workers both run it. The process environment is set first (the config's
`engine_env`, then on the CPU platform the CPU engine's settings where `engine_env` leaves them
unset), because vLLM reads it when the engine starts."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from deployments.config import ServiceConfig
from deployments.engine.args import cpu_engine_env, engine_kwargs


@dataclass
class StartedEngine:
    engine: Any  # vllm.v1.engine.async_llm.AsyncLLM
    args: Any  # its vllm.engine.arg_utils.AsyncEngineArgs
    on_cpu: bool
    start_s: float  # how long the engine took to start


def start_engine(config: ServiceConfig, num_cpus: float | None = None, stat_loggers: Any = None) -> StartedEngine:
    """Start the engine of `config` in this process (`num_cpus`: this process's CPU share, which
    sizes the CPU engine's threads; `stat_loggers`: vLLM's, None for its defaults)."""
    os.environ.update(config.engine_env)
    from vllm.platforms import current_platform

    on_cpu = current_platform.is_cpu()
    if on_cpu:
        for key, value in cpu_engine_env(config, num_cpus).items():
            os.environ.setdefault(key, value)  # engine_env, applied above, wins
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    args = AsyncEngineArgs(**engine_kwargs(config, on_cpu))
    t0 = time.monotonic()
    engine = AsyncLLM.from_engine_args(args, stat_loggers=stat_loggers)
    return StartedEngine(engine, args, on_cpu, time.monotonic() - t0)
