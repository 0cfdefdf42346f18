"""LoRA adapters: the cluster-wide registry (name → path) and adapter validation.

Adapters declared in the config are registered at start; `POST /v1/load_lora_adapter` and
`/v1/unload_lora_adapter` (vLLM's shapes) change the registry at run time. Every ingress
replica asks the registry (one named actor, see `actors.py`) which adapter a request's
`model` names, so a load or unload through one ingress replica holds for all of them at once.
Each (re)load gets a new version: model replicas key their loaded adapters by
`name@version` (Serve model multiplexing), so a reloaded name never serves stale weights.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deployments.actors import DEFAULT_NAMESPACE, actor_failure_types, get_or_create_actor
from deployments.api.errors import APIError


@dataclass(frozen=True)
class AdapterRef:
    name: str
    path: str
    version: int

    @property
    def multiplexed_id(self) -> str:
        return f"{self.name}@{self.version}"


def validate_adapter_dir(path: str, max_rank: int) -> dict[str, Any]:
    """Check that `path` holds a peft LoRA adapter vLLM can load; return its config.

    Raises APIError(400) with a clear message otherwise."""
    p = Path(path)
    if not p.is_dir():
        raise APIError(400, f"LoRA adapter path {path!r} is not a folder on the model replica's node.",
                       param="lora_path", code="invalid_lora_path")
    cfg_file = p / "adapter_config.json"
    if not cfg_file.is_file():
        raise APIError(400, f"{path!r} has no adapter_config.json: not a peft adapter.",
                       param="lora_path", code="invalid_lora_path")
    if not any((p / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
        raise APIError(400, f"{path!r} has no adapter_model.safetensors/.bin weights.",
                       param="lora_path", code="invalid_lora_path")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as exc:
        raise APIError(400, f"adapter_config.json in {path!r} is unreadable: {exc}",
                       param="lora_path", code="invalid_lora_path") from None
    rank = int(cfg.get("r", 0) or 0)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise APIError(400, f"{path!r} is a {cfg.get('peft_type')} adapter; only LoRA is supported.",
                       param="lora_path", code="invalid_lora_path")
    if rank <= 0 or rank > max_rank:
        raise APIError(400, f"adapter rank {rank} is outside 1..{max_rank} (lora.max_lora_rank).",
                       param="lora_path", code="invalid_lora_rank")
    return cfg


class AdapterRegistryActor:
    """name → (path, version). One per app, shared by all replicas."""

    def __init__(self):
        self._adapters: dict[str, AdapterRef] = {}
        self._version = 0

    def register(self, name: str, path: str, replace: bool = True) -> AdapterRef | None:
        """Add (or with `replace`, re-point) an adapter; None if it exists and not `replace`."""
        old = self._adapters.get(name)
        if old is not None and (not replace or old.path == path):
            return old if old.path == path else None
        self._version += 1
        ref = AdapterRef(name, path, self._version)
        self._adapters[name] = ref
        return ref

    def unregister(self, name: str) -> bool:
        return self._adapters.pop(name, None) is not None

    def get(self, name: str) -> AdapterRef | None:
        return self._adapters.get(name)

    def list(self) -> list[AdapterRef]:
        return sorted(self._adapters.values(), key=lambda a: a.name)


class AdapterRegistry:
    """Client held by ingress and model replicas (re-resolves the actor if it restarted)."""

    def __init__(self, app_name: str, namespace: str = DEFAULT_NAMESPACE, timeout_s: float = 5.0):
        self.name = f"adapters.{app_name}"
        self.namespace = namespace
        self.timeout_s = timeout_s
        self._handle = None

    async def _call(self, method: str, *args):
        for attempt in (0, 1):
            if self._handle is None:
                self._handle = await asyncio.to_thread(
                    get_or_create_actor, AdapterRegistryActor, self.name, self.namespace)
            try:
                return await asyncio.wait_for(getattr(self._handle, method).remote(*args), self.timeout_s)
            except actor_failure_types():
                self._handle = None
                if attempt:
                    raise
            except (asyncio.TimeoutError, TimeoutError):
                raise APIError(503, "Adapter registry is briefly unavailable; retry.",
                               code="registry_unavailable", headers={"Retry-After": "1"}) from None

    async def register(self, name: str, path: str, replace: bool = True) -> AdapterRef | None:
        return await self._call("register", name, path, replace)

    async def unregister(self, name: str) -> bool:
        return await self._call("unregister", name)

    async def get(self, name: str) -> AdapterRef | None:
        return await self._call("get", name)

    async def list(self) -> list[AdapterRef]:
        return await self._call("list")
