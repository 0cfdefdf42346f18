"""The ingress's capacity gate in front of the model deployment, and how a model call is sent
through it: refused at once (503) past what Serve would admit, sent again when Serve's router
refuses a request it surely admits (its counting race), Serve/Ray failures mapped to OpenAI
errors. One `ModelCalls` per ingress replica."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any, Awaitable, Callable

from deployments.api import errors
from deployments.api.errors import APIError

logger = logging.getLogger("ray.serve")

# How long a request the capacity gate admitted is re-sent when Serve's router refuses it in
# the moment a burst arrives (see `ModelCalls.start`).
ADMISSION_RETRY_S = 2.0


class ModelCapacity:
    """Requests this ingress replica has in flight to the model deployment (arrival to end of
    response) against the most Serve admits from one caller: `max_ongoing_requests` × model
    replicas (`max_replicas` when autoscaling) + `max_queued_requests` (Serve's queue is per
    caller). At that count Serve's router would refuse the next request too, so it is refused
    here at once with the same 503 + Retry-After, before it costs a tokenizer call: under
    overload the 503s stay cheap and the engine keeps the CPU. Each ingress replica counts only
    its own requests, so this never refuses what Serve would admit, except in the moment
    between a replica finishing a request and its response reaching here.

    `assured` is the least Serve admits from one caller (`min_replicas` when autoscaling): up
    to that count a refusal by Serve's router is its counting race, not a full queue (see
    `ModelCalls.start`)."""

    def __init__(self, limit: int | None, assured: int | None = None, max_queued: int | None = None):
        self.limit, self.in_flight = limit, 0
        self.assured = limit if assured is None else assured
        self.max_queued = max_queued  # the model deployment's max_queued_requests (None: unbounded)

    @classmethod
    def from_options(cls, opts: dict[str, Any]) -> "ModelCapacity":
        """From the model deployment's Serve options (`serve_app.app_options(...)["model"]`)."""
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
        return cls(ongoing * replicas + queued, ongoing * fewest + queued, max_queued)

    def acquire(self, retry_after_s: float, weight: int = 1) -> "Slot":
        """A place for a request of `weight` engine sequences (its `n`): a request asking for n
        choices takes n places, as it takes n of the engine's sequences (never more than the
        whole limit, so a request the limit can hold at all is admitted when the gate is empty)."""
        weight = max(1, min(weight, self.limit or weight))
        if self.limit is not None and self.in_flight + weight > self.limit:
            raise errors.overloaded(retry_after_s, max_queue_size=self.max_queued)
        self.in_flight += weight
        return Slot(self, self.in_flight, weight)


class Slot:
    """One admitted request's place in the gate; `release()` is idempotent."""

    __slots__ = ("owner", "position", "weight")

    def __init__(self, owner: ModelCapacity, position: int, weight: int = 1):
        self.owner: ModelCapacity | None = owner
        self.position = position  # the in-flight count this request made on arrival
        self.weight = weight

    def assured(self) -> bool:
        """Whether Serve admits this request for sure: it arrived (or the count has dropped
        since) within `ModelCapacity.assured`."""
        owner = self.owner
        return owner is not None and owner.assured is not None \
            and min(self.position, owner.in_flight) <= owner.assured

    def release(self) -> None:
        if self.owner is not None:
            self.owner.in_flight -= self.weight
            self.owner = None


@functools.cache
def _backpressure_types() -> tuple[type, ...]:
    from ray.serve.exceptions import BackPressureError

    return (BackPressureError,)


@functools.cache
def unavailable_types() -> tuple[type, ...]:
    """What a call to a deployment raises when its replica died or none is reachable."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from ray.serve.exceptions import DeploymentUnavailableError

    return (ActorDiedError, ActorUnavailableError, RayActorError, DeploymentUnavailableError)


class ModelCalls:
    """Calls to the model deployment through the capacity gate."""

    def __init__(self, capacity: ModelCapacity, retry_after_s: float):
        self.capacity = capacity
        self.retry_after_s = retry_after_s

    def admit(self, weight: int = 1) -> Slot:
        """A place in the gate for `weight` engine sequences, or the 503 at once."""
        return self.capacity.acquire(self.retry_after_s, weight)

    async def start(self, slot: Slot, send: Callable[[], Any],
                    first: Callable[[Any], Awaitable[Any]] = lambda response: response):
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
        give_up, pause = time.monotonic() + ADMISSION_RETRY_S, 0.005
        while True:
            response = send()
            try:
                return response, await self.call(first(response))
            except StopAsyncIteration:
                return response, None
            except APIError as exc:  # refused or failed: nothing left to cancel
                if exc.code != "queue_full" or not slot.assured() \
                        or time.monotonic() + pause > give_up:
                    raise
            except BaseException:
                response.cancel()
                raise
            await asyncio.sleep(pause)
            pause = min(2 * pause, 0.1)

    async def call(self, awaitable):
        """Await a model-replica call, mapping Serve/Ray failures to OpenAI errors."""
        try:
            return await awaitable
        except APIError:
            raise
        except _backpressure_types() as exc:
            # BackPressureError(num_queued_requests, max_queued_requests, ...): its args
            queued, most = (tuple(exc.args[:2]) + (None, None))[:2]
            raise errors.overloaded(getattr(exc, "_retry_after_s", None) or self.retry_after_s,
                                    max_queue_size=most if isinstance(most, int) else self.capacity.max_queued,
                                    queue_size=queued if isinstance(queued, int) else None) from None
        except unavailable_types() as exc:
            logger.warning("model replica unavailable: %s", exc)
            raise errors.engine_unavailable(
                "The model replica failed while serving this request; it is being replaced. Retry."
            ) from None

    def report(self) -> dict[str, Any]:
        """For /health: the gate's limit and this ingress replica's requests in flight."""
        return {"admission_limit": self.capacity.limit, "admitted_in_flight": self.capacity.in_flight}
