"""The GPU memory of the devices a model replica holds, read with NVML: /health's `gpu` (the
replaced service's `{"allocated_gb", "reserved_gb", "free_gb"}`).

NVML comes from `pynvml` (nvidia-ml-py) when installed, else the copy vLLM ships
(`vllm.third_party.pynvml`): no extra dependency. NVML sees the whole device, whichever process
holds the memory, so the figures include vLLM's engine process (where the weights and KV cache
live, outside the replica's own process) — unlike `torch.cuda.memory_allocated()` in the
replica. vLLM reserves its share of the device when the engine starts, so "allocated" and
"reserved" are both the device memory in use. Summed over the replica's devices
(`CUDA_VISIBLE_DEVICES`, set by Ray); None without a GPU or without NVML.
"""

from __future__ import annotations

import os
from typing import Any

GIB = 1024**3


def _nvml():
    try:
        import pynvml  # nvidia-ml-py, when installed
    except ImportError:
        import vllm.third_party.pynvml as pynvml  # vendored by vLLM
    return pynvml


def _handles(nvml, visible: str | None) -> list[Any]:
    """NVML handles of the devices `CUDA_VISIBLE_DEVICES` names (indices or `GPU-` UUIDs;
    unset: every device). MIG instances are skipped: NVML reports them on their parent."""
    if visible is None:
        return [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
    out = []
    for entry in (e.strip() for e in visible.split(",")):
        if entry.isdigit():
            out.append(nvml.nvmlDeviceGetHandleByIndex(int(entry)))
        elif entry.startswith("GPU-"):
            out.append(nvml.nvmlDeviceGetHandleByUUID(entry))
    return out


def gpu_memory_gb(on_cpu: bool, visible: str | None = None) -> dict[str, float] | None:
    """`{"allocated_gb", "reserved_gb", "free_gb", "total_gb", "devices"}` over the replica's
    GPUs; None on the CPU platform, without NVML or without a device."""
    if on_cpu:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    try:
        nvml = _nvml()
        nvml.nvmlInit()
    except Exception:  # no NVML library / driver
        return None
    try:
        infos = [nvml.nvmlDeviceGetMemoryInfo(h) for h in _handles(nvml, visible)]
    except Exception:
        return None
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass
    if not infos:
        return None
    used = sum(i.used for i in infos) / GIB
    return {
        "allocated_gb": round(used, 3),
        "reserved_gb": round(used, 3),
        "free_gb": round(sum(i.free for i in infos) / GIB, 3),
        "total_gb": round(sum(i.total for i in infos) / GIB, 3),
        "devices": len(infos),
    }


class GpuUsage:
    """Memory in use, total memory (bytes) and utilization (0-1) of the replica's devices, read
    with NVML for the per-replica metrics (`llm_gpu_*`). NVML is initialised once, on the first
    read, and kept (a read is then microseconds); `read()` is None on the CPU platform, without
    NVML or a device, and after the first failure it stops trying."""

    def __init__(self, on_cpu: bool, visible: str | None = None):
        self._nvml: Any = None  # the NVML module, once loaded
        self._handles: list[Any] | None = None if not on_cpu else []
        self._visible = visible

    def read(self) -> dict[str, float] | None:
        if self._handles is None:  # first read
            try:
                self._nvml = _nvml()
                self._nvml.nvmlInit()
                visible = os.environ.get("CUDA_VISIBLE_DEVICES") if self._visible is None else self._visible
                self._handles = _handles(self._nvml, visible)
            except Exception:
                self._handles = []
        if not self._handles:
            return None
        try:
            mem = [self._nvml.nvmlDeviceGetMemoryInfo(h) for h in self._handles]
            util = [self._nvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self._handles]
        except Exception:
            self._handles = []
            return None
        return {
            "gpu_memory_used_bytes": float(sum(m.used for m in mem)),
            "gpu_memory_total_bytes": float(sum(m.total for m in mem)),
            "gpu_utilization": sum(util) / len(util) / 100.0,
        }
