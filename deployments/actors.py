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
  clients re-resolve the handle. (Rate-limit windows restart empty; stats are rebuilt from the
  recorders' cumulative counters.)
"""

from __future__ import annotations

import logging
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
    return True


def actor_failure_types() -> tuple[type[BaseException], ...]:
    """Exceptions meaning "the actor is gone or unreachable; re-resolve the handle"."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return (ActorDiedError, ActorUnavailableError, RayActorError)
