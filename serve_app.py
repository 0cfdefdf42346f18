"""Builds the Serve application from a validated `ServiceConfig`.

`configs/serve_config.yaml` points `import_path` at `serve_app:build_app` and passes the
config as `args`. Each deployment class owns its default options; `app_options` merges the
config's `deployments` section over them, once, and the builder hands each deployment what it
needs of the result (the ingress: the model deployment's options, for its capacity gate).

    serve run configs/serve_config.yaml

The request path, in the order a request takes it: `deployments/ingress.py` →
`deployments/tokenizer.py` → `deployments/model_replica.py`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ray import serve
from ray.serve import Application

from deployments.config import DeploymentName, ServiceConfig
from deployments.config_env import load_config
from deployments.engine.output_parsing import check_parser_names
from deployments.ingress import IngressRouter, app
from deployments.model_replica import ModelReplica
from deployments.options import deployment_options
from deployments.tokenizer import PromptTokenizer, tokenizer_class_path

logger = logging.getLogger("ray.serve")

# Serve's default: how long a stopping replica waits for its requests (not counting the
# drain loop). Ours is derived from the request deadline in `app_options`.
SHUTDOWN_MARGIN_S = 10.0

DEPLOYMENTS: dict[DeploymentName, type[IngressRouter] | type[PromptTokenizer] | type[ModelReplica]] = {
    "ingress": IngressRouter,
    "tokenizer": PromptTokenizer,
    "model": ModelReplica,
}


def resolve_accelerator(config: ServiceConfig) -> str:
    """`auto` → `gpu` when the Ray cluster has GPU resources now, else `cpu`.

    `LLM_SERVE_ACCELERATOR=gpu|cpu` overrides `auto` at start. Clusters whose GPU workers
    autoscale from zero (KubeRay) set `accelerator: gpu` explicitly: nothing to detect there.
    """
    if config.accelerator != "auto":
        return config.accelerator
    env = os.environ.get("LLM_SERVE_ACCELERATOR", "").lower()
    if env in ("gpu", "cpu"):
        return env
    import ray

    if not ray.is_initialized():
        ray.init(address="auto", ignore_reinit_error=True, log_to_driver=False)
    return "gpu" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"


def app_options(config: ServiceConfig, accelerator: str = "cpu") -> dict[str, dict[str, Any]]:
    """Each deployment's Serve options, computed once: the class's `DEFAULT_OPTIONS` with
    `config.deployments[name]` deep-merged over them. Derived here, not restated:

    - the model replica asks Ray for one GPU when `accelerator` is `gpu`, for none on `cpu`;
    - `graceful_shutdown_timeout_s` (where the config leaves it unset) is
      `limits.request_timeout_s` + `SHUTDOWN_MARGIN_S`: a replica stopping on redeploy or
      downscale lets every request it holds reach its own deadline instead of being killed;
    - with `autoscaling.policy: llm`, the model deployment's `autoscaling_config.policy` is the
      LLM-aware policy (deployments/autoscaling.py), unless that config names a policy itself;
    - the model deployment's `request_router_config` is `routing.policy`'s router
      (deployments/routing), unless `deployments.model` sets one itself.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, cls in DEPLOYMENTS.items():
        opts = deployment_options(cls.DEFAULT_OPTIONS, config, name)
        if name in ("ingress", "model"):
            opts.setdefault("graceful_shutdown_timeout_s", config.limits.request_timeout_s + SHUTDOWN_MARGIN_S)
        out[name] = opts
    policy = config.autoscaling.policy_options()
    model_auto = out["model"].get("autoscaling_config")
    if policy is not None and model_auto and "policy" not in model_auto:
        model_auto["policy"] = policy
    router = config.routing.request_router_config()
    if router is not None:
        out["model"].setdefault("request_router_config", router)
    actor = out["model"].setdefault("ray_actor_options", {})
    actor["num_gpus"] = 1 if accelerator == "gpu" else 0
    return out


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Serve application builder (`import_path: serve_app:build_app`)."""
    config = load_config(args)  # the YAML args, then the environment (LLM_SERVE__…, the old names)
    check_parser_names(config.model.tool_call_parser, config.model.reasoning_parser)
    accelerator = resolve_accelerator(config)
    options = app_options(config, accelerator)
    cfg = config.model_dump(mode="json")

    tokenizer = serve.deployment(PromptTokenizer, **options["tokenizer"])
    model = serve.deployment(ModelReplica, **options["model"])
    ingress = serve.deployment(serve.ingress(app)(IngressRouter), **options["ingress"])
    logger.info("building %s: accelerator=%s", config.model.model_id, accelerator)
    tokenizer_class = tokenizer_class_path(config.model.resolved_tokenizer())
    return ingress.bind(tokenizer.bind(cfg, tokenizer_class), model.bind(cfg, options["model"]), cfg, options["model"])
