"""The capacity gate's fair queue (`deployments/admission/capacity.py`), on its own: which
waiting request is sent next, which one a newcomer displaces when the gate is full, and that
every count returns to zero. The end-to-end measurement (two tenants on the real engine) is
`tests/test_fairness.py`."""

from __future__ import annotations

import asyncio

import pytest

from deployments.admission.capacity import PRIORITY_RANGE, ModelCapacity, Tenant, engine_priority
from deployments.api.errors import APIError


def admit(gate: ModelCapacity, tenant: str, weight: int = 1, priority: int = 0, n: int = 1):
    return gate.acquire(1.0, n, priority, Tenant(tenant, weight, weight - 1))


async def _sent_order(gate: ModelCapacity, slots) -> list:
    """Start waiting for each slot's turn; return the order in which they are sent."""
    order = []

    async def wait(slot):
        try:
            await gate.turn(slot, 1.0)
            order.append(slot)
        except APIError as exc:
            order.append(exc.status)

    tasks = [asyncio.create_task(wait(s)) for s in slots]
    await asyncio.sleep(0)
    return order, tasks


async def _waiting(gate: ModelCapacity, tenant: str, n: int):
    """`n` requests of `tenant` admitted and waiting for their turn (the first ones sent)."""
    slots = [admit(gate, tenant) for _ in range(n)]
    order, tasks = await _sent_order(gate, slots)
    await asyncio.sleep(0)
    return slots, order, tasks


def test_the_next_sent_is_the_tenant_holding_the_least():
    async def main():
        gate = ModelCapacity(13, running_limit=3, max_queued=10)
        running, order, tasks = await _waiting(gate, "heavy", 3)
        assert order == running and gate.running == 3
        heavy = [admit(gate, "heavy") for _ in range(5)]
        light = admit(gate, "light")
        order, tasks = await _sent_order(gate, heavy + [light])
        running[0].release()  # a slot frees: the light tenant goes first
        await asyncio.sleep(0)
        assert order == [light]
        running[1].release()  # then the heavy ones, oldest first
        await asyncio.sleep(0)
        assert order == [light, heavy[0]]
        for s in running[2:] + heavy + [light]:
            s.release()
        await asyncio.gather(*tasks)
        assert gate.in_flight == gate.running == 0 and not gate._held and not gate._unsent and not gate._ready

    asyncio.run(main())


def test_a_full_gate_gives_the_flooding_tenants_newest_place_to_a_light_tenant():
    async def main():
        gate = ModelCapacity(13, running_limit=3, max_queued=10)
        heavy, order, tasks = await _waiting(gate, "heavy", 13)
        assert gate.running == 3 and len(gate._ready) == 10
        with pytest.raises(APIError) as more:  # the heavy tenant itself: refused, as before
            admit(gate, "heavy")
        assert more.value.status == 503
        light = admit(gate, "light")  # takes the heavy tenant's newest waiting place
        await asyncio.sleep(0)
        assert order[-1] == 503 and heavy[-1].evicted and gate.evicted_total == 1
        assert gate.in_flight == 13
        light2 = admit(gate, "light")  # light holds 2 < heavy's 12: again
        assert heavy[-2].evicted and gate.in_flight == 13
        third = admit(gate, "third")
        assert heavy[-3].evicted
        for s in heavy + [light, light2, third]:
            s.release()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert gate.in_flight == gate.running == 0

    asyncio.run(main())


def test_equal_loads_do_not_churn():
    gate = ModelCapacity(4, running_limit=1, max_queued=3)
    a = [admit(gate, "a") for _ in range(2)]
    b = [admit(gate, "b") for _ in range(2)]
    with pytest.raises(APIError):  # b would hold 3 > a's 2: refused, nothing taken
        admit(gate, "b")
    assert not any(s.evicted for s in a + b)
    c = admit(gate, "c")  # c would hold 1 < 2: the newest of the most loaded
    assert b[-1].evicted and not any(s.evicted for s in a + b[:-1])
    for s in a + b + [c]:
        s.release()
    assert gate.in_flight == 0 and not gate._held


def test_weighted_tenant_displaces_a_lighter_weight_one():
    gate = ModelCapacity(4, running_limit=1, max_queued=3)
    low = [admit(gate, "low") for _ in range(2)]  # load 2/1
    gold = [admit(gate, "gold", weight=3) for _ in range(2)]  # load 2/3
    gold.append(admit(gate, "gold", weight=3))  # 3/3 = 1 < low's 2: takes low's newest place
    assert low[-1].evicted and not any(s.evicted for s in gold)
    with pytest.raises(APIError):  # low again: 2/1 > gold's 1 -> refused
        admit(gate, "low")


def test_a_requests_own_priority_orders_its_tenants_queue_only():
    async def main():
        gate = ModelCapacity(10, running_limit=1, max_queued=9)
        first = admit(gate, "a")
        await gate.turn(first, 1.0)
        late = admit(gate, "a", priority=0)
        urgent = admit(gate, "a", priority=-5)
        other = admit(gate, "b", priority=5)  # another tenant holding less: still first
        order, tasks = await _sent_order(gate, [late, urgent, other])
        first.release()
        await asyncio.sleep(0)
        assert order == [other]
        other.release()
        await asyncio.sleep(0)
        assert order == [other, urgent]
        for s in (urgent, late):
            s.release()
        await asyncio.gather(*tasks)
        assert gate.in_flight == 0

    asyncio.run(main())


def test_a_cancelled_waiter_leaves_no_trace():
    async def main():
        gate = ModelCapacity(4, running_limit=1, max_queued=3)
        first = admit(gate, "a")
        await gate.turn(first, 1.0)
        waiting = admit(gate, "a")
        task = asyncio.create_task(gate.turn(waiting, 1.0))
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        waiting.release()
        waiting.release()  # idempotent
        first.release()
        assert gate.in_flight == gate.running == 0 and not gate._ready and not gate._held

    asyncio.run(main())


def test_unbounded_gate_sends_at_once_and_keeps_no_books():
    async def main():
        gate = ModelCapacity(None)
        slots = [admit(gate, f"t{i}") for i in range(50)]
        await asyncio.gather(*(gate.turn(s, 1.0) for s in slots))
        assert not gate._held and not gate._unsent
        for s in slots:
            s.release()
        assert gate.in_flight == 0

    asyncio.run(main())


def test_engine_priority_bands_tenants():
    gold_worst = engine_priority(PRIORITY_RANGE, Tenant("gold", 3, 2))
    plain_best = engine_priority(-PRIORITY_RANGE)  # default tenant (priority 0)
    assert gold_worst < plain_best  # vLLM: lower first
    assert engine_priority(0) == 0


def test_a_reserved_slot_waits_for_another_tenant():
    async def main():
        gate = ModelCapacity(13, running_limit=3, max_queued=10, reserve=1)
        alone = [admit(gate, "heavy") for _ in range(3)]  # alone: every slot
        await asyncio.gather(*(gate.turn(s, 1.0) for s in alone))
        assert gate.running == 3
        light = admit(gate, "light")  # another tenant appears
        alone[0].release()
        await gate.turn(light, 1.0)  # gets the freed slot
        more = admit(gate, "heavy")
        alone[1].release()  # heavy holds 1 + light 1: room for heavy's 2nd
        await gate.turn(more, 1.0)
        third = admit(gate, "heavy")
        task = asyncio.create_task(gate.turn(third, 1.0))
        light.release()  # a free slot, but heavy holds 2 = 3 - reserve
        await asyncio.sleep(0)
        assert not third.sent and gate.running == 2
        light2 = admit(gate, "light")
        await gate.turn(light2, 1.0)  # the light tenant starts at once
        gate._last_seen["light"] -= 60  # ...long ago: heavy may take all again
        light2.release()
        await asyncio.wait_for(task, 1)
        assert third.sent
        for s in alone + [more, third]:
            s.release()
        assert gate.in_flight == gate.running == 0 and not gate._running_by

    asyncio.run(main())


def test_fair_queue_off_is_first_come_first_served():
    async def main():
        gate = ModelCapacity(4, running_limit=1, max_queued=3, fair=False, reserve=1)
        assert gate.reserve == 0
        first = admit(gate, "heavy")
        await gate.turn(first, 1.0)
        queued = [admit(gate, "heavy"), admit(gate, "heavy"), admit(gate, "light")]
        with pytest.raises(APIError):  # full: the newcomer is refused, whoever it is
            admit(gate, "other")
        order, tasks = await _sent_order(gate, queued)
        for expected in queued:
            gate_running = [s for s in [first] + queued if s.sent and s.owner is not None]
            gate_running[0].release()
            await asyncio.sleep(0)
            assert order[-1] is expected
        queued[-1].release()
        await asyncio.gather(*tasks)
        assert gate.in_flight == 0

    asyncio.run(main())


def test_refuses_says_what_acquire_would_do_without_parsing_the_body():
    gate = ModelCapacity(4, running_limit=1, max_queued=3)
    assert not gate.refuses("heavy", 1)
    heavy = [admit(gate, "heavy") for _ in range(4)]
    assert gate.refuses("heavy", 1)  # full, and it holds the most
    assert not gate.refuses("light", 1)  # would take heavy's newest place
    assert not gate._weights.get("light")  # asking changes nothing
    for s in heavy:
        s.release()
    assert not ModelCapacity(None).refuses("x", 1)


def test_the_gate_sends_only_what_the_running_replicas_take():
    """Autoscaling 1..3 replicas of 3 slots: with one replica running the gate sends 3 and the
    rest wait here in fair order (not in Serve's first-come queue); scaling up sends more."""

    async def main():
        opts = {
            "max_ongoing_requests": 3,
            "max_queued_requests": 10,
            "autoscaling_config": {"min_replicas": 1, "max_replicas": 3},
        }
        gate = ModelCapacity.from_options(opts)
        assert gate.limit == 19 and gate.running_limit == 9
        gate.set_running_replicas(1)
        slots = [admit(gate, "heavy") for _ in range(6)]
        order, tasks = await _sent_order(gate, slots)
        await asyncio.sleep(0)
        assert gate.running == 3 and len(order) == 3
        gate.set_running_replicas(2)  # a replica more: three more sent
        await asyncio.sleep(0)
        assert gate.running == 6 and len(order) == 6
        gate.set_running_replicas(0)  # never below min_replicas
        assert gate.running_limit == 3
        for s in slots:
            s.release()
        await asyncio.gather(*tasks)
        assert gate.running == 0

    asyncio.run(main())
