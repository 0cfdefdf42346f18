"""Get-or-create for the service's cluster-wide singleton actors (rate limiter, stats).

Every ingress and model replica calls :func:`get_or_create_actor` with the same name and
namespace; Ray's GCS makes ``get_if_exists=True`` atomic, so replicas that start together all
receive a handle to one actor.

Why these options:

* ``lifetime="detached"``: a non-detached actor fate-shares with the worker that created it —
  the first ingress replica. A scale-down, rolling update or crash of that one replica would
  kill the shared limiter/stats for every other replica. Detached actors live until the Ray
  cluster ends (``serve run`` stopping its local cluster, a KubeRay cluster being replaced) or
  until :func:`kill_actor`. An in-place redeploy of the app reuses the actor; new replicas push
  their configuration to it (``configure``).
* ``num_cpus=0``: bookkeeping only; it must never take a CPU a replica needs (2-core machines,
  GPU nodes whose CPUs are reserved for the engine).
* placed on the head node when one is known (soft affinity): worker nodes come and go with the
  autoscaler; the head node stays. Soft, so the actor still starts where there is no head
  label.
* ``max_restarts=-1``: if its process dies anyway, Ray restarts it under the same name; the
  clients re-resolve the handle. A restarted actor is a new process: Ray runs its constructor
  again with the *creator's* arguments, so whatever it learnt since (a later deploy's
  ``configure``, its windows, leases, counters) would be gone. The limiter and the stats
  aggregator therefore keep a snapshot of their state in Ray's GCS key-value store
  (:class:`ActorState`, written at most every second or two and at once on ``configure``) and
  a restarted incarnation (``was_current_actor_reconstructed``) loads it; a freshly created
  actor (first start, or after :func:`kill_actor`) starts empty and drops any old snapshot.
  Each incarnation has its own random id (:attr:`ActorState.incarnation`): ids it hands out
  (leases) carry it, so an id of a lost incarnation never matches a new one
  (docs/reliability.md). The adapter registry instead writes every change to the GCS store
  before answering and reads it back on any start, restart or not (`adapters.py`): adapters
  are configuration, not soft state.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("ray.serve")

DEFAULT_NAMESPACE = "llm_serve"


def _head_node_id() -> str | None:
    import ray

    try:
        for node in ray.nodes():
            if node.get("Alive") and "node:__internal_head__" in (node.get("Resources") or {}):
                return node["NodeID"]
    except Exception:  # GCS briefly unreachable: no affinity, still correct
        return None
    return None


def actor_options(name: str, namespace: str = DEFAULT_NAMESPACE, pin_to_head: bool = True) -> dict[str, Any]:
    """The ``.options()`` every creator uses for the singleton actor ``namespace/name``."""
    opts: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "get_if_exists": True,
        "lifetime": "detached",
        "num_cpus": 0,
        "max_restarts": -1,
        "max_concurrency": 1,  # methods run one at a time: check-and-consume is atomic
    }
    if pin_to_head:
        head = _head_node_id()
        if head is not None:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=head, soft=True)
    return opts


def get_or_create_actor(
    cls: type, name: str, namespace: str = DEFAULT_NAMESPACE, *args: Any, pin_to_head: bool = True, **kwargs: Any
):
    """Handle to the named actor ``namespace/name`` of class ``cls``, created if absent.

    Idempotent and safe to call concurrently from many replicas/processes. Constructor
    arguments only matter for the creator; use a ``configure`` method to update settings of an
    existing actor.
    """
    import ray

    return ray.remote(cls).options(**actor_options(name, namespace, pin_to_head)).remote(*args, **kwargs)


def kill_actor(name: str, namespace: str = DEFAULT_NAMESPACE) -> bool:
    """Remove the named actor for good (no restart). Returns False when there was none."""
    import ray

    try:
        handle = ray.get_actor(name, namespace=namespace)
    except ValueError:
        return False
    ray.kill(handle, no_restart=True)
    try:  # gone for good: so is its saved state (a new actor of that name starts empty anyway)
        from ray.experimental import internal_kv

        internal_kv._internal_kv_del(state_key(name, namespace), namespace=STATE_KV_NAMESPACE)
    except Exception as exc:
        logger.debug("state of %s/%s not removed: %s", namespace, name, exc)
    return True


def actor_failure_types() -> tuple[type[BaseException], ...]:
    """Exceptions meaning "the actor is gone or unreachable; re-resolve the handle"."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return (ActorDiedError, ActorUnavailableError, RayActorError)


# ----------------------------------------------------------------------------- state snapshots

STATE_KV_NAMESPACE = "llm_serve_state"


def state_key(name: str, namespace: str = DEFAULT_NAMESPACE) -> bytes:
    """The GCS KV key of the named actor's state snapshot (namespace ``STATE_KV_NAMESPACE``)."""
    return f"{namespace}/{name}".encode()


class ActorState:
    """A singleton actor's state snapshot in Ray's GCS key-value store (internal KV), which
    outlives the actor's process: Ray restarts the actor (``max_restarts=-1``), the new
    incarnation calls :meth:`load` in its constructor and gets what the last one saved.

    ``export`` (called under the actor's own lock, on the persister thread) returns a
    JSON-able snapshot, or None when nothing changed since the last one; :meth:`start` saves
    it every ``interval_s``. :meth:`save_now` saves at once (rare changes: ``configure``).

    Outside a Ray actor (the plain classes in unit tests) nothing is read or written.
    Written as JSON, never pickle: the store is readable by anything on the cluster, and a
    snapshot of another version must fail to load, not run code.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self.incarnation = uuid.uuid4().hex[:12]  # new on every (re)start of the process
        self.key: bytes | None = None
        self.reconstructed = False
        self.saved_at = 0.0
        self.saves = 0
        self.errors = 0
        self.interval_s: float | None = None  # between snapshots, once started
        self._stop = threading.Event()
        try:
            import ray

            if ray.is_initialized():
                ctx = ray.get_runtime_context()
                name = ctx.get_actor_name() if ctx.get_actor_id() else None
                if name:
                    self.key = state_key(name, ctx.namespace)
                    self.reconstructed = bool(ctx.was_current_actor_reconstructed)
        except Exception as exc:  # no runtime context: behave as a plain object
            logger.debug("actor state for %s off: %s", kind, exc)

    @property
    def enabled(self) -> bool:
        return self.key is not None

    def load(self) -> dict[str, Any] | None:
        """The last incarnation's snapshot when this process is a Ray restart of the actor;
        None (and an old snapshot removed) for a freshly created actor."""
        if self.key is None:
            return None
        from ray.experimental import internal_kv

        try:
            if not self.reconstructed:
                # first start, or a new actor after kill_actor: a snapshot of an earlier actor
                # of the same name is stale
                internal_kv._internal_kv_del(self.key, namespace=STATE_KV_NAMESPACE)
                return None
            raw = internal_kv._internal_kv_get(self.key, namespace=STATE_KV_NAMESPACE)
            if not raw:
                logger.warning("%s restarted without a saved state; starting empty", self.kind)
                return None
            state = json.loads(raw)
            logger.warning(
                "%s restarted (incarnation %s): state restored from the snapshot of %.1f s ago",
                self.kind,
                self.incarnation,
                time.time() - float(state.get("saved_at", 0)),
            )
            return state
        except Exception as exc:  # a corrupt or unreadable snapshot: start empty, say so
            self.errors += 1
            logger.warning("%s: saved state not restored (%s: %s)", self.kind, type(exc).__name__, exc)
            return None

    def save_now(self, snapshot: dict[str, Any] | None) -> bool:
        if self.key is None or snapshot is None:
            return False
        from ray.experimental import internal_kv

        try:
            now = time.time()
            blob = json.dumps({**snapshot, "saved_at": now, "incarnation": self.incarnation}, separators=(",", ":"))
            internal_kv._internal_kv_put(self.key, blob.encode(), overwrite=True, namespace=STATE_KV_NAMESPACE)
        except Exception as exc:  # GCS briefly away: the next tick tries again
            self.errors += 1
            logger.warning("%s: state snapshot not saved (%s: %s)", self.kind, type(exc).__name__, exc)
            return False
        self.saved_at, self.saves = now, self.saves + 1
        return True

    # A snapshot takes at most about this share of the actor's time: a state large enough that
    # exporting it takes longer than this share of `interval_s` is saved less often.
    SNAPSHOT_SHARE = 0.1

    def start(self, export: Callable[[], dict[str, Any] | None], interval_s: float) -> None:
        """Save ``export()`` every ``interval_s`` on a daemon thread (when it is not None), or
        less often when exporting and saving take more than `SNAPSHOT_SHARE` of the time (the
        export holds the actor's lock): the interval used is in `report()`."""
        if self.key is None:
            return
        self.interval_s = interval_s

        def loop() -> None:
            while not self._stop.wait(self.interval_s):
                t0 = time.monotonic()
                try:
                    snapshot = export()
                except Exception as exc:  # pragma: no cover - never kill the actor over a snapshot
                    logger.warning("%s: state export failed: %s", self.kind, exc)
                    continue
                self.save_now(snapshot)
                took = time.monotonic() - t0
                self.interval_s = max(interval_s, took * (1 - self.SNAPSHOT_SHARE) / self.SNAPSHOT_SHARE)

        threading.Thread(target=loop, name=f"{self.kind}-state", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def report(self) -> dict[str, Any]:
        """For tests and debugging: this incarnation and its snapshots."""
        return {
            "incarnation": self.incarnation,
            "reconstructed": self.reconstructed,
            "persisted": self.enabled,
            "saved_at": self.saved_at,
            "saves": self.saves,
            "errors": self.errors,
            "interval_s": self.interval_s,
        }
