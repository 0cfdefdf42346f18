"""The LLM-aware autoscaling policy (deployments/autoscaling.py) on synthetic metrics: its
decision function, the Serve policy object around it, Serve's own wrapper (bounds, delays)
applied to it, the replica's metrics and the config wiring. No Ray cluster: tests/
test_autoscaling.py shows the policy on a real one."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from deployments import autoscaling as a
from deployments.autoscaling import DEFAULTS, LLMAutoscalingPolicy, decide


def test_request_count_alone_is_serves_formula():
    # no engine signals: ceil(ongoing / target_ongoing_requests), as Serve's default policy
    assert decide(1, 2.0, 2)[0] == 1
    assert decide(1, 2.5, 2)[0] == 2
    assert decide(2, 6.0, 2)[0] == 3
    assert decide(3, 0.0, 2)[0] == 0  # Serve's bounds (min_replicas) apply afterwards


def test_few_long_requests_scale_out_on_kv_pressure():
    # two requests in flight (target 2: one replica is enough by count) fill 90 % of the KV cache
    desired, signals = decide(1, 2.0, 2, kv={"r1": 0.9}, waiting={"r1": 0.0}, running={"r1": 2.0})
    assert signals["requests"] == 1.0 and signals["kv"] == pytest.approx(0.9 / DEFAULTS["kv_cache_target"])
    assert desired == 2


def test_kv_signal_is_conserved_so_scale_in_only_when_the_rest_stays_below_target():
    kv_target = DEFAULTS["kv_cache_target"]
    # the same KV in use spread over 2 replicas still needs 2
    assert decide(2, 2.0, 2, kv={"r1": 0.45, "r2": 0.45})[0] == 2
    # half of it: one replica holds it below target -> 1
    assert decide(2, 1.0, 2, kv={"r1": 0.3, "r2": 0.3})[0] == 1
    # idle: the request count (0) and the KV (0) agree on the minimum
    assert decide(2, 0.0, 2, kv={"r1": 0.0, "r2": 0.0})[0] == 0
    # exactly at target is not one more (floating noise included)
    assert decide(1, 0.0, 2, kv={"r1": kv_target * (1 + 1e-9)})[0] == 1


def test_engine_waiting_requests():
    # 3 running + 2 waiting per replica: demand 5 over 3 a replica runs -> 2
    desired, signals = decide(1, 3.0, 2, kv={"r1": 0.5}, waiting={"r1": 2.0}, running={"r1": 3.0})
    assert signals["waiting"] == pytest.approx(5 / 3) and desired == 2
    # under the tolerance (0.5 per replica on average): no opinion
    _, signals = decide(
        2, 3.0, 2, kv={"r1": 0.1, "r2": 0.1}, waiting={"r1": 0.4, "r2": 0.4}, running={"r1": 1.0, "r2": 1.0}
    )
    assert signals["waiting"] is None
    # waiting while nothing runs (a stalled engine): one more
    assert decide(1, 1.0, 2, kv={"r1": 0.0}, waiting={"r1": 1.0}, running={"r1": 0.0}) == (
        2,
        {"requests": 0.5, "kv": 0.0, "waiting": 2, "ttft": None},
    )


def test_ttft_target_adds_one_and_holds_near_target():
    t = DEFAULTS["ttft_target_s"]
    assert decide(2, 1.0, 2, kv={"r1": 0.1, "r2": 0.1}, ttft_s=t * 1.5)[0] == 3  # above: +1
    assert decide(2, 1.0, 2, kv={"r1": 0.1, "r2": 0.1}, ttft_s=t * 0.8)[0] == 2  # close: hold
    assert decide(2, 1.0, 2, kv={"r1": 0.1, "r2": 0.1}, ttft_s=t * 0.2)[0] == 1  # far below
    assert decide(2, 1.0, 2, kv={"r1": 0.1, "r2": 0.1}, ttft_s=None)[0] == 1  # no first token
    assert decide(2, 1.0, 2, ttft_s=10.0, ttft_target_s=None)[0] == 1  # TTFT off
    assert decide(2, 1.0, 2, ttft_s=0.9, ttft_target_s=1.0, ttft_scale_in_ratio=1.0)[0] == 1


def test_windowed_mean_ttft_from_cumulative_totals():
    sums = [[(0, 1.0), (1, 1.0), (2, 1.6)], [(0, 5.0), (2, 5.2)], [(0, 3.0)]]
    counts = [[(0, 10), (1, 10), (2, 12)], [(0, 40), (2, 42)], [(0, 7)]]
    assert a.windowed_mean_ttft(sums, counts) == pytest.approx((0.6 + 0.2) / 4)
    assert a.windowed_mean_ttft([[(0, 1.0), (1, 1.0)]], [[(0, 3), (1, 3)]]) is None


def _ctx(
    current=1, target=1, total=2.0, kv=None, waiting=None, running=None, ttft=None, state=None, target_ongoing=2.0
):
    """A stand-in for Serve's AutoscalingContext (the attributes the policy reads)."""
    replicas = list(kv or {})
    tsv = lambda pts: [SimpleNamespace(timestamp=t, value=v) for t, v in pts]  # noqa: E731
    raw = (
        {a.TTFT_SUM: {r: tsv(ttft[r][0]) for r in ttft}, a.TTFT_COUNT: {r: tsv(ttft[r][1]) for r in ttft}}
        if ttft
        else {}
    )
    return SimpleNamespace(
        deployment_name="ModelReplica",
        current_num_replicas=current,
        target_num_replicas=target,
        total_num_requests=total,
        policy_state=state or {},
        raw_metrics=raw,
        aggregated_metrics={
            a.KV: kv or {},
            a.WAITING: waiting or {r: 0.0 for r in replicas},
            a.RUNNING: running or {r: 0.0 for r in replicas},
        }
        if kv
        else {},
        config=SimpleNamespace(get_target_ongoing_requests=lambda: target_ongoing),
    )


def test_policy_object_reads_serves_context_and_logs_changes(caplog):
    policy = LLMAutoscalingPolicy(kv_cache_target=0.5)
    with caplog.at_level(logging.INFO, logger="ray.serve"):
        desired, state = policy(_ctx(kv={"r1": 0.8}, total=1.9))
        assert desired == 2 and state["llm_lead"] == "kv"
        assert state["llm_signals"]["requests"] == pytest.approx(0.95)
        again, state = policy(_ctx(kv={"r1": 0.8}, total=1.9, state=state))
    lines = [r.getMessage() for r in caplog.records if "llm-autoscaling" in r.getMessage()]
    assert again == 2 and len(lines) == 1, lines  # logged once, on the change
    assert "ModelReplica wants 2 replicas (running 1, target 1; lead kv; requests=0.95, kv=1.60" in lines[0]

    # TTFT from the raw cumulative series of each replica: (1.4 s over 2 first tokens) > 0.5 s
    ttft = {"r1": ([(0, 0.0), (1, 1.4)], [(0, 0), (1, 2)])}
    desired, state = LLMAutoscalingPolicy()(_ctx(kv={"r1": 0.1}, total=1.0, ttft=ttft))
    assert desired == 2 and state["llm_lead"] == "ttft"
    # no engine metrics yet (a replica that has not reported): the request count decides
    assert LLMAutoscalingPolicy()(_ctx(total=3.0))[0] == 2
    # no running replica: Serve's cold start handles it; the policy keeps the target
    assert LLMAutoscalingPolicy()(_ctx(current=0, target=1, total=0.0))[0] == 1
    with pytest.raises(ValueError, match="unknown"):
        LLMAutoscalingPolicy(kv_target=0.5)


def test_serves_wrapper_applies_bounds_and_delays_to_the_policy():
    """Serve wraps every custom policy with its bounds, delays and scaling factors (Ray's own
    `_apply_autoscaling_config`, what the controller runs): the upscale delay must hold."""
    from ray.serve._private.common import DeploymentID
    from ray.serve.autoscaling_policy import _apply_autoscaling_config
    from ray.serve.config import AutoscalingConfig, AutoscalingContext

    cfg = AutoscalingConfig(
        min_replicas=1, max_replicas=3, target_ongoing_requests=2, upscale_delay_s=3600, downscale_delay_s=0
    )
    wrapped = _apply_autoscaling_config(LLMAutoscalingPolicy(kv_cache_target=0.5))

    def ctx(kv, state):
        return AutoscalingContext(
            deployment_id=DeploymentID(name="ModelReplica", app_name="llm"),
            deployment_name="ModelReplica",
            app_name="llm",
            current_num_replicas=1,
            target_num_replicas=1,
            running_replicas=["r1"],
            total_num_requests=2.0,
            total_queued_requests=0.0,
            aggregated_metrics={a.KV: {"r1": kv}, a.WAITING: {"r1": 0.0}, a.RUNNING: {"r1": 2.0}},
            raw_metrics={},
            capacity_adjusted_min_replicas=1,
            capacity_adjusted_max_replicas=3,
            policy_state=state,
            last_scale_up_time=None,
            last_scale_down_time=None,
            current_time=None,
            config=cfg,
        )

    n, state = wrapped(ctx(0.9, {}))
    assert n == 1 and state["llm_desired"] == 2  # wants 2, but the upscale delay has not passed
    cfg.upscale_delay_s = 0
    n, state = wrapped(ctx(0.9, state))
    assert n == 2


def test_replica_reports_vllm_figures():
    M = SimpleNamespace
    snap = [
        M(name="vllm:kv_cache_usage_perc", value=0.6),
        M(name="vllm:num_requests_waiting", value=1.0),
        M(name="vllm:num_requests_running", value=3.0),
        M(name="vllm:prompt_tokens", value=99.0),
        M(name="vllm:time_to_first_token_seconds", count=4, sum=0.8),
    ]
    assert a.engine_autoscaling_stats(snap) == {
        a.KV: 0.6,
        a.WAITING: 1.0,
        a.RUNNING: 3.0,
        a.TTFT_SUM: 0.8,
        a.TTFT_COUNT: 4.0,
    }
    # every value a number (Serve disables custom metrics that are not)
    assert all(isinstance(v, float) for v in a.engine_autoscaling_stats([]).values())


def test_config_selects_the_policy():
    import serve_app
    from deployments.config import ServiceConfig

    auto = {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 2}
    default = serve_app.app_options(ServiceConfig(deployments={"model": {"autoscaling_config": auto}}))
    assert "policy" not in default["model"]["autoscaling_config"]
    assert not a.uses_llm_policy(default["model"]["autoscaling_config"])

    cfg = ServiceConfig(
        autoscaling={"policy": "llm", "kv_cache_target": 0.6}, deployments={"model": {"autoscaling_config": auto}}
    )
    opts = serve_app.app_options(cfg)
    policy = opts["model"]["autoscaling_config"]["policy"]
    assert policy == {"policy_function": a.POLICY_FUNCTION, "policy_kwargs": {**DEFAULTS, "kv_cache_target": 0.6}}
    assert a.uses_llm_policy(opts["model"]["autoscaling_config"])
    # what serve.deployment builds from it: Serve imports and pickles the class, and the
    # controller instantiates it with the kwargs
    from ray.serve._private.autoscaling_state import _resolve_policy_callable
    from ray.serve.config import AutoscalingConfig

    built = AutoscalingConfig(**opts["model"]["autoscaling_config"])
    assert _resolve_policy_callable(built.policy).params["kv_cache_target"] == 0.6
    # a policy named in the deployment's own autoscaling_config wins; no autoscaling: nothing
    own = {**auto, "policy": {"policy_function": "ray.serve.autoscaling_policy:default_autoscaling_policy"}}
    opts = serve_app.app_options(
        ServiceConfig(autoscaling={"policy": "llm"}, deployments={"model": {"autoscaling_config": own}})
    )
    assert opts["model"]["autoscaling_config"]["policy"] == own["policy"]
    assert not a.uses_llm_policy(opts["model"]["autoscaling_config"])
    assert "autoscaling_config" not in serve_app.app_options(ServiceConfig(autoscaling={"policy": "llm"}))["model"]
    assert a.uses_llm_policy({"policy": "deployments.autoscaling.LLMAutoscalingPolicy"})
    assert a.uses_llm_policy({"policy": LLMAutoscalingPolicy})
