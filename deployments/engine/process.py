"""vLLM's engine-core process: finding it under the model replica, and giving it the CPU first."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

logger = logging.getLogger("ray.serve")


def engine_core_pids(replica_pid: int) -> list[int]:
    """vLLM's EngineCore process(es): the replica process's descendants of that name."""
    import psutil

    out = []
    for child in psutil.Process(replica_pid).children(recursive=True):
        try:
            text = child.name() + " " + " ".join(child.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "EngineCore" in text:
            out.append(child.pid)
    return out


def prioritise_engine(replica_pid: int, niceness: int | None) -> dict[str, Any]:
    """Give vLLM's engine-core process(es), children of this replica, CPU niceness `niceness`
    (every thread: Linux niceness is per thread). Measured on 2 cores at 32 concurrent
    streams: +6 to +14 % output tokens/s, the engine no longer waiting behind Serve's
    processes (docs/performance.md). What happened is reported on /health."""
    pids = engine_core_pids(replica_pid)
    report: dict[str, Any] = {"engine_pids": pids, "niceness": None, "requested": niceness, "error": None}
    if niceness is not None:
        for pid in pids:
            try:
                for tid in os.listdir(f"/proc/{pid}/task"):
                    os.setpriority(os.PRIO_PROCESS, int(tid), niceness)
            except OSError as exc:  # EPERM/EACCES without CAP_SYS_NICE; ESRCH/ENOENT: process gone
                hint = " (lowering niceness needs CAP_SYS_NICE)" if isinstance(exc, PermissionError) else ""
                report["error"] = f"{type(exc).__name__}: {exc}{hint}"
                logger.warning("engine niceness %s not applied to pid %s: %s", niceness, pid, report["error"])
                break
    if pids:
        report["niceness"] = os.getpriority(os.PRIO_PROCESS, pids[0])
    return report


def shutdown_engine(owner: Any) -> None:
    """`owner.engine.shutdown()` if it has one, never raising (from `__del__` of an object that
    holds an `AsyncLLM`: the model replica, a batch worker)."""
    engine = getattr(owner, "engine", None)
    if engine is not None:
        try:
            engine.shutdown()
        except Exception:
            pass


ENGINE_DEATH_EXIT_DELAY_S = 1.0
_exit_scheduled = False


def exit_on_engine_death(reason: str, delay_s: float = ENGINE_DEATH_EXIT_DELAY_S) -> None:
    """The engine core of this process died: end the process `delay_s` from now (once, however
    often called), as vLLM's own server exits on engine death. vLLM cannot start a new engine
    core inside a live `AsyncLLM`, so the replica is useless from here on; a Ray actor that died
    is replaced on the Serve controller's next pass, whereas a live replica failing its health
    check waits three failed checks and a graceful drain (up to `graceful_shutdown_timeout_s`)
    while its router keeps sending it requests — under load on CI that took 140 s. The delay
    lets the answers already given (503 `engine_unavailable`, a stream's error event) go out;
    what reaches the replica after it is answered by the ingress as `engine_unavailable` too.
    Must be called on the replica's event loop."""
    global _exit_scheduled
    if _exit_scheduled:
        return
    _exit_scheduled = True
    logger.error("the engine core died (%s): this replica exits in %.1f s so that Serve replaces it", reason, delay_s)
    asyncio.get_running_loop().call_later(delay_s, _exit_now)


def _exit_now() -> None:
    for log in (logger, logging.getLogger()):  # os._exit skips the handlers' own flush
        for handler in log.handlers:
            try:
                handler.flush()
            except Exception:
                pass
    os._exit(1)
