"""Builds the Serve application from a validated `ServiceConfig`.

`configs/serve_config.yaml` points `import_path` at `serve_app:build_app` and passes the
config as `args`. Each deployment class owns its default options; the config's `deployments`
section deep-merges over them; `accelerator` decides whether the model replica asks Ray for
a GPU.

    serve run configs/serve_config.yaml
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ray import serve
from ray.serve import Application

from deployments.config import ServiceConfig, deployment_options
from deployments.ingress import IngressRouter, app
from deployments.model_replica import ModelReplica
from deployments.tokenizer import PromptTokenizer

logger = logging.getLogger("ray.serve")


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


def model_options(config: ServiceConfig, accelerator: str) -> dict[str, Any]:
    opts = deployment_options(ModelReplica.DEFAULT_OPTIONS, config, "model")
    actor = opts.setdefault("ray_actor_options", {})
    actor["num_gpus"] = 1 if accelerator == "gpu" else 0
    return opts


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Serve application builder (`import_path: serve_app:build_app`)."""
    config = ServiceConfig.model_validate(args or {})
    accelerator = resolve_accelerator(config)
    cfg = config.model_dump(mode="json")

    tokenizer = serve.deployment(PromptTokenizer, **deployment_options(PromptTokenizer.DEFAULT_OPTIONS, config, "tokenizer"))
    model = serve.deployment(ModelReplica, **model_options(config, accelerator))
    ingress = serve.deployment(serve.ingress(app)(IngressRouter),
                               **deployment_options(IngressRouter.DEFAULT_OPTIONS, config, "ingress"))
    logger.info("building %s: accelerator=%s", config.model.model_id, accelerator)
    return ingress.bind(tokenizer.bind(cfg), model.bind(cfg), cfg)
