"""LoRA adapters: the cluster-wide registry (name → path) and adapter validation.

Adapters declared in the config are registered at start; `POST /v1/load_lora_adapter` and
`/v1/unload_lora_adapter` (vLLM's shapes) change the registry at run time. Every ingress
replica asks the registry (one named actor, see `actors.py`) which adapter a request's
`model` names, so a load or unload through one ingress replica holds for all of them at once.
Each (re)load gets a new version: model replicas key their loaded adapters by
`name@version` (Serve model multiplexing), so a reloaded name never serves stale weights.

The registry's state (every adapter, configured or loaded at run time, and its version counter)
lives in Ray's GCS key-value store, written before a change is answered: when Ray restarts the
actor (`max_restarts=-1`) it reads it back, so nothing is lost and versions never go backwards.
Ingress replicas answer names from a copy of it (`AdapterRegistry.lookup`), re-validated after
`lora.registry_cache_s` and at once for a name they do not know or after a change they made.
A registry that cannot be reached is a 503 with `Retry-After`, never a 500.

What a model replica loads is checked first (`adapter_paths.check_adapter`). The engine's LoRA
ids come from `LoraIds`, one per engine: an id never names two different adapters in one
engine's life.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import logging
import math
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

from deployments.actors import DEFAULT_NAMESPACE, actor_failure_types, get_or_create_actor
from deployments.adapter_paths import CONFIG_FILE
from deployments.api.errors import APIError

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class AdapterRef:
    name: str
    path: str
    version: int

    @property
    def multiplexed_id(self) -> str:
        return f"{self.name}@{self.version}"


class LoraIds:
    """vLLM LoRA int ids for one engine. vLLM takes an id it already knows as loaded (it keeps
    adapters by id, in its CPU cache too), so an id must never name two different adapters in
    one engine's life, whatever the registry's versions do. Each distinct adapter — (name,
    folder, registry version, identity of its files) — gets the next id; the same adapter again
    (e.g. after Serve's multiplexing LRU dropped it) gets its own id back. Ids are never reused."""

    def __init__(self) -> None:
        self._ids: dict[tuple[Any, ...], int] = {}
        self._last = 0

    def id_for(self, name: str, folder: str, version: int) -> int:
        key = (name, folder, version, files_identity(folder))
        if key not in self._ids:
            self._last += 1
            self._ids[key] = self._last
        return self._ids[key]


def files_identity(folder: str) -> tuple[tuple[str, int, int, int, int], ...]:
    """(name, size, mtime, inode, device) of the adapter's config and safetensors files: files
    rewritten in place are another adapter."""
    out = []
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return ()
    for name in names:
        if name == CONFIG_FILE or name.endswith(".safetensors"):
            try:
                st = os.stat(os.path.join(folder, name))
            except OSError:
                continue
            out.append((name, st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev))
    return tuple(out)


class AdapterRegistryActor:
    """name → (path, version). One per app, shared by all replicas.

    Its state — the adapters and the version counter — is kept in Ray's GCS key-value store
    under `store_key` (`ray.experimental.internal_kv`, namespace `namespace`): written before a
    change is answered, read back when the actor starts. A restart by Ray (same constructor
    arguments) therefore comes back with every adapter, configured or loaded at run time, and
    a counter that never goes backwards. The GCS outlives every actor and replica; it goes
    with the Ray cluster (and survives a GCS restart where GCS fault tolerance is on).
    `version` doubles as the registry's epoch: every change raises it, so a client's copy
    (`snapshot`) is current exactly when its (lineage, version) is the registry's."""

    def __init__(self, store_key: str | None = None, namespace: str = DEFAULT_NAMESPACE):
        self._store_key, self._store_ns = store_key, namespace
        self._calls: dict[str, int] = {}  # method -> calls answered by this incarnation
        self._adapters: dict[str, AdapterRef] = {}
        self._version = 0
        self._lineage = uuid.uuid4().hex  # a new registry (no stored state): clients drop their copies
        state = self._load()
        if state is not None:
            self._lineage = str(state["lineage"])
            self._version = int(state["version"])
            self._adapters = {n: AdapterRef(n, str(p), int(v)) for n, (p, v) in state["adapters"].items()}
        else:
            self._save(self._adapters, self._version)

    # ------------------------------------------------------------------ the store

    def _load(self) -> dict[str, Any] | None:
        if not self._store_key:
            return None
        from ray.experimental import internal_kv

        raw = internal_kv._internal_kv_get(self._store_key, namespace=self._store_ns)
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:  # never written by us: start afresh (a new lineage) rather than crash-loop
            logger.error("adapter registry %s: stored state unreadable; starting empty", self._store_key)
            return None

    def _save(self, adapters: dict[str, AdapterRef], version: int) -> None:
        """Write the state; raises (and nothing changes) if the GCS does not take it."""
        if not self._store_key:
            return
        from ray.experimental import internal_kv

        doc = {
            "lineage": self._lineage,
            "version": version,
            "adapters": {a.name: [a.path, a.version] for a in adapters.values()},
        }
        internal_kv._internal_kv_put(self._store_key, json.dumps(doc), True, namespace=self._store_ns)

    def _commit(self, adapters: dict[str, AdapterRef], version: int) -> None:
        self._save(adapters, version)
        self._adapters, self._version = adapters, version

    # ------------------------------------------------------------------ the API

    def _count(self, method: str) -> None:
        self._calls[method] = self._calls.get(method, 0) + 1

    def calls(self) -> dict[str, int]:
        """Calls answered per method since this incarnation started (how often replicas ask)."""
        return dict(self._calls)

    def register(self, name: str, path: str, replace: bool = True) -> AdapterRef | None:
        """Add (or with `replace`, re-point) an adapter; None if it exists and not `replace`."""
        self._count("register")
        old = self._adapters.get(name)
        if old is not None and (not replace or old.path == path):
            return old if old.path == path else None
        ref = AdapterRef(name, path, self._version + 1)
        self._commit({**self._adapters, name: ref}, ref.version)
        return ref

    def unregister(self, name: str) -> bool:
        self._count("unregister")
        if name not in self._adapters:
            return False
        self._commit({n: a for n, a in self._adapters.items() if n != name}, self._version + 1)
        return True

    def get(self, name: str) -> AdapterRef | None:
        self._count("get")
        return self._adapters.get(name)

    def list(self) -> list[AdapterRef]:
        self._count("list")
        return self._sorted()

    def _sorted(self) -> builtins.list[AdapterRef]:
        return sorted(self._adapters.values(), key=lambda a: a.name)

    def snapshot(
        self, known: tuple[str, int] | None = None
    ) -> tuple[tuple[str, int], builtins.list[AdapterRef] | None]:  # `list`: the method above
        """((lineage, version), every adapter) — or None for the adapters when `known` is
        already the current (lineage, version): nothing changed."""
        self._count("snapshot")
        stamp = (self._lineage, self._version)
        return stamp, (None if known is not None and tuple(known) == stamp else self._sorted())


def registry_unavailable(retry_after_s: float = 1.0) -> APIError:
    return APIError(
        503,
        "The adapter registry is briefly unavailable; retry.",
        code="registry_unavailable",
        headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))},
    )


class AdapterRegistry:
    """Client held by ingress and model replicas (re-resolves the actor if it restarted).

    `get`, `list`, `register` and `unregister` ask the actor. `lookup` — the request path: every
    request naming an adapter, and every model-less one when the default model is an adapter —
    answers from this replica's copy of the registry while it is younger than `cache_s`, so the
    hot path makes no actor call; it re-validates (one `snapshot` call, shared by the requests
    waiting for it) when the copy is older, at once for a name the copy lacks (a load through
    another ingress replica is seen by the next request), and at once after a change made
    through this client. Other replicas' unloads and replacements are seen within `cache_s`.
    While the registry cannot be reached, names the copy holds are answered from it for
    `stale_s` (adapters cannot change meanwhile: the registry is where they change); anything
    else is a 503 with `Retry-After`."""

    def __init__(
        self,
        app_name: str,
        namespace: str = DEFAULT_NAMESPACE,
        timeout_s: float = 5.0,
        cache_s: float = 1.0,
        stale_s: float = 30.0,
    ):
        self.name = f"adapters.{app_name}"
        self.namespace = namespace
        self.timeout_s = timeout_s
        self.cache_s, self.stale_s = cache_s, stale_s
        self._handle: Any = None  # the Ray actor handle, once resolved
        self._refs: dict[str, AdapterRef] | None = None  # the copy
        self._stamp: tuple[str, int] | None = None  # its (lineage, version)
        self._checked_at = -math.inf  # when the fetch that last confirmed the copy started
        self._changed_at = -math.inf  # last change through this client: older fetches do not count
        self._fetch: tuple[float, asyncio.Future] | None = None  # the fetch in flight, with its start
        self.rpcs = 0  # actor calls made (figures, tests)

    async def _call(self, method: str, *args):
        for attempt in (0, 1):
            try:
                if self._handle is None:
                    self._handle = await asyncio.wait_for(
                        asyncio.to_thread(
                            get_or_create_actor,
                            AdapterRegistryActor,
                            self.name,
                            self.namespace,
                            self.name,
                            self.namespace,
                        ),
                        self.timeout_s,
                    )
                self.rpcs += 1
                return await asyncio.wait_for(getattr(self._handle, method).remote(*args), self.timeout_s)
            except actor_failure_types() as exc:
                self._handle = None
                if attempt:
                    logger.warning("adapter registry %s unavailable: %s", self.name, type(exc).__name__)
                    raise registry_unavailable() from None
            except TimeoutError:
                raise registry_unavailable() from None
            except Exception as exc:  # the GCS refused the write, a handle that cannot be made, …
                self._handle = None
                logger.warning("adapter registry %s call %s failed: %r", self.name, method, exc)
                raise registry_unavailable() from None

    async def register(self, name: str, path: str, replace: bool = True) -> AdapterRef | None:
        try:
            return await self._call("register", name, path, replace)
        finally:
            self._changed()

    async def unregister(self, name: str) -> bool:
        try:
            return await self._call("unregister", name)
        finally:
            self._changed()

    async def get(self, name: str) -> AdapterRef | None:
        return await self._call("get", name)

    async def list(self) -> list[AdapterRef]:
        return await self._call("list")

    # ------------------------------------------------------------------ the cached copy

    def _changed(self) -> None:
        self._changed_at = time.monotonic()
        self._checked_at = -math.inf

    async def lookup(self, name: str) -> AdapterRef | None:
        """The adapter `name`, or None when the registry has none by that name (see the class)."""
        t0 = time.monotonic()
        while True:
            refs = self._refs
            if refs is not None:
                if self._checked_at >= t0:  # confirmed by a fetch started after this lookup
                    return refs.get(name)
                if name in refs and time.monotonic() - self._checked_at < self.cache_s:
                    return refs[name]
            try:
                await self._revalidate()
            except APIError:
                if refs is not None and name in refs and time.monotonic() - self._checked_at < self.stale_s:
                    return refs[name]  # the registry is unreachable: its last answer, for a while
                raise

    async def _revalidate(self) -> None:
        """Wait for a fetch of the registry's state: the one in flight, else a new one (a fetch
        that has finished counts as none, even before its done-callback has run: awaiting it
        again would not yield, and a lookup that still misses would spin)."""
        if self._fetch is None or self._fetch[1].done():
            started = time.monotonic()
            fut = asyncio.ensure_future(self._fetch_snapshot(started))
            self._fetch = (started, fut)
            fut.add_done_callback(self._fetch_done)
        await asyncio.shield(self._fetch[1])

    def _fetch_done(self, fut: asyncio.Future) -> None:
        if self._fetch is not None and self._fetch[1] is fut:
            self._fetch = None
        if not fut.cancelled():
            fut.exception()  # retrieved here: a failed fetch nobody awaits any more is no warning

    async def _fetch_snapshot(self, started: float) -> None:
        stamp, refs = await self._call("snapshot", self._stamp)
        stamp = tuple(stamp)
        if refs is not None:
            current = self._stamp
            # a slower, older fetch must not replace a newer copy (versions only go up)
            if current is None or current[0] != stamp[0] or stamp[1] >= current[1]:
                self._refs, self._stamp = {r.name: r for r in refs}, stamp
        elif stamp != self._stamp:
            return  # "unchanged" against a stamp that has moved on since: no news
        if started >= self._changed_at:
            self._checked_at = max(self._checked_at, started)
