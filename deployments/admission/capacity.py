"""The ingress's capacity gate in front of the model deployment, and how a model call is sent
through it: refused at once (503) past what Serve would admit, queued here in fair order by
tenant while the model's running replicas are full (`ModelCapacity`), sent again when Serve's
router refuses a request it surely admits (its counting race), Serve/Ray failures mapped to
OpenAI errors. One `ModelCalls` per ingress replica."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from deployments.api import errors
from deployments.api.errors import APIError, unavailable_types

logger = logging.getLogger("ray.serve")

# How long a request the capacity gate admitted is re-sent when Serve's router refuses it in
# the moment a burst arrives (see `ModelCalls.start`).
ADMISSION_RETRY_S = 2.0


@dataclass(frozen=True)
class Tenant:
    """Who a request is for, as the admission middleware decided it (`tenant_of`): its
    fair-queueing key (the tenant, or the client's address without a key), its weight in the
    fair queue (the tenant's priority + 1, at least 1) and the tenant's priority."""

    key: str = ""
    weight: int = 1
    priority: int = 0


ANONYMOUS = Tenant()


def tenant_of(scope: Mapping[str, Any]) -> Tenant:
    """The request's `Tenant` (the middleware keeps it in the ASGI scope's state; a request the
    middleware did not budget, e.g. without rate limiting, is `ANONYMOUS`)."""
    return (scope.get("state") or {}).get("tenant", ANONYMOUS)


# A request's own `priority` (vLLM's convention: lower first) lies within ±PRIORITY_RANGE; the
# engine gets it offset by the tenant's priority, so tenants' bands never overlap (`engine_priority`).
PRIORITY_RANGE = 2**20


def engine_priority(request_priority: int, tenant: Tenant = ANONYMOUS) -> int:
    """vLLM's priority for a request (lower is scheduled first): the tenant's priority (higher
    first) orders the bands, the request's own orders within its band."""
    return request_priority - tenant.priority * (2 * PRIORITY_RANGE + 1)


class ModelCapacity:
    """Requests this ingress replica has in flight to the model deployment (arrival to end of
    response) against the most Serve admits from one caller: `max_ongoing_requests` × model
    replicas (`max_replicas` when autoscaling) + `max_queued_requests` (Serve's queue is per
    caller). Past that count Serve's router would refuse the next request too, so it is refused
    here at once with the same 503 + Retry-After, before it costs a tokenizer call: under
    overload the 503s stay cheap and the engine keeps the CPU. Each ingress replica counts only
    its own requests, so this never refuses what Serve would admit, except in the moment
    between a replica finishing a request and its response reaching here.

    **Fair queueing.** With a bounded queue the gate also *is* the queue: a request is sent to
    the model only while fewer than `running_limit` (`max_ongoing_requests` × the running
    replicas, followed by `watch_model_replicas` under autoscaling) of this replica's requests
    are there; the others wait here, tokenized, and the next one sent is the
    one whose tenant holds the fewest places per weight (`Tenant`: weight = tenant
    priority + 1), then the lowest request `priority` (vLLM's convention), then the oldest. When
    the gate is full, a newcomer whose tenant would still hold fewer places per weight than the
    tenant holding the most takes the newest waiting place of that tenant, which gets the 503:
    under overload the flooding tenant absorbs the refusals and a light one is neither refused
    nor queued behind it. Within one tenant it is first come, first served, as before.

    `assured` is the least Serve admits from one caller (`min_replicas` when autoscaling): up
    to that count a refusal by Serve's router is its counting race, not a full queue (see
    `ModelCalls.start`)."""

    ACTIVE_WINDOW_S = 10.0

    def __init__(
        self,
        limit: int | None,
        assured: int | None = None,
        max_queued: int | None = None,
        running_limit: int | None = None,
        reserve: int = 0,
        fair: bool = True,
    ):
        self.limit, self.in_flight = limit, 0
        self.assured = limit if assured is None else assured
        self.max_queued = max_queued  # the model deployment's max_queued_requests (None: unbounded)
        # places sent to the model at once (None: no queue here, every admitted request is sent)
        self.running_limit = running_limit if limit is not None else None
        self.running = 0
        self.evicted_total = 0
        self._held: dict[str, int] = {}  # tenant → places admitted and not released
        self._weights: dict[str, int] = {}  # tenant → fair weight
        self._unsent: dict[int, Slot] = {}  # admitted, not yet sent (tokenizing or waiting), by seq
        self._ready: list[Slot] = []  # waiting for their turn
        self._seq = 0
        self.per_replica: int | None = None  # max_ongoing_requests (from_options)
        self.replica_range = (1, 1)  # (min, max) model replicas
        self.fair = fair  # False: first come, first served (and no reserve)
        # at most running_limit - 1 reserved (a tenant alone still gets a slot)
        self.reserve = min(reserve, (running_limit or 1) - 1) if self.running_limit is not None and fair else 0
        self._running_by: dict[str, int] = {}  # tenant → places sent to the model (with reserve)
        self._last_seen: dict[str, float] = {}  # tenant → when it last asked (with reserve)

    @classmethod
    def from_options(cls, opts: dict[str, Any], reserve: int = 0, fair: bool = True) -> ModelCapacity:
        """From the model deployment's Serve options (`serve_app.app_options(...)["model"]`),
        `limits.fair_queue_reserve` and `limits.fair_queue`."""
        queued = opts.get("max_queued_requests", -1)
        max_queued = queued if isinstance(queued, int) and queued >= 0 else None
        auto = opts.get("autoscaling_config")

        def auto_field(name: str):
            return auto.get(name) if isinstance(auto, dict) else getattr(auto, name, None)

        replicas = auto_field("max_replicas") if auto else opts.get("num_replicas", 1)
        fewest = auto_field("min_replicas") if auto else replicas
        fewest = 1 if fewest is None else fewest  # Serve's default min_replicas
        if queued is None or queued < 0 or not isinstance(replicas, int):
            return cls(None, max_queued=max_queued)  # unbounded queue (or "auto" replicas): Serve alone decides
        ongoing = opts["max_ongoing_requests"]
        gate = cls(
            ongoing * replicas + queued, ongoing * fewest + queued, max_queued, ongoing * replicas, reserve, fair
        )
        gate.per_replica = ongoing
        gate.replica_range = (max(1, fewest), replicas)
        return gate

    def set_running_replicas(self, n: int) -> None:
        """The model replicas running now (autoscaling): the gate sends at most
        `max_ongoing_requests` × that many to the model, so the rest wait *here*, in fair order,
        not in Serve's first-come queue."""
        if self.running_limit is None or self.per_replica is None:
            return
        low, high = self.replica_range
        self.running_limit = self.per_replica * min(max(n, low), high)
        if self.reserve:
            self.reserve = min(self.reserve, self.running_limit - 1)
        self._dispatch()

    def acquire(self, retry_after_s: float, weight: int = 1, priority: int = 0, who: Tenant = ANONYMOUS) -> Slot:
        """A place for a request of `who` of `weight` engine sequences (its `n`): a request asking
        for n choices takes n places, as it takes n of the engine's sequences (never more than the
        whole limit, so a request the limit can hold at all is admitted when the gate is empty).
        `priority`: the request's own (vLLM's convention, lower first; within its tenant)."""
        weight = max(1, min(weight, self.limit or weight))
        tenant, fair = who.key, who.weight
        if self.limit is not None and self.in_flight + weight > self.limit:
            victims = self._victims(tenant, fair, weight, priority)
            if victims is None:
                raise errors.overloaded(retry_after_s, max_queue_size=self.max_queued)
            for v in victims:
                v.evict(retry_after_s)
        self.in_flight += weight
        self._seq += 1
        slot = Slot(self, self.in_flight, weight, tenant, priority, self._seq)
        if self.running_limit is not None:
            self._held[tenant] = self._held.get(tenant, 0) + weight
            self._weights[tenant] = max(1, fair)
            self._unsent[slot.seq] = slot
            if self.reserve:
                self._last_seen[tenant] = time.monotonic()
        return slot

    def _load(self, tenant: str, extra: int = 0) -> float:
        return (self._held.get(tenant, 0) + extra) / self._weights.get(tenant, 1)

    def _key(self, slot: Slot) -> tuple:
        if not self.fair:
            return (0, 0, slot.seq)
        return (self._load(slot.tenant), slot.priority, slot.seq)

    def _victims(self, tenant: str, fair: int, weight: int, priority: int) -> list[Slot] | None:
        """The waiting places a newcomer may take (worst first), or None: it is refused."""
        if self.running_limit is None or not self.fair or not self._unsent:
            return None
        assert self.limit is not None  # a running limit is only set with a limit
        mine = ((self._held.get(tenant, 0) + weight) / max(1, fair), priority, float("inf"))
        victims, room = [], self.limit - self.in_flight
        for slot in sorted(self._unsent.values(), key=self._key, reverse=True):
            if room >= weight:
                break
            if slot.tenant == tenant or not self._key(slot) > mine:
                return None
            victims.append(slot)
            room += slot.weight
        return victims if room >= weight else None

    def refuses(self, tenant: str, fair: int) -> bool:
        """Whether this tenant's next request is refused whatever it asks (one engine sequence,
        its best priority): the admission middleware's 503 before the body is parsed, so a
        flood of refused requests costs as little as possible."""
        if self.limit is None or self.in_flight < self.limit:
            return False
        return self._victims(tenant, fair, 1, -PRIORITY_RANGE) is None

    async def turn(self, slot: Slot, retry_after_s: float) -> None:
        """Wait until the request may be sent to the model (at once without a queue here)."""
        if slot.evicted:
            raise errors.overloaded(retry_after_s, max_queue_size=self.max_queued)
        if self.running_limit is None or slot.sent:
            return
        slot.waiter = asyncio.get_running_loop().create_future()
        self._ready.append(slot)
        self._dispatch()
        try:
            await slot.waiter
        except asyncio.CancelledError:
            if slot in self._ready:
                self._ready.remove(slot)
            raise
        finally:
            slot.waiter = None

    def _others_active(self, tenant: str, now: float) -> bool:
        """Whether a tenant other than `tenant` asked within `ACTIVE_WINDOW_S` (old entries go)."""
        found = False
        for other, seen in list(self._last_seen.items()):
            if now - seen > self.ACTIVE_WINDOW_S:
                del self._last_seen[other]
            elif other != tenant:
                found = True
        return found

    def _may_send(self, slot: Slot, now: float) -> bool:
        assert self.running_limit is not None  # a reserve is only kept with a running limit
        return (
            not self.reserve
            or self._running_by.get(slot.tenant, 0) + slot.weight <= self.running_limit - self.reserve
            or not self._others_active(slot.tenant, now)
        )

    def _dispatch(self) -> None:
        """Send the best waiting requests while the model has room."""
        if self.running_limit is None:  # no queue here: nothing ever waits
            return
        now = time.monotonic() if self.reserve else 0.0
        while self._ready and (self.running < self.running_limit):
            ready = self._ready if not self.reserve else [s for s in self._ready if self._may_send(s, now)]
            if not ready:
                break
            best = min(ready, key=self._key)
            self._ready.remove(best)
            self._unsent.pop(best.seq, None)
            best.sent = True
            self.running += best.weight
            if self.reserve:
                self._running_by[best.tenant] = self._running_by.get(best.tenant, 0) + best.weight
            if best.waiter is not None and not best.waiter.done():
                best.waiter.set_result(None)

    def _release(self, slot: Slot) -> None:
        self.in_flight -= slot.weight
        if self.running_limit is None:
            return
        held = self._held.get(slot.tenant, 0) - slot.weight
        if held > 0:
            self._held[slot.tenant] = held
        else:
            self._held.pop(slot.tenant, None)
            self._weights.pop(slot.tenant, None)
        if slot.sent:
            self.running -= slot.weight
            if self.reserve:
                left = self._running_by.get(slot.tenant, 0) - slot.weight
                if left > 0:
                    self._running_by[slot.tenant] = left
                else:
                    self._running_by.pop(slot.tenant, None)
        else:
            self._unsent.pop(slot.seq, None)
            if slot in self._ready:
                self._ready.remove(slot)
        self._dispatch()


class Slot:
    """One admitted request's place in the gate; `release()` is idempotent."""

    __slots__ = ("evicted", "owner", "position", "priority", "sent", "seq", "tenant", "waiter", "weight")

    def __init__(
        self, owner: ModelCapacity, position: int, weight: int = 1, tenant: str = "", priority: int = 0, seq: int = 0
    ):
        self.owner: ModelCapacity | None = owner
        self.position = position  # the in-flight count this request made on arrival
        self.weight = weight
        self.tenant, self.priority, self.seq = tenant, priority, seq
        self.sent = self.evicted = False
        self.waiter: asyncio.Future | None = None

    def assured(self) -> bool:
        """Whether Serve admits this request for sure: it arrived (or the count has dropped
        since) within `ModelCapacity.assured`."""
        owner = self.owner
        return owner is not None and owner.assured is not None and min(self.position, owner.in_flight) <= owner.assured

    def evict(self, retry_after_s: float) -> None:
        """Give this waiting place to a lighter tenant's request: this one gets the 503."""
        owner = self.owner
        if owner is None:
            return
        self.evicted = True
        owner.evicted_total += 1
        waiter = self.waiter
        self.release()
        if waiter is not None and not waiter.done():
            waiter.set_exception(errors.overloaded(retry_after_s, max_queue_size=owner.max_queued))

    def release(self) -> None:
        if self.owner is not None:
            owner, self.owner = self.owner, None
            owner._release(self)


def deployment_states() -> dict[str, Any]:
    """Each deployment of this replica's app as Serve's controller reports it: status, replica
    states, running replicas (an `error` entry outside Serve or while the controller is away)."""
    try:
        from ray import serve

        app_name = serve.get_replica_context().app_name
        status = serve.status().applications[app_name]
    except Exception as exc:  # outside Serve, or the controller is briefly unreachable
        return {"error": f"{type(exc).__name__}"}
    out = {}
    for name, dep in status.deployments.items():
        states = {str(k.value if hasattr(k, "value") else k): v for k, v in dep.replica_states.items()}
        out[name] = {
            "status": str(dep.status.value if hasattr(dep.status, "value") else dep.status),
            "replica_states": states,
            "running_replicas": states.get("RUNNING", 0),
        }
    return out


async def watch_model_replicas(gate: ModelCapacity, deployment: str = "ModelReplica", interval_s: float = 5.0) -> None:
    """Keep `gate` told how many model replicas are running (autoscaling), from Serve's status
    every `interval_s` (one controller call, in a thread). Runs for the ingress replica's life."""
    while True:
        try:
            states = await asyncio.to_thread(deployment_states)
            running = (states.get(deployment) or {}).get("running_replicas")
            if isinstance(running, int):
                gate.set_running_replicas(running)
        except Exception as exc:  # the controller briefly away: keep the last figure
            logger.debug("model replica count not refreshed: %s", exc)
        await asyncio.sleep(interval_s)


@functools.cache
def _backpressure_types() -> tuple[type[BaseException], ...]:
    from ray.serve.exceptions import BackPressureError

    return (BackPressureError,)


async def dependency_call(awaitable: Awaitable[Any], what: str, retry_after_s: float = 1) -> Any:
    """Await a call to a part of the service other than the model (the tokenizer deployment,
    the adapter registry): its replica dead or being replaced is a 503 with `Retry-After`
    (`errors.dependency_unavailable`), never a 500. The request's own deadline still bounds
    the wait (Serve holds a call while no replica runs)."""
    try:
        return await awaitable
    except unavailable_types() as exc:
        logger.warning("%s unavailable: %s: %s", what, type(exc).__name__, exc)
        raise errors.dependency_unavailable(what, max(1, round(retry_after_s))) from None


class ModelCalls:
    """Calls to the model deployment through the capacity gate."""

    def __init__(self, capacity: ModelCapacity, retry_after_s: float):
        self.capacity = capacity
        self.retry_after_s = retry_after_s
        self._lost_m = float("-inf")  # when a call last found its model replica dead
        self._answered_m = float("-inf")  # when a model replica last answered a call

    def answered(self) -> None:
        """A model replica answered a call (a request's, /health's)."""
        self._answered_m = time.monotonic()

    def lost(self) -> None:
        """A call found its model replica dead, or its engine dead (such a replica ends itself)."""
        self._lost_m = time.monotonic()

    def replica_lost(self) -> bool:
        """A model replica (or its engine) died under a call and none has answered since. Serve's
        router holds a call while no replica runs (it may learn of the death from its own probe,
        with no call failing), so a call that times out then is not "busy": /health reads this
        (the controller's replica count lags the death by seconds, on a loaded machine minutes)."""
        return self._lost_m > self._answered_m

    def admit(self, who: Tenant, weight: int = 1, priority: int = 0) -> Slot:
        """A place in the gate for `weight` engine sequences of `who`, or the 503 at once."""
        return self.capacity.acquire(self.retry_after_s, weight, priority, who)

    async def start(
        self, slot: Slot, send: Callable[[], Any], first: Callable[[Any], Awaitable[Any]] = lambda response: response
    ):
        """Send a call to the model deployment (`send()` → its response) and await the first
        result (`first(response)`: the whole result, or a stream's first chunk, None if the
        stream is empty). Returns (response, first result). On a deadline or cancellation the
        call is cancelled, which aborts its engine request.

        Serve's router counts a request as queued until a replica has taken it, so when
        requests arrive together it refuses some within capacity: with 3 slots and 10 queue
        places, the 11th–13th of 13 simultaneous arrivals while the first 3 are still being
        assigned (Serve's router notes this in `wrap_request_assignment`). When the capacity
        gate admitted the request within what Serve admits at the fewest replicas
        (`Slot.assured`), such a refusal is that moment, not a full queue: the call is sent
        again (a refused call never reached a replica) for up to `ADMISSION_RETRY_S`, then the
        503 stands. Past that count (autoscaling: fewer replicas running than the most) Serve's
        refusal is the 503 at once."""
        await self.capacity.turn(slot, self.retry_after_s)
        give_up, pause = time.monotonic() + ADMISSION_RETRY_S, 0.005
        while True:
            response = send()
            try:
                return response, await self.call(first(response))
            except StopAsyncIteration:
                return response, None
            except APIError as exc:  # refused or failed: nothing left to cancel
                if exc.code != "queue_full" or not slot.assured() or time.monotonic() + pause > give_up:
                    raise
            except BaseException:
                response.cancel()
                raise
            await asyncio.sleep(pause)
            pause = min(2 * pause, 0.1)

    async def call(self, awaitable):
        """Await a model-replica call, mapping Serve/Ray failures to OpenAI errors."""
        try:
            result = await awaitable
        except APIError as exc:
            if errors.is_engine_loss(exc):  # its engine died: the replica is ending itself
                self.lost()
            else:  # the replica answered, with the client's error
                self.answered()
            raise
        except _backpressure_types() as exc:
            # BackPressureError(num_queued_requests, max_queued_requests, ...): its args
            queued, most = (tuple(exc.args[:2]) + (None, None))[:2]
            raise errors.overloaded(
                getattr(exc, "_retry_after_s", None) or self.retry_after_s,
                max_queue_size=most if isinstance(most, int) else self.capacity.max_queued,
                queue_size=queued if isinstance(queued, int) else None,
            ) from None
        except unavailable_types() as exc:
            self.lost()
            logger.warning("model replica unavailable: %s", exc)
            raise errors.engine_unavailable(
                "The model replica failed while serving this request; it is being replaced. Retry."
            ) from None
        self.answered()
        return result

    def report(self) -> dict[str, Any]:
        """For /health: the gate's limit and this ingress replica's requests in flight."""
        c = self.capacity
        return {
            "admission_limit": c.limit,
            "admitted_in_flight": c.in_flight,
            "sent_to_model": c.running if c.running_limit is not None else None,
            "waiting_here": len(c._ready),
            "given_to_lighter_tenants": c.evicted_total,
        }
