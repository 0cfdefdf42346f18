"""The model deployment's request router (deployments/routing): token-block hashes, the prefix
table, and `CacheAffinityRouter`'s choices on Serve's request-router API, with fake replicas
(the routing logic touches no engine; the real router runs in every app of the suite, as
`routing.policy` defaults to it, and is measured in scripts/bench/routing.py)."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import time

import pytest
from ray.serve._private.common import DeploymentHandleSource, RequestMetadata
from ray.serve.request_router import PendingRequest, ReplicaID

from deployments.api.protocol import GenerationRequest
from deployments.config import ServiceConfig
from deployments.routing.blocks import PrefixTable, block_hashes
from deployments.routing.router import CacheAffinityRouter, rendezvous_score
from scripts.bench.routing import FakeReplica
from serve_app import app_options

DEPLOYMENT = "ModelReplica"


def replica(name: str, **kw) -> FakeReplica:
    from ray.serve._private.common import DeploymentID

    return FakeReplica(ReplicaID(unique_id=name, deployment_id=DeploymentID(name=DEPLOYMENT, app_name="llm")), **kw)


def make_router(replicas, **state) -> CacheAffinityRouter:
    from ray.serve._private.common import DeploymentID

    r = CacheAffinityRouter(
        deployment_id=DeploymentID(name=DEPLOYMENT, app_name="llm"),
        handle_source=DeploymentHandleSource.REPLICA,
        use_replica_queue_len_cache=True,
    )
    r.initialize_state(**state)
    r.update_replicas(replicas)
    return r


def pending(tokens: list[int], session: str | None = None, mux: str = "", rid: str = "r") -> PendingRequest:
    meta = RequestMetadata(request_id=rid, internal_request_id=rid, multiplexed_model_id=mux)
    return PendingRequest(args=[GenerationRequest(rid, tokens, {}, session=session)], kwargs={}, metadata=meta)


def ids(ranks) -> list[list[str]]:
    return [sorted(r.replica_id.unique_id for r in rank) for rank in ranks]


def run(coro):
    return asyncio.run(coro)


class ProbedReplica(FakeReplica):
    """A fake replica whose queue length, as Serve's routing loop probes it, is `queued`."""

    queued = 0

    async def get_queue_len(self, *, deadline_s: float) -> int:
        return self.queued


def probed_pair() -> tuple[ProbedReplica, ProbedReplica]:
    from ray.serve._private.common import DeploymentID

    dep = DeploymentID(name=DEPLOYMENT, app_name="llm")
    a, b = (ProbedReplica(ReplicaID(unique_id=n, deployment_id=dep)) for n in "ab")
    return a, b


def session_key_for(target, replicas) -> str:
    """A session key that rendezvous hashing sends to `target` among `replicas`."""
    return next(
        k
        for k in map(str, range(1000))
        if max(replicas, key=lambda x: rendezvous_score(k, x.replica_id.unique_id)) is target
    )


# ----------------------------------------------------------------------------- blocks


def test_block_hashes_chain_full_blocks_only():
    a = list(range(100))
    b = list(range(64)) + [7] * 36
    ha, hb = block_hashes(a, 16), block_hashes(b, 16)
    assert len(ha) == 6  # 96 of 100 tokens: the partial last block is not hashed
    assert ha[:4] == hb[:4] and ha[4] != hb[4]  # the same prefix up to token 64, then not
    assert all(x != y for x, y in zip(block_hashes([1, 2] * 8, 16), block_hashes([2, 1] * 8, 16), strict=True))
    # a block's hash depends on everything before it, not just its own tokens
    assert block_hashes([5] * 16 + [9] * 16, 16)[1] != block_hashes([6] * 16 + [9] * 16, 16)[1]
    assert block_hashes(a[:15], 16) == []


def test_block_hashes_are_the_same_in_every_process():
    """Every ingress replica must compute the same keys: no per-process hash salt."""
    code = "from deployments.routing.blocks import block_hashes; print(block_hashes(list(range(200)), 64))"
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout
        for seed in ("1", "2", "random")
    }
    assert len(outs) == 1 and outs.pop().strip() == str(block_hashes(list(range(200)), 64))
    assert rendezvous_score("s", "r") == rendezvous_score("s", "r") != rendezvous_score("s", "q")


def test_prefix_table_longest_match_lru_and_removal():
    t = PrefixTable(max_blocks=8)
    x, y = block_hashes(list(range(256)), 64), block_hashes(list(range(128)) + [1] * 128, 64)
    t.insert(x, "A")
    t.insert(y[:3], "B")  # shares x's first 2 blocks
    both = t.mask(["A", "B"])
    depth, holders = t.match(x, both)
    assert (depth, t.replicas(holders)) == (4, ["A"])
    depth, holders = t.match(y, both)
    assert (depth, t.replicas(holders)) == (3, ["B"])
    depth, holders = t.match(x[:2], both)
    assert depth == 2 and sorted(t.replicas(holders)) == ["A", "B"]
    assert t.match(x, t.mask(["C"])) == (0, 0)  # only candidates count
    t.remove("A")
    depth, holders = t.match(x, t.mask(["B"]))
    assert (depth, t.replicas(holders)) == (2, ["B"])
    assert t.mask(["D"]) == 1 << 0  # A's bit went free and is reused
    t.insert(block_hashes(list(range(1000, 1000 + 64 * 8)), 64), "D")
    assert len(t) == 8  # bounded: the least recently used blocks left
    assert t.match(y, t.mask(["B"])) == (0, 0)


# ----------------------------------------------------------------------------- router


@pytest.fixture
def three():
    return [replica("a"), replica("b"), replica("c")]


def test_session_key_goes_to_the_same_replica_in_every_router(three):
    async def go():
        r1, r2 = make_router(three), make_router(list(reversed(three)))
        chosen = set()
        for key in ("alice", "bob", "carol", "dave", "erin", "frank"):
            a = ids(await r1.choose_replicas(three, pending([1] * 10, session=key)))[0]
            b = ids(await r2.choose_replicas(three, pending([2] * 10, session=key)))[0]
            assert a == b and len(a) == 1  # two ingress replicas, no shared state: the same answer
            chosen.add(a[0])
        assert len(chosen) > 1  # the keys spread
        # a replica leaving moves only its own keys
        before = {k: ids(await r1.choose_replicas(three, pending([1], session=k)))[0][0] for k in "pqrstuvwxyz"}
        after = {k: ids(await r1.choose_replicas(three[:2], pending([1], session=k)))[0][0] for k in "pqrstuvwxyz"}
        assert all(after[k] == v for k, v in before.items() if v != "c")
        return r1.stats()

    stats = run(go())
    assert stats["decisions"]["session"] >= 12


def test_prefix_follows_the_longest_match_and_load_decides_otherwise(three):
    async def go():
        r = make_router(three, block_tokens=4)
        system = list(range(100, 116))  # 4 blocks shared by every conversation
        p = pending(system + [1, 2, 3, 4, 5, 6, 7, 8], rid="t1")
        first = await r.choose_replicas(three, p)
        assert len(first) == 1 and len(first[0]) == 2  # nothing known yet: two random, by load
        target = first[0][0]
        r.on_request_routed(p, target.replica_id, None)
        other = next(x for x in three if x is not target)
        r.on_request_routed(pending(system + [9] * 8, rid="o"), other.replica_id, None)
        # the conversation's next turn: its whole earlier prompt is a prefix of this one
        ranks = await r.choose_replicas(three, pending(system + [1, 2, 3, 4, 5, 6, 7, 8, 50, 51, 52, 53], rid="t2"))
        assert ids(ranks) == [[target.replica_id.unique_id]]  # it waits for that replica's slot
        # only the shared system prompt matches: both replicas that saw it are preferred
        ranks = await r.choose_replicas(three, pending(system + [70] * 8, rid="t3"))
        assert ids(ranks)[0] == sorted([target.replica_id.unique_id, other.replica_id.unique_id])
        return r.stats()

    stats = run(go())
    assert stats["decisions"] == {"load": 1, "prefix": 2}
    assert stats["cpu_us_per_request"] is not None


def test_imbalance_falls_back_to_load(three):
    async def go():
        r = make_router(three, imbalance_threshold=1)
        a, b, _ = three
        r.on_new_queue_len_info(a.replica_id, 3)
        r.on_new_queue_len_info(b.replica_id, 1)
        key = session_key_for(a, three)
        ranks = await r.choose_replicas(three, pending([1], session=key))
        assert len(ranks) == 1 and len(ranks[0]) == 2  # 3 - 1 > 1: by load
        r.on_new_queue_len_info(a.replica_id, 2)
        ranks = await r.choose_replicas(three, pending([1], session=key))
        assert ids(ranks)[0] == ["a"]  # 2 - 1 <= 1: affinity holds
        return r.stats()

    assert run(go())["decisions"] == {"imbalanced": 1, "session": 1}


def test_without_spilling_a_request_waits_for_its_preferred_replica_as_long_as_its_cache_saves(three):
    """`spill_when_full` false: the preferred replica is the only rank offered (Serve backs off
    and asks again while it is full) until the request has waited as long as a prefill of its
    cached tokens takes; then the replicas with fewer requests in flight are the next rank —
    none under saturation (a miss would not start it sooner); and the imbalance bound sends it
    by load at once. `spill_when_full` true: the load-based pair is the next rank at once."""
    a, b, c = three
    conversation = list(range(40))  # 10 blocks of 4 tokens, sent to `a` before

    def setup(**state):
        r = make_router(three, block_tokens=4, imbalance_threshold=2, **state)
        r.on_request_routed(pending(conversation[:32], rid="turn1"), a.replica_id, None)
        r.on_request_routed(pending(list(range(500, 540)), rid="other"), b.replica_id, None)
        for replica_, queued in ((a, 3), (b, 1), (c, 2)):
            r.on_new_queue_len_info(replica_.replica_id, queued)
        return r

    def turn2(age_s: float = 0.0):
        p = pending(conversation, rid="turn2")
        p.created_at -= age_s
        return p

    async def go():
        spill = setup(spill_when_full=True)
        ranks = await spill.choose_replicas(three, turn2())
        assert ids(ranks)[0] == ["a"] and len(ranks) == 2 and "a" not in ids(ranks)[1]

        r = setup(prefill_tokens_per_s=16.0)  # 32 cached tokens: a 2 s prefill saved
        assert ids(await r.choose_replicas(three, turn2(0.5))) == [["a"]]  # waits for a's slot
        # waited longer than its cache saves: the less loaded replicas, least loaded first
        ranks = await r.choose_replicas(three, turn2(2.5))
        assert [[x.replica_id.unique_id for x in rank] for rank in ranks] == [["a"], ["b", "c"]]
        for replica_ in (b, c):
            r.on_new_queue_len_info(replica_.replica_id, 3)  # every replica full
        assert ids(await r.choose_replicas(three, turn2(2.5))) == [["a"]]
        r.on_new_queue_len_info(b.replica_id, 0)  # 3 - 0 > 2: by load, at once
        ranks = await r.choose_replicas(three, turn2())
        assert len(ranks) == 1 and len(ranks[0]) == 2

        unbounded = setup(prefill_tokens_per_s=None)
        assert ids(await unbounded.choose_replicas(three, turn2(3600))) == [["a"]]
        return r.stats()

    assert run(go())["decisions"] == {"prefix": 3, "imbalanced": 1}


def test_the_replica_chosen_for_a_request_serves_that_request():
    """Serve's routing loop with requests waiting (every slot of the preferred replica taken):
    the replica found for one request goes to that request, not to the oldest waiting one
    (Serve's `FIFOMixin` would hand it over, and affinity would be lost whenever requests queue)."""

    async def go():
        a, b = probed_pair()
        r = make_router([a, b], imbalance_threshold=10, spill_when_full=False, prefill_tokens_per_s=None)
        key_of = {x.replica_id.unique_id: session_key_for(x, [a, b]) for x in (a, b)}
        a.queued = 3  # full: the request for `a` waits
        first = asyncio.ensure_future(r._choose_replica_for_request(pending([1], session=key_of["a"], rid="first")))
        await asyncio.sleep(0.2)
        assert not first.done()
        second = await asyncio.wait_for(
            r._choose_replica_for_request(pending([2], session=key_of["b"], rid="second")), 10
        )
        assert second is b and not first.done()
        a.queued = 0
        assert await asyncio.wait_for(first, 10) is a

    run(go())


def test_adapters_keep_serves_multiplex_preference():
    async def go():
        reps = [replica("a", multiplexed_model_ids={"news@1"}), replica("b"), replica("c")]
        r = make_router(reps)
        # whatever the session key says, an adapter request goes among the replicas holding it
        for key in map(str, range(20)):
            ranks = await r.choose_replicas(reps, pending([1], session=key, mux="news@1"))
            assert ids(ranks) == [["a"]]
        ranks = await r.choose_replicas(reps, pending([1], session="x"))
        assert len(ranks[0]) == 1  # base model requests use every replica

    run(go())


def test_other_calls_go_by_load(three):
    async def go():
        r = make_router(three)
        meta = RequestMetadata(request_id="h", internal_request_id="h")
        ranks = await r.choose_replicas(three, PendingRequest(args=[], kwargs={}, metadata=meta))
        assert len(ranks) == 1 and len(ranks[0]) == 2
        ranks = await r.choose_replicas(three, PendingRequest(args=[[[1, 2]], [[3]]], kwargs={}, metadata=meta))
        assert len(ranks[0]) == 2  # classify: a batch of prompts, by load

    run(go())


def test_replica_leaving_is_forgotten(three):
    async def go():
        r = make_router(three, block_tokens=4)
        p = pending(list(range(16)), rid="x")
        r.on_request_routed(p, three[0].replica_id, None)
        assert len(r.table) == 4
        r.update_replicas(three[1:])
        assert len(r.table) == 0

    run(go())


def test_config_selects_the_router():
    opts = app_options(ServiceConfig())["model"]
    assert opts["request_router_config"]["request_router_class"] == "deployments.routing.router:CacheAffinityRouter"
    assert (
        app_options(ServiceConfig.model_validate({"routing": {"policy": "power_of_two"}}))["model"].get(
            "request_router_config"
        )
        is None
    )
    ray_prefix = app_options(ServiceConfig.model_validate({"routing": {"policy": "ray_prefix"}}))["model"]
    assert ray_prefix["request_router_config"]["request_router_class"].endswith("PrefixCacheAffinityRouter")
    own = {"request_router_class": "x:Y"}
    assert (
        app_options(ServiceConfig.model_validate({"deployments": {"model": {"request_router_config": own}}}))["model"][
            "request_router_config"
        ]
        == own
    )
    # Ray's router reads a `prompt` string: one code point per token, so a character prefix is a token prefix
    g = GenerationRequest("r", [0, 5, 151_000], {})
    assert [ord(c) - 0x10000 for c in g.prompt] == [0, 5, 151_000]


def test_bench_workloads_grow_as_conversations_and_the_router_follows_them():
    """scripts/bench/routing.py's own pieces, on the embedded model's tokenizer (the bench
    model's): each turn's prompt extends the previous turn's (what a prefix cache can reuse),
    and the in-process router measurement routes the later turns by prefix."""
    from scripts.bench import routing

    opts = routing.parse_args(["--quick", "--model", "models/tiny-qwen3"])
    prompts, keys = routing.token_ids_of(opts)
    turns = opts.turns
    conv = [p for p, k in zip(prompts["multiturn"], keys["multiturn"], strict=True) if k == keys["multiturn"][0]]
    assert len(conv) == turns
    for a, b in itertools.pairwise(conv):
        assert b[: len(a) - 8] == a[: len(a) - 8]  # the next turn starts with this one (bar the generation prompt)
    assert len(set(keys["retrieval"])) == 1 and keys["retrieval"][0] is None  # no session key there
    # --context-titles: each conversation's own context, in its first turn only
    convs = routing.multiturn(2, 3, 2, 1, True, 0, context_titles=5)
    assert all(c.questions[0].startswith("我的资料") and not c.questions[1].startswith("我的资料") for c in convs)
    assert convs[0].questions[0].split("\n")[1:6] != convs[1].questions[0].split("\n")[1:6]
    stats = routing.router_cpu(prompts, 2, keys)
    later = stats["multiturn"]["decisions"].get("prefix", 0)
    assert later >= len(prompts["multiturn"]) - opts.sessions  # every turn after the first follows its prefix
    assert all(s["cpu_us_per_request"] is not None for s in stats.values())


def test_bench_report_renders_every_policy_and_workload():
    from scripts.bench import routing

    row = {
        "prefix_hit_rate": 0.5,
        "ttft_p50_ms": 100.0,
        "ttft_p95_ms": 200.0,
        "requests_per_s": 3.0,
        "output_tokens_per_s": 90.0,
        "requests_per_replica": [5.0, 4.0],
        "max_over_mean_load": 1.11,
    }
    report = {
        "options": {},
        "router_cpu": {},
        "policies": {"power_of_two": {"multiturn": row}, "cache_affinity": {"multiturn": {**row, "ttft_p50_ms": 60.0}}},
    }
    page = routing.html_report(report, "python -m scripts.bench.routing")
    assert page.count("<svg") == 3 and "cache_affinity" in page and "1.11" in page
    assert "0.60x" in routing.text_report(report)  # TTFT p50 against power of two, in one run


class _SlowChatServer:
    """A local stand-in for the service's streaming chat route: each answer after `delay_s`; it
    counts the requests in flight (and their peak) and keeps each one's last message, in order
    of arrival."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s, self.in_flight, self.peak, self.arrivals = delay_s, 0, 0, []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(x.split(b":")[1]) for x in head.split(b"\r\n") if x.lower().startswith(b"content-length"))
        sent = json.loads(await reader.readexactly(length))
        self.arrivals.append(sent["messages"][-1]["content"])
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        await asyncio.sleep(self.delay_s)
        self.in_flight -= 1
        events = [
            {"choices": [{"delta": {"content": "新闻"}}]},
            {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 1}},
        ]
        body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        data = body.encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            + f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
            + data
        )
        await writer.drain()
        writer.close()

    async def drive(self, convs, concurrency: int, **kw):
        """`routing.drive` against this server; (results, wall seconds)."""
        from scripts.bench import routing

        server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        async with server:
            return await asyncio.wait_for(routing.drive(url, "m", convs, concurrency, 4, **kw), 60)


def test_bench_open_loop_offers_the_same_arrivals_whatever_is_in_flight():
    """`--arrival-rate`: conversations start at the same Poisson times for every policy (equal
    offered load), and a slow service does not slow the arrivals (no client-side cap), unlike the
    closed loop, which never has more than `--concurrency` requests in flight."""
    from scripts.bench import routing

    times = routing.poisson_arrivals(2.0, 400, seed=3)
    assert times == routing.poisson_arrivals(2.0, 400, seed=3) and times != routing.poisson_arrivals(2.0, 400, seed=4)
    assert times[0] == 0 and all(b > a for a, b in itertools.pairwise(times))
    assert 0.4 < times[-1] / 399 < 0.6  # mean spacing 1 / rate
    with pytest.raises(SystemExit):
        routing.parse_args(["--arrival-rate", "0"])

    def run(rate):
        server = _SlowChatServer(0.3)  # a slow service
        convs = [routing.Conversation(f"c{i}", "", ["q"], session_key=False) for i in range(8)]
        results, _ = asyncio.run(server.drive(convs, 2, arrival_rate=rate, seed=0))
        return results, server.peak

    closed, closed_peak = run(None)
    opened, open_peak = run(200.0)  # 8 arrivals within ~40 ms, each served in 300 ms
    assert all(r.ok and r.ttft_s is not None for r in closed + opened) and len(closed) == len(opened) == 8
    assert closed_peak == 2 and open_peak >= 6, (closed_peak, open_peak)


def test_bench_think_time_pauses_between_turns_holding_no_slot():
    """`--think-time`: a conversation's turns are spaced by its own pauses (the same draws for
    every policy), and a pausing conversation holds no closed-loop slot, so others go on."""
    from scripts.bench import routing

    pauses = routing.think_times(200, 4, 2.0, seed=1)
    assert pauses == routing.think_times(200, 4, 2.0, seed=1) != routing.think_times(200, 4, 2.0, seed=2)
    assert all(len(p) == 3 for p in pauses) and 1.6 < statistics.mean(itertools.chain.from_iterable(pauses)) < 2.4
    assert routing.think_times(3, 4, 0.0, seed=1) == [[0.0] * 3] * 3
    with pytest.raises(SystemExit):
        routing.parse_args(["--think-time", "-1"])

    mean = 2.0
    pause = routing.think_times(2, 3, mean, seed=0)
    assert min(map(sum, pause)) > 1.0, pause  # these draws: each conversation pauses long enough to tell
    server = _SlowChatServer(0.05)
    convs = [routing.Conversation(c, "", [f"{c}1", f"{c}2", f"{c}3"], session_key=False) for c in "ab"]
    t0 = time.monotonic()
    results = asyncio.run(server.drive(convs, 1, seed=0, think_s=mean))[0]
    wall = time.monotonic() - t0
    assert len(results) == 6 and all(r.ok for r in results)
    for c in "ab":  # each conversation's turns in order
        assert [x for x in server.arrivals if x[0] == c] == [f"{c}1", f"{c}2", f"{c}3"], server.arrivals
    # each waited its own pauses; with one slot, had a pausing conversation held it, the two
    # conversations' pauses would have run one after the other (and the six answers too)
    assert max(sum(p) for p in pause) <= wall < sum(map(sum, pause)), (wall, pause)


def test_bench_repeats_alternate_the_order_and_pair_each_round():
    """`--repeats`: the policies' order alternates round by round; a ratio is taken within its
    round (a slow round slows both policies: its ratio is what the other rounds give), and the
    report gives each policy's medians and the ratios' median, min and max."""
    from scripts.bench import routing

    assert routing.round_orders(["power_of_two", "cache_affinity"], 3) == [
        ["power_of_two", "cache_affinity"],
        ["cache_affinity", "power_of_two"],
        ["power_of_two", "cache_affinity"],
    ]
    with pytest.raises(SystemExit):
        routing.parse_args(["--repeats", "0"])

    def fig(hit, ttft, rps, load, per_replica):
        return {
            "prefix_hit_rate": hit,
            "ttft_p50_ms": ttft,
            "ttft_p95_ms": 2 * ttft,
            "requests_per_s": rps,
            "output_tokens_per_s": 4 * rps,
            "max_over_mean_load": load,
            "requests_per_replica": per_replica,
        }

    rounds = [  # round 2 runs at half speed: its ratios are the others'
        {
            "power_of_two": {"m": fig(0.3, 1000, 1.0, 1.1, [1, 2])},
            "cache_affinity": {"m": fig(0.6, 500, 2.0, 1.0, [3])},
        },
        {"power_of_two": {"m": fig(0.4, 2000, 0.5, 1.3, [4])}, "cache_affinity": {"m": fig(0.6, 1000, 1.0, 1.2, [5])}},
        {"power_of_two": {"m": fig(0.2, 1000, 1.0, 1.2, [6])}, "cache_affinity": {"m": fig(0.6, 600, 1.5, 1.1, [7])}},
    ]
    ratios = routing.paired_ratios(rounds)
    hit = ratios["m"]["cache_affinity"]["prefix_hit_rate"]
    assert hit["rounds"] == [2.0, 1.5, 3.0] and (hit["median"], hit["min"], hit["max"]) == (2.0, 1.5, 3.0)
    ttft = ratios["m"]["cache_affinity"]["ttft_p50_ms"]
    assert ttft["rounds"] == [0.5, 0.5, 0.6] and ttft["median"] == 0.5
    assert set(ratios["m"]) == {"cache_affinity"}  # nothing against itself
    medians = routing.median_summary(rounds)
    p2 = medians["power_of_two"]["m"]
    assert p2["prefix_hit_rate"] == 0.3 and p2["ttft_p50_ms"] == 1000 and p2["rounds"] == 3
    assert p2["requests_per_replica"] == [6]  # from the round whose max/mean load is the median
    report = {"options": {}, "router_cpu": {}, "policies": medians, "rounds": rounds, "ratios": ratios}
    text = routing.text_report(report)
    assert (
        "medians over 3 rounds" in text and "| m | cache_affinity | 2.00x [1.50, 3.00] | 0.50x [0.50, 0.60] |" in text
    )
    assert routing.html_report(report, "python -m scripts.bench.routing --repeats 3").count("<svg") == 3


def test_a_conversation_stays_together_across_ingress_replicas(three):
    """Two ingress replicas (two routers, no shared state), a conversation's turns reaching them
    alternately, behind a system prompt every conversation shares: with its session key every
    turn lands on one replica; other conversations' first turns do not follow the system prompt
    to whichever replica happened to see it first."""

    async def go():
        routers = [make_router(three, block_tokens=4), make_router(three, block_tokens=4)]
        system = list(range(100, 116))
        # other conversations went through router 0 and taught it where the system prompt is
        for i in range(2):
            p = pending(system + [200 + i] * 8, rid=f"other{i}")
            ranks = await routers[0].choose_replicas(three, p)
            routers[0].on_request_routed(p, ranks[0][0].replica_id, None)
        history, chosen = list(system), []
        for turn in range(6):
            history += [10 + turn] * 6  # this turn's question (and the previous answer)
            router = routers[turn % 2]
            p = pending(list(history), session="conv-1", rid=f"t{turn}")
            ranks = await router.choose_replicas(three, p)
            assert len(ranks[0]) == 1, ids(ranks)
            router.on_request_routed(p, ranks[0][0].replica_id, None)
            chosen.append(ranks[0][0].replica_id.unique_id)
        assert len(set(chosen)) == 1, chosen
        expected = max(three, key=lambda r: rendezvous_score("conv-1", r.replica_id.unique_id)).replica_id.unique_id
        assert chosen[0] == expected
        return routers[0].stats(), routers[1].stats()

    first, second = run(go())
    assert first["decisions"].get("prefix", 0) >= 2  # its own earlier turns, past the shared prompt
    assert second["decisions"].get("session", 0) >= 1


def test_shared_prefix_ends_where_prompts_branch():
    t = PrefixTable(max_blocks=100)
    trunk = [1, 2, 3]
    t.insert(trunk + [10, 11], "A")
    assert t.shared(trunk + [10, 11], 5) == 0  # one prompt: nothing shared yet
    t.insert(trunk + [20], "B")
    assert t.shared(trunk + [10, 11], 5) == 3  # the two went on differently after block 3
    assert t.shared(trunk + [20], 4) == 3
    assert t.shared(trunk, 2) == 0


def test_a_waiting_request_starts_on_a_less_loaded_replica_after_its_cache_wait():
    """Serve's routing loop: the preferred replica stays full (long generations) while another
    has a free slot; the request waits about as long as its cached prefix saves, then starts on
    the other replica, long before the preferred one frees."""

    async def go():
        a, b = probed_pair()
        r = make_router([a, b], block_tokens=4, imbalance_threshold=10, prefill_tokens_per_s=40.0)
        history = list(range(20))  # 5 blocks of 4: 20 cached tokens, a 0.5 s prefill at 40 tokens/s
        r.on_request_routed(pending(history, rid="turn1"), a.replica_id, None)
        a.queued, b.queued = 3, 1
        r.on_new_queue_len_info(b.replica_id, 1)
        t0 = asyncio.get_running_loop().time()
        chosen = await asyncio.wait_for(r._choose_replica_for_request(pending(history + [7] * 4, rid="turn2")), 10)
        waited = asyncio.get_running_loop().time() - t0
        assert chosen is b and 0.4 <= waited < 5, waited

    run(go())


def test_prefill_speed_from_vllms_counters(monkeypatch):
    """Computed prompt tokens (not found cached) per second of request prefill time, per window;
    a thin window keeps the last figure; restarted counters start a new window; a failed
    reading keeps the last figure."""
    from deployments.routing import prefill
    from deployments.routing.prefill import STAT, PrefillSpeed, PrefillTotals

    s = PrefillSpeed()
    assert s.update(None) is None and s.update(PrefillTotals()) is None
    assert s.update(PrefillTotals(10_000, 2_000, 2.0, 10)) == 4_000.0  # 8,000 computed in 2 s
    assert s.update(PrefillTotals(10_500, 2_000, 2.5, 11)) == 4_000.0  # 0.5 s, 1 request: too thin
    assert (
        s.update(PrefillTotals(30_000, 12_000, 4.0, 20)) == 5_000.0
    )  # (20,000 - 10,000) / 2 s since the last full window
    assert s.update(PrefillTotals(100, 0, 0.1, 1)) == 5_000.0  # a new engine's counters: a new window
    assert s.update(PrefillTotals(1_100, 0, 1.1, 6)) == 1_000.0

    def broken():
        raise RuntimeError("registry")

    monkeypatch.setattr(prefill, "read_totals", broken)
    assert s.routing_stats() == {STAT: 1_000.0}
    assert PrefillSpeed().routing_stats() == {}


def test_the_wait_uses_the_preferred_replicas_measured_prefill_speed(three):
    """A replica's routing stats (its measured prefill speed) replace `prefill_tokens_per_s`:
    a fast engine's cache is not worth a long wait, a slow engine's is."""
    from deployments.routing.prefill import STAT

    a, b, c = three
    history = list(range(40))  # 10 blocks of 4 sent to `a`: 40 cached tokens

    async def ranks_after(wait_s: float, measured: float | None):
        a.routing_stats = {STAT: measured} if measured else {}
        r = make_router(three, block_tokens=4, prefill_tokens_per_s=1.0)  # 40 s without a measurement
        r.on_request_routed(pending(history, rid="t1"), a.replica_id, None)
        r.on_request_routed(pending(list(range(500, 540)), rid="o"), b.replica_id, None)
        for replica_, queued in ((a, 3), (b, 1), (c, 1)):
            r.on_new_queue_len_info(replica_.replica_id, queued)
        p = pending(history + [1] * 4, rid="t2")
        p.created_at -= wait_s
        return ids(await r.choose_replicas(three, p))

    try:
        assert run(ranks_after(1.0, None)) == [["a"]]  # 1 s of 40: waits
        assert run(ranks_after(1.0, 400.0)) == [["a"], ["b", "c"]]  # a 0.1 s prefill: waited enough
        assert run(ranks_after(1.0, 20.0)) == [["a"]]  # a 2 s prefill: waits
    finally:
        a.routing_stats = {}
