"""The vLLM engine behind the model replica: its arguments and environment, built from the
config (`args`), and its process's CPU priority (`process`). Tools (the benchmark, vLLM's own
server started for comparison) import these instead of reaching into a deployment."""

from deployments.engine.args import cpu_engine_env, engine_kwargs, server_flags
from deployments.engine.process import engine_core_pids, prioritise_engine

__all__ = ["cpu_engine_env", "engine_core_pids", "engine_kwargs", "prioritise_engine", "server_flags"]
