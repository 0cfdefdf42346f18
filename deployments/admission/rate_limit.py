"""The limiter's client, one per ingress replica: it finds (or creates) the app's limiter actor
(deployments/admission/limiter_actor.py) and asks it once per request, within `timeout_s`,
failing open or closed as configured, never raising for limiter trouble.

    limiter = RateLimiter.from_config(cfg.rate_limit, app_name)     # in the ingress's __init__
    decision = await limiter.check(client_key(...), identity, reserve_tokens)
    if not decision.allowed:
        raise rate_limited_error(decision)                          # 429 + Retry-After
    ...                                                             # when the response ends:
    limiter.release(decision.lease, tokens_used)

With `rate_limit.enabled: false`, or every budget off, no actor call is made at all.

Batching (issue 27): one actor call carries every admit and release this replica has at that
moment (`RateLimiterActor.settle`, decided in arrival order exactly as single calls would be).
At most one batch is in flight per replica; what arrives meanwhile goes in the next one, so an
idle service pays nothing (a batch of one, sent in the same event-loop turn) and a loaded one
makes far fewer calls than requests: the actor's cost per request falls as load and the number
of ingress replicas grow (docs/performance.md, "The admission control plane").
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from deployments.actors import DEFAULT_NAMESPACE, actor_failure_types, get_or_create_actor
from deployments.admission.limiter_actor import RateLimiterActor
from deployments.admission.limits import (
    UNLIMITED,
    AdmitSpec,
    ClusterBudget,
    RateDecision,
    RateLimitConfig,
    RateWindow,
    make_windows,
)

logger = logging.getLogger("ray.serve")


# --------------------------------------------------------------------------- the client


class RateLimiter:
    """What an ingress replica holds: resolves (get-or-create) the shared actor lazily and
    asks it for every request, batching the admits and releases of one moment into one call
    (`batch`, see the module). Cheap to construct; no Ray call until the first `check`."""

    MAX_BATCH = 256  # admits per call (releases ride along, all of them)

    def __init__(
        self,
        windows: Sequence[RateWindow],
        *,
        actor_name: str = "rate_limiter.llm",
        namespace: str = DEFAULT_NAMESPACE,
        timeout_s: float = 2.0,
        fail_open: bool = True,
        pin_to_head: bool = True,
        tokens_per_minute: int = 0,
        max_concurrent: int = 0,
        cluster: ClusterBudget | None = None,
        lease_ttl_s: float = 600.0,
        master: bool = True,
    ):
        self.windows = list(windows)
        self.master = master  # rate_limit.enabled: false turns every budget off, tenants' too
        self.tokens_per_minute = tokens_per_minute if master else 0
        self.max_concurrent = max_concurrent if master else 0
        self.cluster = (cluster or ClusterBudget()) if master else ClusterBudget()
        self.lease_ttl_s = lease_ttl_s
        by_period = {w.period_s: w.limit for w in self.windows}
        self.per_minute, self.per_hour = by_period.get(60, 0), by_period.get(3600, 0)
        self.actor_name = actor_name
        self.namespace = namespace
        self.timeout_s = timeout_s
        self.fail_open = fail_open
        self.pin_to_head = pin_to_head
        self._handle: Any = None  # the Ray actor handle, once resolved
        self._configured = False
        self._connecting: asyncio.Task | None = None  # resolving + configuring, shared
        self._epoch: str | None = None  # the actor incarnation configured
        self._late_calls: set[asyncio.Future] = set()  # admits answered past their deadline
        self._last_warning = 0.0
        # batching: admits waiting for the next call (each with the future its caller awaits),
        # releases waiting to ride along, and the batch in flight (its id and deadline)
        self.batch = True
        self._queued: list[tuple[AdmitSpec, asyncio.Future]] = []
        self._releases: list[tuple[str, int | None]] = []
        self._batch_handle: Any = None
        self._batch_loop: asyncio.AbstractEventLoop | None = None
        self._flush_scheduled = False
        self._in_flight: tuple[int, float] | None = None
        self._batch_seq = 0
        self.rpcs = 0  # admit/settle calls made (figures, tests)

    @classmethod
    def from_config(
        cls,
        cfg: RateLimitConfig | Mapping[str, Any] | None,
        app_name: str = "llm",
        env: Mapping[str, str] | None = None,
    ) -> RateLimiter:
        cfg = RateLimitConfig.model_validate(cfg or {})
        return cls(
            cfg.windows(env),
            actor_name=cfg.actor_name or f"rate_limiter.{app_name}",
            namespace=cfg.namespace,
            timeout_s=cfg.timeout_s,
            fail_open=cfg.fail_open,
            tokens_per_minute=cfg.tokens_per_minute,
            max_concurrent=cfg.max_concurrent,
            cluster=cfg.cluster,
            lease_ttl_s=cfg.lease_ttl_s,
            master=cfg.enabled,
        )

    @property
    def enabled(self) -> bool:
        """Some budget applies to every request (the defaults or the cluster's)."""
        return bool(self.windows or self.tokens_per_minute or self.max_concurrent or self.cluster.active)

    def applies(self, identity: Any = None) -> bool:
        """Some budget applies to a request of `identity` (an `auth.Identity` or None)."""
        if self.enabled:
            return True
        lim = getattr(identity, "limits", None)
        return bool(
            self.master
            and lim is not None
            and any(
                getattr(lim, f)
                for f in ("requests_per_minute", "requests_per_hour", "tokens_per_minute", "max_concurrent")
            )
        )

    def _budget(self, identity: Any, name: str, default: int) -> int:
        lim = getattr(identity, "limits", None)
        value = getattr(lim, name, None) if lim is not None else None
        return default if value is None else value

    def counts_tokens(self, identity: Any = None) -> bool:
        """A token budget applies: the request's `max_tokens` is needed up front."""
        return bool(
            self.master
            and (self.cluster.tokens_per_minute or self._budget(identity, "tokens_per_minute", self.tokens_per_minute))
        )

    def spec(self, client_key: str, identity: Any = None, reserve_tokens: int = 0) -> AdmitSpec:
        """The admission question for one request of `identity` (None: a key-less client,
        the default budgets) under the limiter key `client_key`."""
        if identity is not None:
            tenant = str(identity.tenant)
            client_key = tenant if tenant.startswith("key:") else "tenant:" + tenant
        lim = getattr(identity, "limits", None)
        if lim is None or (lim.requests_per_minute is None and lim.requests_per_hour is None):
            windows = list(self.windows)  # the service's default windows
        else:
            windows = make_windows(
                self._budget(identity, "requests_per_minute", self.per_minute),
                self._budget(identity, "requests_per_hour", self.per_hour),
            )
        tokens = self._budget(identity, "tokens_per_minute", self.tokens_per_minute)
        return AdmitSpec(
            key=client_key,
            windows=tuple(windows),
            tokens_per_minute=tokens,
            weight=max(1, int(getattr(identity, "priority", 0) or 0) + 1),
            max_concurrent=self._budget(identity, "max_concurrent", self.max_concurrent),
            reserve_tokens=reserve_tokens if (tokens or self.cluster.tokens_per_minute) else 0,
            ttl_s=self.lease_ttl_s,
        )

    def describe(self) -> dict[str, Any]:
        """For /health's limits report."""
        return {w.label(): w.limit for w in self.windows} if self.windows else {"enabled": False}

    def summary(self, per: str = "IP") -> str:
        """The replaced service's /health `limits.rate_limit` wording, for these windows:
        "10 requests/minute, 100 requests/hour per IP"; "disabled" without a window."""
        if not self.windows:
            return "disabled"
        return ", ".join(f"{w.limit} requests/{w.label()}" for w in self.windows) + f" per {per}"

    def _resolve(self):
        return get_or_create_actor(
            RateLimiterActor, self.actor_name, self.namespace, self.windows, pin_to_head=self.pin_to_head
        )

    async def ready(self, timeout_s: float = 60.0) -> None:
        """Get-or-create the actor and push this deploy's windows, waiting until it answers.
        Call it once at replica start (an async ``__init__``, or before the first request) so
        the first requests do not pay for the actor's start-up — or, past `timeout_s` on a
        loaded cluster, get a fail-open decision. Raises when the actor cannot be reached."""
        if not self.enabled:
            return
        await asyncio.wait_for(self._actor(configure_timeout_s=timeout_s), timeout_s)

    async def _actor(self, configure_timeout_s: float | None = None):
        """The configured handle. Resolving and configuring run as one task shared by every
        caller, which a caller's deadline does not cancel (shielded): a request that gives up
        after `timeout_s` leaves it running, and the next request finds the actor ready."""
        if self._handle is not None and self._configured:
            return self._handle
        task = self._connecting
        if task is None or task.done():
            task = self._connecting = asyncio.get_running_loop().create_task(self._connect(configure_timeout_s))
            task.add_done_callback(_retrieve)
        return await asyncio.shield(task)

    async def _connect(self, configure_timeout_s: float | None):
        try:
            handle = self._handle
            if handle is None:
                handle = self._handle = await asyncio.to_thread(self._resolve)
                self._configured = False
            limit = configure_timeout_s or max(10.0, self.timeout_s * 5)
            # The incarnation first: a restart after it shows in the next decision's epoch.
            # The first call also waits for a new actor's process to start.
            # (An actor of an older release, which kept running through an in-place upgrade,
            # has no `epoch`: no restart detection then, as before.)
            method = getattr(handle, "epoch", None)
            epoch = await asyncio.wait_for(_aw(method.remote()), limit) if method is not None else None
            # An existing actor (other replicas, an earlier deploy) takes this deploy's budgets.
            await asyncio.wait_for(_aw(handle.configure.remote(self.windows, self.cluster)), limit)
        except BaseException:
            self._handle, self._configured = None, False  # re-resolve next time
            raise
        self._handle, self._epoch, self._configured = handle, epoch, True
        return handle

    async def check(self, key: str, identity: Any = None, reserve_tokens: int = 0) -> RateDecision:
        """Admit one request of client `key` (of `identity`'s tenant when given, with its
        budgets; `reserve_tokens`: its max_tokens × n) cluster-wide; never raises for limiter
        trouble. Give `decision.lease` back with `release` when the request ends."""
        if not self.applies(identity):
            return UNLIMITED
        return await self.admit(self.spec(key, identity, reserve_tokens))

    async def admit(self, spec: AdmitSpec) -> RateDecision:
        """Ask the shared actor to admit one request (`RateLimiterActor.admit`); never raises
        for limiter trouble (fail open or closed). Everything — finding the actor, configuring
        it, its answer — within `timeout_s`. An answer that comes after that has its lease
        given back at once (the request went on without it), so a slow or restarting actor
        never leaves phantom requests in flight."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        call: asyncio.Future | None = None
        try:
            handle = await asyncio.wait_for(self._actor(), self.timeout_s)
            if self._batches(handle):
                call = self._enqueue(handle, spec)
            else:
                self.rpcs += 1
                call = asyncio.ensure_future(_aw(handle.admit.remote(spec)))
            decision = await asyncio.wait_for(asyncio.shield(call), max(0.0, deadline - loop.time()))
        except TimeoutError as exc:
            if call is not None:
                self._late_calls.add(call)
                call.add_done_callback(functools.partial(self._release_late, handle))
            return self._degraded(exc)
        except asyncio.CancelledError:  # the request went away while waiting: nothing may keep its lease
            if call is not None:
                self._late_calls.add(call)
                call.add_done_callback(functools.partial(self._release_late, handle))
            raise
        except actor_failure_types() as exc:
            self._handle, self._configured = None, False  # re-resolve next time (restarted actor)
            return self._degraded(exc)
        except Exception as exc:
            self._handle, self._configured = None, False
            return self._degraded(exc)
        if decision.epoch and self._epoch and decision.epoch != self._epoch:
            # Ray restarted the actor: it restored its snapshot; push this deploy's budgets
            # again anyway (cheap, and right even if the snapshot could not be read).
            logger.warning("rate limiter actor restarted (%s → %s); configuring it again", self._epoch, decision.epoch)
            self._epoch, self._configured = decision.epoch, False
        return decision

    def _release_late(self, handle: Any, call: asyncio.Future) -> None:
        """An admit answered after its deadline, or after its request went away: give its lease
        back to the actor that took it."""
        self._late_calls.discard(call)
        if call.cancelled() or call.exception() is not None:
            return
        lease = getattr(call.result(), "lease", None)
        if lease:
            try:
                handle.release.remote(lease, 0)
            except Exception as exc:
                logger.debug("rate limiter release failed: %s", exc)

    def release(self, lease: str | None, tokens: int | None) -> None:
        """Give a lease back (fire and forget: the response is not held for it; batched with
        the next admits). A lost call is repaired by the lease's expiry (`lease_ttl_s`)."""
        if not lease or self._handle is None:
            return
        if self._batches(self._handle) and _loop_running():
            self._releases.append((lease, tokens))
            self._schedule(self._handle)
            return
        try:
            self._handle.release.remote(lease, tokens)
        except Exception as exc:  # the actor restarting: its leases are gone with it
            logger.debug("rate limiter release failed: %s", exc)

    # ------------------------------------------------------------------ batching

    def _batches(self, handle: Any) -> bool:
        """Batching is on and the actor takes batches (one of an older release, kept through
        an in-place upgrade, has no `settle`: one call each then)."""
        return self.batch and getattr(handle, "settle", None) is not None

    async def drain(self, timeout_s: float = 5.0) -> bool:
        """Wait until every queued admit and release has been sent and answered (a replica
        stopping, tests); False if that took longer than `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while self._queued or self._releases or self._in_flight is not None or self._flush_scheduled:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    def _enqueue(self, handle: Any, spec: AdmitSpec) -> asyncio.Future:
        """Queue one admit for the next batch; its future gets the decision (or the call's
        exception, which `admit` handles as it would its own call's)."""
        fut = asyncio.get_running_loop().create_future()
        self._queued.append((spec, fut))
        self._schedule(handle)
        return fut

    def _schedule(self, handle: Any) -> None:
        """Send a batch at the end of this event-loop turn (so the admits and releases of the
        turn go together) unless one is already due."""
        loop = asyncio.get_running_loop()
        if self._batch_loop is not loop:  # a new event loop (tests): what the old one held is gone
            self._batch_loop, self._flush_scheduled, self._in_flight = loop, False, None
            self._queued = [(spec, fut) for spec, fut in self._queued if fut.get_loop() is loop]
        self._batch_handle = handle
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        loop = asyncio.get_running_loop()
        if not (self._queued or self._releases):
            return
        if self._in_flight is not None and loop.time() < self._in_flight[1]:
            return  # sent when the batch in flight comes back (or once it is overdue)
        batch, self._queued = self._queued[: self.MAX_BATCH], self._queued[self.MAX_BATCH :]
        releases, self._releases = self._releases, []
        self._batch_seq += 1
        self._in_flight = (self._batch_seq, loop.time() + self.timeout_s)
        task = loop.create_task(self._send(self._batch_handle, self._batch_seq, batch, releases))
        task.add_done_callback(_retrieve)

    async def _send(
        self,
        handle: Any,
        seq: int,
        batch: list[tuple[AdmitSpec, asyncio.Future]],
        releases: list[tuple[str, int | None]],
    ) -> None:
        try:
            self.rpcs += 1
            decisions = await _aw(handle.settle.remote([spec for spec, _ in batch], releases))
        except Exception as exc:  # every admit of the batch sees what its own call would have
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            if releases:
                logger.debug("rate limiter releases lost (%s); their leases expire", type(exc).__name__)
        except BaseException:  # cancelled (the replica stopping)
            for _, fut in batch:
                fut.cancel()
            raise
        else:
            for (_, fut), decision in zip(batch, decisions, strict=True):
                if not fut.done():
                    fut.set_result(decision)
        finally:
            if self._in_flight is not None and self._in_flight[0] == seq:
                self._in_flight = None
            if self._queued or self._releases:
                self._schedule(self._batch_handle)

    def _degraded(self, exc: BaseException) -> RateDecision:
        now = time.monotonic()
        if now - self._last_warning > 60:
            self._last_warning = now
            logger.warning(
                "rate limiter unavailable (%s: %s); failing %s",
                type(exc).__name__,
                exc,
                "open" if self.fail_open else "closed",
            )
        return RateDecision(allowed=self.fail_open, degraded=True, retry_after_s=0 if self.fail_open else 1)


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


async def _aw(ref):
    return await ref


def _retrieve(task: asyncio.Future) -> None:
    """Done callback: mark a shared task's exception as seen (its callers got it)."""
    if not task.cancelled():
        task.exception()
