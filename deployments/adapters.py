"""LoRA adapters: the cluster-wide registry (name → path) and adapter validation.

Adapters declared in the config are registered at start; `POST /v1/load_lora_adapter` and
`/v1/unload_lora_adapter` (vLLM's shapes) change the registry at run time. Every ingress
replica asks the registry (one named actor, see `actors.py`) which adapter a request's
`model` names, so a load or unload through one ingress replica holds for all of them at once.
Each (re)load gets a new version: model replicas key their loaded adapters by
`name@version` (Serve model multiplexing), so a reloaded name never serves stale weights.

What a model replica loads (`check_adapter`, on its own node's filesystem): a runtime-loaded
adapter only from inside `lora.adapter_roots` after resolving symlinks and `..`, and every
adapter only as safetensors (pickled `adapter_model.bin`/`.pt` weights are refused). Messages
name the adapter as the client sent it, never a resolved or configured server path.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Sequence
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


WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
# Weight files vLLM would read with torch.load (a pickle, even with weights_only=True): refused.
PICKLED_WEIGHTS = ("adapter_model.bin", "adapter_model.pt")


def _bad_path(what: str, message: str, code: str = "invalid_lora_path") -> APIError:
    return APIError(400, f"{what} {message}", param="lora_path", code=code)


def _inside(path: str, root: str) -> bool:
    """`path` lies strictly inside `root` (both absolute and resolved): by path components, so
    `/models/adapters-evil` is not inside `/models/adapters`."""
    try:
        return path != root and os.path.commonpath([path, root]) == root
    except ValueError:
        return False


def resolve_adapter_roots(roots: Sequence[str]) -> list[str]:
    """The configured adapter roots (`lora.adapter_roots`; operator configuration, so
    `resolve_path` applies), each with its own symlinks resolved."""
    from deployments.config import resolve_path

    return [os.path.realpath(resolve_path(r)) for r in roots]


def adapter_in_roots(path: str, roots: Sequence[str], what: str) -> str:
    """`path` with symlinks and `..` resolved (`os.path.realpath`) if it lies inside one of the
    resolved `roots`, and so do the adapter's config and weight files (a symlinked file must not
    point out of the roots either); else APIError 400 `lora_path_not_allowed`. `what` names the
    adapter in messages as the client sent it: the roots and resolved paths are never shown."""
    if "\x00" in path:
        raise _bad_path(what, "is not a valid path.")
    real = os.path.realpath(path)
    if not any(_inside(real, root) for root in roots):
        raise _bad_path(
            what,
            "is outside the folders this service loads adapters from (lora.adapter_roots).",
            "lora_path_not_allowed",
        )
    for name in (CONFIG_FILE, WEIGHTS_FILE, *PICKLED_WEIGHTS):
        f = os.path.join(real, name)
        if os.path.lexists(f) and not any(_inside(os.path.realpath(f), root) for root in roots):
            raise _bad_path(
                what,
                f"has {name} pointing outside the folders this service loads adapters from (lora.adapter_roots).",
                "lora_path_not_allowed",
            )
    return real


def validate_adapter_dir(path: str, max_rank: int, what: str | None = None) -> dict[str, Any]:
    """Check that `path` holds a peft LoRA adapter vLLM can load with safetensors only; return
    its config. `what` names the adapter in messages (default: the path itself); messages never
    show another path, nor the text of an OS error (which would name the server's files).

    Raises APIError(400, param `lora_path`) with a clear message otherwise."""
    what = what or f"LoRA adapter path {path!r}"
    p = Path(path)
    if "\x00" in path:
        raise _bad_path(what, "is not a valid path.")
    if not p.is_dir():
        raise _bad_path(what, "is not a folder on the model replica's node.")
    cfg_file = p / CONFIG_FILE
    if not cfg_file.is_file():
        raise _bad_path(what, f"has no {CONFIG_FILE}: not a peft adapter.")
    pickled = [f for f in PICKLED_WEIGHTS if (p / f).exists()]
    if pickled:
        raise _bad_path(
            what,
            f"has pickled weights ({', '.join(pickled)}): only {WEIGHTS_FILE} adapters are "
            "loaded. Save it with safetensors (peft: save_pretrained(..., safe_serialization=True)) "
            "and remove the pickle.",
            "lora_weights_not_safetensors",
        )
    if not (p / WEIGHTS_FILE).is_file():
        raise _bad_path(what, f"has no {WEIGHTS_FILE} weights (only safetensors adapters are loaded).")
    try:
        cfg = json.loads(cfg_file.read_text())
    except OSError as exc:
        raise _bad_path(what, f"has an unreadable {CONFIG_FILE}: {exc.strerror or type(exc).__name__}.") from None
    except ValueError as exc:  # JSON errors name a line and column, no path
        raise _bad_path(what, f"has an unreadable {CONFIG_FILE}: {exc}") from None
    if not isinstance(cfg, dict):
        raise _bad_path(what, f"has an {CONFIG_FILE} that is not a JSON object.")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise _bad_path(what, f"is a {cfg.get('peft_type')} adapter; only LoRA is supported.")
    try:
        rank = int(cfg.get("r", 0) or 0)
    except (TypeError, ValueError):
        rank = 0
    if rank <= 0 or rank > max_rank:
        raise APIError(
            400,
            f"adapter rank {rank} is outside 1..{max_rank} (lora.max_lora_rank).",
            param="lora_path",
            code="invalid_lora_rank",
        )
    return cfg


def check_adapter(path: str, lora: Any, what: str, *, configured: bool = False) -> tuple[str, dict[str, Any]]:
    """The folder to hand vLLM and the adapter's config, on the model replica's node.

    A runtime-loaded adapter (`POST /v1/load_lora_adapter`) must lie inside `lora.adapter_roots`
    (resolved; the resolved folder is what vLLM then reads, so a symlink swapped later cannot
    redirect it); an adapter of `lora.adapters` (`configured`) is the operator's own and is read
    where it is. Both must be safetensors-only peft LoRA adapters (`validate_adapter_dir`)."""
    folder = path if configured else adapter_in_roots(path, resolve_adapter_roots(lora.adapter_roots), what)
    return folder, validate_adapter_dir(folder, lora.max_lora_rank, what)


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
                    get_or_create_actor, AdapterRegistryActor, self.name, self.namespace
                )
            try:
                return await asyncio.wait_for(getattr(self._handle, method).remote(*args), self.timeout_s)
            except actor_failure_types():
                self._handle = None
                if attempt:
                    raise
            except TimeoutError:
                raise APIError(
                    503,
                    "Adapter registry is briefly unavailable; retry.",
                    code="registry_unavailable",
                    headers={"Retry-After": "1"},
                ) from None

    async def register(self, name: str, path: str, replace: bool = True) -> AdapterRef | None:
        return await self._call("register", name, path, replace)

    async def unregister(self, name: str) -> bool:
        return await self._call("unregister", name)

    async def get(self, name: str) -> AdapterRef | None:
        return await self._call("get", name)

    async def list(self) -> list[AdapterRef]:
        return await self._call("list")
