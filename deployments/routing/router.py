"""`CacheAffinityRouter`: the model deployment's request router for `routing.policy:
cache_affinity` (Serve's request-router API; it runs in each ingress replica, inside the
handle that calls the model deployment).

For a generation request (`GenerationRequest`, the first argument of `generate` and
`generate_stream`) it prefers, in this order:

1. the adapter: Serve's multiplex preference (replicas that hold the request's adapter, then
   those with the fewest adapters) narrows the candidates first, as Serve's default router does;
2. the conversation: the candidates that were sent the longest prefix of the request's token
   blocks (`blocks.PrefixTable`, this ingress replica's own record of what it sent where), where
   that prefix reaches past what other prompts share — the replica that served the
   conversation's previous turn, whose cache holds the most of it;
3. the session: otherwise (nothing matches, or only a prefix other prompts share too, such as a
   system prompt), a request with a session key (`prompt_cache_key`, else `user`) goes to the
   candidate the key hashes highest with (rendezvous hashing: every ingress replica computes the
   same answer without sharing anything — a conversation's turns that reach an ingress replica
   which has not seen it yet land where its first turn did — and a replica that comes or goes
   moves only its own share of sessions);
4. the shared prefix: a request without a session key goes to the candidates that were sent the
   longest prefix of it at all (a system prompt's cache), the least loaded of them;
5. the load: with no preference, or when the preferred replicas have more than
   `imbalance_threshold` requests in flight beyond the least loaded candidate, two random
   candidates and the shorter queue (Serve's power of two).

Serve then sends the request to the least loaded replica of the first rank that has room, else
of the next rank, and backs off when all are full, as it does by default. The next rank: with
`spill_when_full`, the load-based pair at once; by default, the candidates with fewer requests
in flight than the preferred replica, once the request has waited as long as its cached prefix
would save (cached tokens / the preferred replica's measured prefill speed, which each model
replica reports in Serve's routing stats, `prefill.py`; `prefill_tokens_per_s` until then).
Waiting for a slot there pays only while it costs less than the prefill it avoids, so a request
whose cache is small, or whose preferred replica stays full behind long generations, starts
elsewhere instead; under saturation, with no replica less loaded, it keeps waiting (a miss would
not start it sooner).
The choice is a hint for the engine's prefix cache only: any replica answers any request the
same way, so a wrong guess costs a cache miss, never a wrong answer.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections import Counter
from typing import Any

from ray.serve.request_router import (
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from deployments.routing.blocks import PrefixTable, block_hashes
from deployments.routing.prefill import STAT as PREFILL_STAT


def rendezvous_score(key: str, replica: str) -> int:
    """The same in every process (no per-process salt, unlike `hash(str)`)."""
    return int.from_bytes(hashlib.blake2b(f"{key}\0{replica}".encode(), digest_size=8).digest(), "big")


class CacheAffinityRouter(MultiplexMixin, RequestRouter):
    """No `FIFOMixin` (Serve's default router has it, Ray Serve LLM's prefix router does not):
    with it, a replica found for one request is handed to the oldest request waiting, so once
    requests queue (every replica busy, the normal state under load) each choice serves some
    other request's prefix and affinity is lost. Without it, the replica chosen for a request
    is that request's (Serve's exact match on the internal request id); the ingress's own
    capacity gate keeps arrival order and priorities before this router sees a request."""

    def initialize_state(
        self,
        block_tokens: int = 64,
        max_blocks: int = 200_000,
        imbalance_threshold: int = 2,
        session_affinity: bool = True,
        spill_when_full: bool = False,
        prefill_tokens_per_s: float | None = 8000.0,
        **_: Any,
    ) -> None:
        self.block_tokens = block_tokens
        self.imbalance_threshold = imbalance_threshold
        self.session_affinity = session_affinity
        self.spill_when_full = spill_when_full
        self.prefill_tokens_per_s = prefill_tokens_per_s
        self.table = PrefixTable(max_blocks)
        self.decisions: Counter[str] = Counter()  # session / prefix / load / imbalanced
        self.cpu_ns = 0  # time spent in choose_replicas + on_request_routed (thread CPU)
        self._hashes: dict[str, list[int]] = {}  # internal request id → its block hashes, until routed

    # ------------------------------------------------------------------ choosing

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        t0 = time.thread_time_ns()
        try:
            return self._choose(candidate_replicas, pending_request)
        finally:
            self.cpu_ns += time.thread_time_ns() - t0

    def _choose(self, candidates: list[RunningReplica], pending: PendingRequest | None) -> list[list[RunningReplica]]:
        if pending is not None and pending.metadata.multiplexed_model_id:
            ids = self.apply_multiplex_routing(pending_request=pending)  # sets should_backoff itself
            candidates = [self._replicas[i] for i in ids if i in self._replicas]
        elif pending is not None:
            pending.routing_context.should_backoff = True  # every replica is a candidate at once
        if not candidates:
            return []
        by_load = self._two_random(candidates)
        req = _generation_request(pending)
        if req is None:
            return [by_load]
        preferred, kind, cached = self._preferred(req, pending, candidates)
        if not preferred:
            self.decisions["load"] += 1
            return [by_load]
        if self._imbalanced(preferred, candidates):
            self.decisions["imbalanced"] += 1
            return [by_load]
        self.decisions[kind] += 1
        if self.spill_when_full:
            rest = [r for r in by_load if r not in preferred]
        elif self._waited_enough(pending, preferred, cached):
            rest = self._less_loaded(preferred, candidates)
        else:
            rest = []
        return [preferred, rest] if rest else [preferred]

    def _preferred(
        self, req: Any, pending: PendingRequest | None, candidates: list[RunningReplica]
    ) -> tuple[list[RunningReplica], str, int]:
        """The replicas that were sent the longest prefix of the request, where that prefix
        reaches past what other prompts share (a conversation's own history); else the session
        key's replica; else those that were sent the longest prefix at all (a shared system
        prompt), or none (by load). With the kind of choice and the prompt tokens the chosen
        replicas were sent before (what their cache may hold)."""
        hashes = self._request_hashes(req, pending)
        ids = [r.replica_id.unique_id for r in candidates]
        everyone = self.table.mask(ids)
        depth, holders = self.table.match(hashes, everyone) if hashes else (0, 0)
        held = set(self.table.replicas(holders)) if depth else set()
        own = [r for r in candidates if r.replica_id.unique_id in held]
        cached = depth * self.block_tokens
        if depth > self.table.shared(hashes, depth) and holders != everyone:
            return own, "prefix", cached
        session = getattr(req, "session", None) if self.session_affinity else None
        if session:
            chosen = max(candidates, key=lambda r: rendezvous_score(session, r.replica_id.unique_id))
            return [chosen], "session", cached if chosen in own else 0
        return (own, "prefix", cached) if depth else ([], "load", 0)

    def _waited_enough(
        self, pending: PendingRequest | None, preferred: list[RunningReplica], cached_tokens: int
    ) -> bool:
        """The request has waited for its preferred replicas at least as long as a prefill of
        its cached tokens would take there: at their own measured prefill speed (their routing
        stats, routing/prefill.py), else `prefill_tokens_per_s` (None: it waits without bound)."""
        if self.prefill_tokens_per_s is None:
            return False
        waited = time.time() - pending.created_at if pending is not None else 0.0
        measured = [s for r in preferred if (s := (r.routing_stats or {}).get(PREFILL_STAT))]
        speed = sum(measured) / len(measured) if measured else self.prefill_tokens_per_s
        return waited >= cached_tokens / speed

    def _less_loaded(self, preferred: list[RunningReplica], candidates: list[RunningReplica]) -> list[RunningReplica]:
        """The other candidates with fewer requests in flight than every preferred replica,
        least loaded first, then those whose length is not known (none sent to them for Serve's
        cache timeout: Serve probes them, and the answer decides the next time)."""
        mine = self._shortest_known_queue(preferred)
        if mine is None:
            return []
        cache = self._replica_queue_len_cache
        others = [(cache.get(r.replica_id), r) for r in candidates if r not in preferred]
        fewer = sorted(((q, r) for q, r in others if q is not None and q < mine), key=lambda x: x[0])
        return [r for _, r in fewer] + [r for q, r in others if q is None]

    def _imbalanced(self, preferred: list[RunningReplica], candidates: list[RunningReplica]) -> bool:
        """The preferred replicas' shortest known queue is more than `imbalance_threshold` above
        the shortest known queue of all candidates (unknown lengths: no evidence of imbalance)."""
        least, mine = self._shortest_known_queue(candidates), self._shortest_known_queue(preferred)
        return least is not None and mine is not None and mine - least > self.imbalance_threshold

    def _shortest_known_queue(self, replicas: list[RunningReplica]) -> int | None:
        """The fewest requests in flight among `replicas` in Serve's queue-length cache; None if
        it knows none of them."""
        cache = self._replica_queue_len_cache
        return min((q for r in replicas if (q := cache.get(r.replica_id)) is not None), default=None)

    @staticmethod
    def _two_random(candidates: list[RunningReplica]) -> list[RunningReplica]:
        return random.sample(candidates, 2) if len(candidates) > 2 else list(candidates)

    def _request_hashes(self, req: Any, pending: PendingRequest | None) -> list[int]:
        key = pending.metadata.internal_request_id if pending is not None else None
        hashes = self._hashes.get(key) if key is not None else None
        if hashes is None:
            hashes = block_hashes(req.prompt_token_ids, self.block_tokens)
            if key is not None:
                if len(self._hashes) > 10_000:  # requests cancelled before routing leave theirs
                    self._hashes.clear()
                self._hashes[key] = hashes
        return hashes

    # ------------------------------------------------------------------ learning

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        """Record the request's blocks as sent to `replica_id` (its engine will cache them)."""
        t0 = time.thread_time_ns()
        req = _generation_request(pending_request)
        if req is not None:
            hashes = self._hashes.pop(pending_request.metadata.internal_request_id, None)
            if hashes is None:
                hashes = block_hashes(req.prompt_token_ids, self.block_tokens)
            self.table.insert(hashes, replica_id.unique_id)
        self.cpu_ns += time.thread_time_ns() - t0

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        """A replica that left takes its cache with it: forget what was sent to it."""
        before = {r.unique_id for r in self._replica_id_set}
        super().update_replicas(replicas)
        for gone in before - {r.unique_id for r in self._replica_id_set}:
            self.table.remove(gone)

    def stats(self) -> dict[str, Any]:
        routed = sum(self.decisions.values())
        return {
            "decisions": dict(self.decisions),
            "table_blocks": len(self.table),
            "cpu_us_per_request": round(self.cpu_ns / 1000 / routed, 2) if routed else None,
        }


def _generation_request(pending: PendingRequest | None) -> Any:
    """The request's `GenerationRequest` (generate / generate_stream), else None (classify,
    health and the other calls go by load)."""
    if pending is None or not pending.args:
        return None
    arg = pending.args[0]
    return arg if hasattr(arg, "prompt_token_ids") else None
