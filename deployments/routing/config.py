"""The `routing` section: which request router the model deployment's handles use, and the
Serve `request_router_config` it becomes. A leaf (the service config imports it)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ROUTER_CLASS = "deployments.routing.router:CacheAffinityRouter"
RAY_PREFIX_ROUTER_CLASS = "ray.serve.llm.request_router:PrefixCacheAffinityRouter"

Policy = Literal["power_of_two", "cache_affinity", "ray_prefix"]


class RoutingConfig(BaseModel):
    """How the ingress picks among the model deployment's replicas (docs/performance.md,
    "Cache-aware routing"). With one replica every policy picks it."""

    model_config = ConfigDict(extra="forbid")

    policy: Policy = Field(
        "cache_affinity",
        description="`cache_affinity`: `deployments.routing.router.CacheAffinityRouter` — a request "
        "goes to the replica that was sent the longest prefix of its token ids where that prefix is "
        "its own (a conversation's earlier turn); else, with a session key (`prompt_cache_key`, else "
        "`user`), to the replica the key hashes to (the same in every ingress replica); else to the "
        "replicas that were sent its longest shared prefix (a system prompt); each only while that "
        "replica's queue is within `imbalance_threshold` of the least loaded one; adapters keep "
        "Serve's preference for replicas that hold them. `power_of_two`: Serve's default (two random replicas, the shorter queue). "
        "`ray_prefix`: Ray Serve LLM's `PrefixCacheAffinityRouter` as it is (a prefix tree in one "
        "shared actor, asked on every request).",
    )
    block_tokens: int = Field(
        64,
        ge=1,
        description="`cache_affinity`: prompt tokens per hashed block (the matching granularity; "
        "vLLM caches whole blocks of its own block size).",
    )
    max_blocks: int = Field(
        200_000,
        ge=1,
        description="`cache_affinity`: blocks the router remembers per ingress replica (least "
        "recently used first out; ~100 bytes each).",
    )
    imbalance_threshold: int = Field(
        2,
        ge=0,
        description="`cache_affinity` and `ray_prefix`: affinity holds while the preferred "
        "replica has at most this many more requests in flight than the least loaded candidate; "
        "above it the request goes by load alone (power of two).",
    )
    session_affinity: bool = Field(
        True,
        description="`cache_affinity`: route by the request's `prompt_cache_key` (else `user`) when "
        "it has one. false: by prefix alone.",
    )
    spill_when_full: bool = Field(
        False,
        description="`cache_affinity`: when the preferred replicas have no free slot, the request "
        "waits for one there while `imbalance_threshold` holds (its prefix cache kept: under load "
        "every replica is busy, so spilling scatters conversations), for at most as long as "
        "`prefill_tokens_per_s` says its cached prefix saves. true: it goes to a less loaded "
        "replica at once (a cache miss).",
    )
    prefill_tokens_per_s: float | None = Field(
        8000.0,
        gt=0,
        description="`cache_affinity`: the engine's prefill speed under load, in prompt tokens per "
        "second, which bounds the wait above: a request whose preferred replicas are full goes to a "
        "replica with fewer requests in flight once it has waited `cached tokens / speed` seconds "
        "(the prefill its cache hit would save). Each model replica measures its own from vLLM's "
        "counters and reports it in Serve's routing stats (every 10 s); this figure is used until "
        "then (2,000 cached tokens: 0.25 s at the default, about an 8B model's on one GPU under "
        "load). null: wait without bound.",
    )

    def request_router_config(self) -> dict[str, Any] | None:
        """The model deployment's Serve `request_router_config`; None: Serve's default."""
        if self.policy == "power_of_two":
            return None
        if self.policy == "ray_prefix":
            return {
                "request_router_class": RAY_PREFIX_ROUTER_CLASS,
                "request_router_kwargs": {"imbalanced_threshold": self.imbalance_threshold},
            }
        return {
            "request_router_class": ROUTER_CLASS,
            "request_router_kwargs": self.model_dump(exclude={"policy"}),
        }
