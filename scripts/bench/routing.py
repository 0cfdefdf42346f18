"""Cache-aware routing, measured (issue 28): the same workloads against the service with each
`routing.policy`, on several model replicas of a model whose prefill costs something
(scripts/build_bench_model.py), each policy in a fresh local cluster.

Workloads (all streaming chat, closed loop at `--concurrency` or open loop at `--arrival-rate`,
the same requests in the same order for every policy):

* `multiturn`: `--sessions` conversations of `--turns` turns: a long system prompt every
  conversation shares, then the conversation's history (its earlier questions and the model's
  answers) and a new question; a session's turns run one after the other, `--concurrency`
  sessions at a time. Sent with `prompt_cache_key` = the session id (`--no-session-keys`: not).
  `--think-time`: a user's pause between an answer and the next turn (open loop: many
  conversations open at once, their histories waiting in the KV caches between turns).
* `retrieval`: `--documents` long documents and many questions about them; each request is one
  document and one question, in random order.
* `classify`: the classifier's own shape (one short title after a shared instruction), the
  workload the service exists for: routing must cost it nothing.

Per policy and workload: TTFT p50/p95, requests/s and output tokens/s, vLLM's own prefix-cache
counters (hits / queries, from each replica's engine via /metrics) and each replica's share of
the requests (max / mean). And, in this process, the router's CPU per request: the real
`CacheAffinityRouter` fed the workloads' token ids, with as many fake replicas.

    .venv/bin/python -m scripts.bench.routing --out-dir reports/routing            # ~15 min here
    .venv/bin/python -m scripts.bench.routing --quick --policies power_of_two,cache_affinity

`--repeats N` runs the policies N rounds, in alternating order (A B, B A, A B, ...: a drift of
the machine's speed during the run weighs on every policy alike), and reports each policy's
figures as the median over the rounds and, against power of two, each round's ratio (taken
within the round) with their median, min and max: the verdict on a target is the ratios'
spread, not one run (power of two's own hit rate moves by ±0.1 between runs of one command).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from scripts.bench.client import poisson_arrivals
from scripts.bench.common import REPO
from scripts.bench.prompts import load_tnews
from scripts.bench.stats import percentile

TNEWS = REPO.parent / "shared" / "data" / "tnews" / "test.json"
BENCH_MODEL = REPO / "models" / "bench-qwen3"
POLICIES = ("power_of_two", "cache_affinity", "ray_prefix")


# --------------------------------------------------------------------------- workloads


@dataclass
class Conversation:
    """A sequence of turns sent one after the other; each turn's messages are built from the
    earlier turns' answers (`history`)."""

    key: str
    system: str
    questions: list[str]
    session_key: bool = True
    history: list[dict[str, str]] = field(default_factory=list)

    def messages(self, turn: int) -> list[dict[str, str]]:
        return [
            {"role": "system", "content": self.system},
            *self.history,
            {"role": "user", "content": self.questions[turn]},
        ]


def _texts(n: int, seed: int) -> list[str]:
    """News titles (the data set beside the repository), as filler text."""
    rng = random.Random(seed)
    lines = [json.loads(x)["sentence"] for x in TNEWS.read_text(encoding="utf-8").splitlines() if x.strip()]
    return [rng.choice(lines) for _ in range(n)]


def multiturn(
    sessions: int,
    turns: int,
    system_titles: int,
    question_titles: int,
    keys: bool,
    seed: int,
    context_titles: int = 0,
) -> list[Conversation]:
    """`sessions` conversations of `turns` turns after one shared system prompt; each turn asks
    about `question_titles` new titles. With `context_titles`, each conversation's first message
    also carries a context of its own (a user's pasted notes or retrieved document), so that a
    conversation's prefix is long from its first turn on, as in a chat over a document."""
    system = "你是新闻编辑助手。以下是今天的新闻摘要，回答时请参考：\n" + "\n".join(_texts(system_titles, seed))
    rng = random.Random(seed + 1)
    out = []
    for s in range(sessions):
        qs = [
            "\n".join(_texts(question_titles, rng.randrange(1 << 30))) + "\n这几条新闻属于哪一类？"
            for _ in range(turns)
        ]
        if context_titles:
            qs[0] = "我的资料：\n" + "\n".join(_texts(context_titles, rng.randrange(1 << 30))) + "\n" + qs[0]
        out.append(Conversation(f"session-{seed}-{s}", system, qs, keys))
    return out


def retrieval(documents: int, questions: int, doc_titles: int, seed: int) -> list[Conversation]:
    rng = random.Random(seed)
    docs = ["文档：\n" + "\n".join(_texts(doc_titles, seed * 7 + d)) for d in range(documents)]
    out = []
    for q in range(questions):
        d = rng.randrange(documents)
        question = _texts(1, seed * 13 + q)[0] + "——这条新闻和文档有关吗？"
        out.append(Conversation(f"retrieval-{q}", docs[d], [question], session_key=False))
    return out


def classify(n: int, seed: int) -> list[Conversation]:
    return [Conversation(f"classify-{i}", "", [p], session_key=False) for i, p in enumerate(load_tnews(TNEWS, n, seed))]


# --------------------------------------------------------------------------- client


@dataclass
class Result:
    ok: bool
    ttft_s: float | None
    latency_s: float
    prompt_tokens: int
    output_tokens: int
    status: int | None = None


async def one_turn(
    client: httpx.AsyncClient, url: str, model: str, conv: Conversation, turn: int, max_tokens: int
) -> Result:
    msgs = conv.messages(turn) if conv.system else [{"role": "user", "content": conv.questions[turn]}]
    body: dict[str, Any] = {
        "model": model,
        "messages": msgs,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if conv.session_key:
        body["prompt_cache_key"] = conv.key
    t0 = time.perf_counter()
    ttft, text, usage = None, [], {}
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return Result(False, None, time.perf_counter() - t0, 0, 0, r.status_code)
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj.get("usage"):
                usage = obj["usage"]
            for ch in obj.get("choices") or ():
                delta = (ch.get("delta") or {}).get("content")
                if delta:
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    text.append(delta)
    if conv.system:
        conv.history += [
            {"role": "user", "content": conv.questions[turn]},
            {"role": "assistant", "content": "".join(text)},
        ]
    return Result(
        True, ttft, time.perf_counter() - t0, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0), 200
    )


def think_times(convs: int, turns: int, mean_s: float, seed: int) -> list[list[float]]:
    """Each conversation's pauses before its 2nd, 3rd, … turn (a user reading the answer and
    typing the next question): exponential with mean `mean_s`, the same for every policy of a
    run. All zero when `mean_s` is 0."""
    rng = random.Random(f"think-{seed}")
    return [[rng.expovariate(1 / mean_s) if mean_s > 0 else 0.0 for _ in range(turns - 1)] for _ in range(convs)]


async def drive(
    url: str,
    model: str,
    convs: list[Conversation],
    concurrency: int,
    max_tokens: int,
    arrival_rate: float | None = None,
    seed: int = 0,
    think_s: float = 0.0,
) -> tuple[list[Result], float]:
    """Closed loop (`arrival_rate` None): every conversation at once, its turns in order, at most
    `concurrency` requests in flight (first come, first served): the conversations interleave, as
    many users' do. Open loop: conversation i starts at the i-th arrival of a Poisson process of
    `arrival_rate` per second (`poisson_arrivals`, the main bench's), its turns one after the other, whatever else is
    in flight — the offered load is the same for every policy, and the service's own admission
    (its slots and queue) is all that holds a request back. `think_s`: a conversation pauses
    between an answer and its next turn (`think_times`, holding no slot), so that many
    conversations are open at once and their histories must wait in the KV caches between turns,
    as real users' do."""
    results: list[Result] = []
    slots = asyncio.Semaphore(concurrency) if arrival_rate is None else None
    starts = poisson_arrivals(arrival_rate, len(convs), seed) if arrival_rate else [0.0] * len(convs)
    pauses = think_times(len(convs), max((len(c.questions) for c in convs), default=1), think_s, seed)
    connections = concurrency * 2 if slots is not None else len(convs) + 4
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=limits) as client:

        async def conversation(conv: Conversation, start: float, pause: list[float]) -> None:
            await asyncio.sleep(start)
            for turn in range(len(conv.questions)):
                if turn and pause[turn - 1]:
                    await asyncio.sleep(pause[turn - 1])
                async with slots or contextlib.nullcontext():
                    results.append(await one_turn(client, url, model, conv, turn, max_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(conversation(*args) for args in zip(convs, starts, pauses, strict=True)))
        return results, time.perf_counter() - t0


def engine_counters(url: str) -> dict[str, dict[str, float]]:
    """Each model replica's engine counters (vLLM's own, via the stats actor's /metrics)."""
    m = httpx.get(f"{url}/metrics", timeout=30).json()
    reps = ((m.get("engine") or {}).get("replicas")) or {}
    keys = ("prefix_cache_queries", "prefix_cache_hits", "requests_finished", "prompt_tokens")
    out = {rid: {k: float(e.get(k) or 0) for k in keys} for rid, e in reps.items()}
    for rid, e in reps.items():
        out[rid]["prefill_s"] = float((e.get("prefill_time_seconds") or {}).get("sum") or 0)
    return out


def summarize(results: Sequence[Result], wall_s: float, before: dict, after: dict) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    ttfts = sorted(r.ttft_s for r in ok if r.ttft_s is not None)
    delta = {rid: {k: after[rid][k] - before.get(rid, {}).get(k, 0.0) for k in after[rid]} for rid in after}
    queries = sum(d["prefix_cache_queries"] for d in delta.values())
    hits = sum(d["prefix_cache_hits"] for d in delta.values())
    per_replica = sorted((d["requests_finished"] for d in delta.values()), reverse=True)
    prefill_s = sum(d.get("prefill_s", 0.0) for d in delta.values())
    computed = sum(d["prompt_tokens"] for d in delta.values()) - hits
    mean = sum(per_replica) / len(per_replica) if per_replica else 0
    return {
        "requests": len(results),
        "ok": len(ok),
        "ttft_p50_ms": round(1000 * percentile(ttfts, 50), 1) if ttfts else None,
        "ttft_p95_ms": round(1000 * percentile(ttfts, 95), 1) if ttfts else None,
        "requests_per_s": round(len(ok) / wall_s, 3),
        "output_tokens_per_s": round(sum(r.output_tokens for r in ok) / wall_s, 1),
        "prompt_tokens_mean": round(sum(r.prompt_tokens for r in ok) / len(ok), 1) if ok else None,
        "prefix_hit_rate": round(hits / queries, 4) if queries else None,
        "requests_per_replica": per_replica,
        "max_over_mean_load": round(per_replica[0] / mean, 3) if mean else None,
        # about what the model replicas report to the routers (deployments/routing/prefill.py,
        # which counts vLLM's cached prompt tokens where this counts prefix-cache hits)
        "prefill_tokens_per_s": round(computed / prefill_s) if prefill_s else None,
        "wall_s": round(wall_s, 1),
    }


# --------------------------------------------------------------------------- router CPU


@dataclass
class FakeReplica:
    """The attributes of Serve's `RunningReplica` the router and its mixins read (the router's
    logic without a cluster: here and in tests/test_routing.py)."""

    replica_id: Any
    max_ongoing_requests: int = 3
    multiplexed_model_ids: set[str] = field(default_factory=set)
    node_id: str = "node"
    availability_zone: str | None = None
    routing_stats: dict[str, Any] = field(default_factory=dict)

    async def get_queue_len(self, *, deadline_s: float) -> int:
        return 0


def router_cpu(
    workloads: dict[str, list[list[int]]], replicas: int, sessions: dict[str, list[str | None]]
) -> dict[str, Any]:
    """The real `CacheAffinityRouter` in this process with `replicas` fake replicas, fed every
    workload's token ids (as the ingress hands them to it): its thread CPU per request."""
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata
    from ray.serve.request_router import PendingRequest, ReplicaID

    from deployments.api.protocol import GenerationRequest
    from deployments.routing.router import CacheAffinityRouter

    async def run() -> dict[str, Any]:
        dep = DeploymentID(name="ModelReplica", app_name="bench")
        fakes = [FakeReplica(ReplicaID(unique_id=f"r{i}", deployment_id=dep)) for i in range(replicas)]
        out = {}
        for name, prompts in workloads.items():
            router = CacheAffinityRouter(
                deployment_id=dep, handle_source=DeploymentHandleSource.REPLICA, use_replica_queue_len_cache=True
            )
            router.initialize_state()
            router.update_replicas(fakes)
            for i, (ids, key) in enumerate(zip(prompts, sessions[name], strict=True)):
                meta = RequestMetadata(request_id=str(i), internal_request_id=str(i))
                p = PendingRequest(args=[GenerationRequest(str(i), ids, {}, session=key)], kwargs={}, metadata=meta)
                ranks = await router.choose_replicas(fakes, p)
                router.on_request_routed(p, ranks[0][0].replica_id, None)
            out[name] = router.stats()
        return out

    return asyncio.run(run())


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--replicas", type=int, default=2, help="model replicas (one engine thread each)")
    p.add_argument("--ingress-replicas", type=int, default=1, help="ingress replicas (each routes on its own)")
    p.add_argument("--concurrency", type=int, default=6, help="closed-loop workers (= replicas x 3 slots)")
    p.add_argument("--sessions", type=int, default=24)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--system-titles", type=int, default=24, help="news titles in the shared system prompt")
    p.add_argument("--question-titles", type=int, default=6, help="news titles per question")
    p.add_argument(
        "--context-titles", type=int, default=0, help="news titles of each conversation's own context (first turn)"
    )
    p.add_argument("--documents", type=int, default=4)
    p.add_argument("--doc-titles", type=int, default=40)
    p.add_argument("--questions", type=int, default=48)
    p.add_argument("--classify", type=int, default=60)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--no-session-keys", action="store_true", help="multiturn without prompt_cache_key")
    p.add_argument("--workloads", default="multiturn,retrieval,classify")
    p.add_argument("--model", default=str(BENCH_MODEL))
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument(
        "--kv-blocks",
        type=int,
        default=240,
        help="each engine's KV cache, in vLLM blocks (128 tokens on CPU): room for about half the "
        "conversations, as on a busy GPU (the CPU engine's default would hold them all many times)",
    )
    p.add_argument(
        "--accelerator",
        choices=("cpu", "gpu", "auto"),
        default="cpu",
        help="the model replicas' `accelerator`: `gpu` on a node with a GPU per replica (a CUDA "
        "build of vLLM; --kv-blocks then counts the GPU's 16-token blocks)",
    )
    p.add_argument(
        "--arrival-rate",
        type=float,
        default=None,
        help="open loop: conversations (a request each, for retrieval and classify) started per "
        "second, Poisson, the same times for every policy (equal offered load); --concurrency then "
        "does not apply. Default: closed loop at --concurrency",
    )
    p.add_argument(
        "--think-time",
        type=float,
        default=0.0,
        help="mean seconds (exponential, the same draws for every policy) a conversation waits "
        "between an answer and its next turn, holding no slot: many conversations open at once, "
        "their histories waiting in the KV caches. Default 0: the next turn at once",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="rounds of every policy, in alternating order; the report gives medians over them and "
        "each round's ratios to power of two",
    )
    p.add_argument("--quick", action="store_true", help="a short run: fewer sessions and requests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=REPO / "reports" / "routing")
    p.add_argument("--startup-timeout", type=float, default=600)
    opts = p.parse_args(argv)
    if opts.repeats < 1:
        p.error("--repeats must be at least 1")
    if opts.arrival_rate is not None and opts.arrival_rate <= 0:
        p.error("--arrival-rate must be positive")
    if opts.think_time < 0:
        p.error("--think-time must not be negative")
    if opts.quick:
        opts.sessions, opts.turns, opts.questions, opts.classify = 6, 3, 12, 12
    return opts


def make_workloads(opts: argparse.Namespace) -> dict[str, list[Conversation]]:
    wanted = opts.workloads.split(",")
    out: dict[str, list[Conversation]] = {}
    if "multiturn" in wanted:
        out["multiturn"] = multiturn(
            opts.sessions,
            opts.turns,
            opts.system_titles,
            opts.question_titles,
            not opts.no_session_keys,
            opts.seed,
            opts.context_titles,
        )
    if "retrieval" in wanted:
        out["retrieval"] = retrieval(opts.documents, opts.questions, opts.doc_titles, opts.seed)
    if "classify" in wanted:
        out["classify"] = classify(opts.classify, opts.seed)
    return out


def policy_config(policy: str) -> dict[str, Any]:
    """`routing` settings for a `--policies` entry: a policy name, then `+field=value` options
    (`cache_affinity+spill_when_full=false`), so variants of one policy compare in one run."""
    import yaml

    from deployments.routing.config import RoutingConfig

    name, *options = policy.split("+")
    routing: dict[str, Any] = {"policy": name}
    for option in options:
        field, _, value = option.partition("=")
        routing[field] = yaml.safe_load(value)
    RoutingConfig.model_validate(routing)  # a typo fails here, not after the first policy's run
    return routing


def service_config(opts: argparse.Namespace, policy: str) -> dict[str, Any]:
    """A Serve config file's content for the bench model on `opts.replicas` model replicas."""
    args = {
        "model": {"model_id": "bench-qwen3", "model_source": str(Path(opts.model).resolve())},
        "engine": {
            "enable_prefix_caching": True,
            "max_model_len": opts.max_model_len,
            # a cache that holds what a GPU's would in proportion: not every conversation twice
            "extra": {"num_gpu_blocks_override": opts.kv_blocks},
        },
        "limits": {"max_tokens_cap": 256, "max_messages": 256},
        "routing": policy_config(policy),
        "accelerator": opts.accelerator,
        "deployments": {
            "model": {"num_replicas": opts.replicas, "max_ongoing_requests": 3},
            "ingress": {"num_replicas": opts.ingress_replicas, "autoscaling_config": None},
            "tokenizer": {"num_replicas": 1, "autoscaling_config": None},
        },
    }
    return {
        "proxy_location": "EveryNode",
        "http_options": {},
        "applications": [{"name": "llm", "route_prefix": "/", "args": args}],
    }


def run_policy(opts: argparse.Namespace, policy: str, out_dir: Path) -> dict[str, Any]:
    import yaml

    from scripts.bench.servers import Servers

    cfg_path = out_dir / f"serve_{policy}.yaml"
    cfg_path.write_text(yaml.safe_dump(service_config(opts, policy)))
    ns = argparse.Namespace(
        serve_config=cfg_path,
        model=opts.model,
        served_model_name="bench-qwen3",
        gpu_memory_utilization=None,
        serve_override=service_config(opts, policy)["applications"][0]["args"],
        keep_autoscaling=True,
        max_ongoing=[3],
        ray_num_cpus=8,
        ours_env={},
        vllm_env={},
        vllm_args="",
        startup_timeout=opts.startup_timeout,
    )
    servers = Servers(ns, out_dir, f"routing-{policy}")
    try:
        url = servers.start_ours(3, 64)
        # every replica answers once before the clock starts (first-request costs)
        warm = [Conversation(f"warm-{i}", "", ["预热"], False) for i in range(opts.replicas * 4)]
        asyncio.run(drive(url, "bench-qwen3", warm, opts.replicas * 3, 2))
        out: dict[str, Any] = {}
        for name, convs in make_workloads(opts).items():
            time.sleep(2.5)  # the replicas' engine counters reach /metrics once a second
            before = engine_counters(url)
            results, wall = asyncio.run(
                drive(
                    url,
                    "bench-qwen3",
                    convs,
                    opts.concurrency,
                    opts.max_tokens,
                    arrival_rate=opts.arrival_rate,
                    seed=opts.seed,
                    think_s=opts.think_time if name == "multiturn" else 0.0,
                )
            )
            time.sleep(2.5)
            out[name] = summarize(results, wall, before, engine_counters(url))
            if opts.arrival_rate:
                out[name]["offered_conversations_per_s"] = opts.arrival_rate
            if opts.think_time and name == "multiturn":
                out[name]["think_time_mean_s"] = opts.think_time
            print(f"[routing] {policy:>14} {name:>9}: {json.dumps(out[name])}", file=sys.stderr, flush=True)
        return out
    finally:
        servers.stop()


def token_ids_of(opts: argparse.Namespace) -> tuple[dict[str, list[list[int]]], dict[str, list[str | None]]]:
    """The workloads' prompts as the ingress tokenizes them (the chat template), turn by turn,
    with a fixed stand-in answer per turn (the router sees the prompts only)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(opts.model)
    prompts: dict[str, list[list[int]]] = {}
    keys: dict[str, list[str | None]] = {}
    for name, convs in make_workloads(opts).items():
        turns = max(len(c.questions) for c in convs)  # interleaved, as `drive` sends them, roughly
        order = [(c, t) for t in range(turns) for c in convs if t < len(c.questions)]
        prompts[name], keys[name] = [], []
        for conv, turn in order:
            msgs = conv.messages(turn) if conv.system else [{"role": "user", "content": conv.questions[turn]}]
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            prompts[name].append(tok(text, add_special_tokens=False)["input_ids"])
            keys[name].append(conv.key if conv.session_key else None)
            if conv.system:
                conv.history += [
                    {"role": "user", "content": conv.questions[turn]},
                    {"role": "assistant", "content": "新闻"},
                ]
    return prompts, keys


def round_orders(policies: Sequence[str], repeats: int) -> list[list[str]]:
    """The order of the policies in each round: as given, then reversed, alternately."""
    return [list(policies) if r % 2 == 0 else list(policies)[::-1] for r in range(repeats)]


RATIO_KEYS = ("prefix_hit_rate", "ttft_p50_ms", "ttft_p95_ms", "requests_per_s")
BASE_POLICY = "power_of_two"


def median_summary(rounds: Sequence[dict[str, dict[str, dict[str, Any]]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per policy and workload, the median over the rounds of every numeric figure (lists, such
    as the requests per replica, are taken from the round whose max/mean load is the median)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for policy in rounds[0]:
        for wl in rounds[0][policy]:
            runs = [rnd[policy][wl] for rnd in rounds if wl in rnd.get(policy, {})]
            merged: dict[str, Any] = {}
            for key, value in runs[0].items():
                values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
                if isinstance(value, (int, float)) and len(values) == len(runs):
                    merged[key] = round(statistics.median(values), 4)
            by_load = sorted(runs, key=lambda r: r.get("max_over_mean_load") or 0)
            for key, value in by_load[len(by_load) // 2].items():
                merged.setdefault(key, value)
            merged["rounds"] = len(runs)
            out.setdefault(policy, {})[wl] = merged
    return out


def paired_ratios(
    rounds: Sequence[dict[str, dict[str, dict[str, Any]]]], base: str = BASE_POLICY
) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """Workload -> policy -> figure -> {"rounds": [each round's policy / base], "median", "min",
    "max"}: ratios taken within a round (the same cluster's speed, minutes apart), for every
    policy but `base` and every figure both have."""
    out: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for rnd in rounds:
        ref = rnd.get(base) or {}
        for policy, res in rnd.items():
            if policy == base:
                continue
            for wl, figures in res.items():
                b = ref.get(wl) or {}
                for key in RATIO_KEYS:
                    if figures.get(key) and b.get(key):
                        cell = out.setdefault(wl, {}).setdefault(policy, {}).setdefault(key, {"rounds": []})
                        cell["rounds"].append(round(figures[key] / b[key], 3))
    for per_policy in out.values():
        for per_key in per_policy.values():
            for cell in per_key.values():
                r = cell["rounds"]
                cell.update(median=round(statistics.median(r), 3), min=min(r), max=max(r))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    if not Path(opts.model).exists():
        print(f"[routing] building the bench model at {opts.model}", file=sys.stderr, flush=True)
        from scripts.build_bench_model import main as build

        build(["--out", str(opts.model)])
    out_dir = opts.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"options": {k: str(v) for k, v in vars(opts).items()}, "policies": {}}
    prompts, keys = token_ids_of(opts)
    report["router_cpu"] = router_cpu(prompts, opts.replicas, keys)
    print(f"[routing] router CPU: {json.dumps(report['router_cpu'])}", file=sys.stderr, flush=True)
    policies = opts.policies.split(",")
    rounds: list[dict[str, dict[str, Any]]] = []
    for r, order in enumerate(round_orders(policies, opts.repeats)):
        round_dir = out_dir / f"round{r + 1}" if opts.repeats > 1 else out_dir
        round_dir.mkdir(parents=True, exist_ok=True)
        results = {}
        for policy in order:
            results[policy] = run_policy(opts, policy, round_dir)
        rounds.append({p: results[p] for p in policies})
        report["rounds"] = rounds
        report["policies"] = rounds[0] if len(rounds) == 1 else median_summary(rounds)
        report["ratios"] = paired_ratios(rounds)
        (out_dir / "routing.json").write_text(json.dumps(report, indent=2))
        if opts.repeats > 1:
            print(
                f"[routing] round {r + 1}/{opts.repeats}: {json.dumps(report['ratios'])}", file=sys.stderr, flush=True
            )
    print(text_report(report))
    (out_dir / "routing.txt").write_text(text_report(report))
    (out_dir / "report.html").write_text(html_report(report, " ".join(sys.argv)))
    return 0


COLUMNS = (
    ("prefix hit rate", "prefix_hit_rate"),
    ("TTFT p50 ms", "ttft_p50_ms"),
    ("TTFT p95 ms", "ttft_p95_ms"),
    ("requests/s", "requests_per_s"),
    ("output tokens/s", "output_tokens_per_s"),
    ("requests per replica", "requests_per_replica"),
    ("max/mean load", "max_over_mean_load"),
)


def html_report(report: dict[str, Any], command: str) -> str:
    """report.html: a table per workload and bar charts of hit rate, TTFT p50 and requests/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scripts.bench.report import _environment, _svg

    pol = report["policies"]
    workloads = sorted({w for p in pol.values() for w in p})
    tables = [
        (wl, [[name, *(res[wl].get(k) for _, k in COLUMNS)] for name, res in pol.items() if wl in res])
        for wl in workloads
    ]
    plots = []
    for label, key in (
        ("prefix hit rate", "prefix_hit_rate"),
        ("TTFT p50 (ms)", "ttft_p50_ms"),
        ("requests/s", "requests_per_s"),
    ):
        fig, ax = plt.subplots(figsize=(7, 3))
        width = 0.8 / max(1, len(pol))
        for i, (name, res) in enumerate(pol.items()):
            xs = [j + i * width for j in range(len(workloads))]
            ax.bar(xs, [(res.get(wl) or {}).get(key) or 0 for wl in workloads], width, label=name)
        ax.set_xticks([j + width * (len(pol) - 1) / 2 for j in range(len(workloads))], workloads)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
        plots.append((label, _svg(fig)))
    template = _environment().get_template("routing.html.j2")
    return template.render(
        command=command,
        headers=["policy", *(h for h, _ in COLUMNS)],
        tables=tables,
        plots=plots,
        router_cpu=json.dumps(report.get("router_cpu"), indent=2),
        options=json.dumps(report.get("options"), indent=2),
    )


def text_report(report: dict[str, Any]) -> str:
    lines = []
    pol = report["policies"]
    base = pol.get("power_of_two", {})
    n_rounds = len(report.get("rounds") or [])
    for wl in sorted({w for p in pol.values() for w in p}):
        lines.append(f"\n{wl}" + (f" (medians over {n_rounds} rounds)" if n_rounds > 1 else ""))
        lines.append(
            "| policy | prefix hit rate | TTFT p50 ms | TTFT p95 ms | req/s | out tok/s | max/mean load | TTFT p50 vs power of two |"
        )
        lines.append("|---|---|---|---|---|---|---|---|")
        for name, res in pol.items():
            r = res.get(wl)
            if not r:
                continue
            b = base.get(wl) or {}
            ratio = (r["ttft_p50_ms"] / b["ttft_p50_ms"]) if b.get("ttft_p50_ms") and r.get("ttft_p50_ms") else None
            lines.append(
                f"| {name} | {r['prefix_hit_rate']} | {r['ttft_p50_ms']} | {r['ttft_p95_ms']} | {r['requests_per_s']} | "
                f"{r['output_tokens_per_s']} | {r['max_over_mean_load']} | {f'{ratio:.2f}x' if ratio else '-'} |"
            )
    rounds = report.get("rounds") or []
    if len(rounds) > 1:
        lines.append(f"\nratios to power of two over {len(rounds)} rounds (each round's own; median [min, max])")
        lines.append("| workload | policy | prefix hit rate | TTFT p50 | TTFT p95 | req/s |")
        lines.append("|---|---|---|---|---|---|")
        for wl, per_policy in (report.get("ratios") or {}).items():
            for name, cells in per_policy.items():
                row = [
                    f"{c['median']:.2f}x [{c['min']:.2f}, {c['max']:.2f}]" if (c := cells.get(k)) else "-"
                    for k in RATIO_KEYS
                ]
                lines.append(f"| {wl} | {name} | " + " | ".join(row) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
