"""A deployment's Serve options: its class's defaults (`base_options`) with the config's
`deployments` section over them (`deployment_options`), and the app a replica serves."""

from __future__ import annotations

from typing import Any

from deployments.config import DeploymentName, ServiceConfig, deep_merge


def base_options(name: str, **options: Any) -> dict[str, Any]:
    """A deployment class's `DEFAULT_OPTIONS`: what all three share (one replica, structured JSON
    logs with request ids and never a prompt) with the class's own `options` over it."""
    return {"name": name, "logging_config": {"encoding": "JSON"}, "num_replicas": 1, **options}


def deployment_options(defaults: dict[str, Any], config: ServiceConfig, key: DeploymentName) -> dict[str, Any]:
    """A deployment class's DEFAULT_OPTIONS with `config.deployments[key]` deep-merged over them.

    An `autoscaling_config` replaces the default fixed `num_replicas` (Serve rejects both).
    """
    override = config.deployments.get(key, {})
    opts = deep_merge(defaults, override)
    if opts.get("autoscaling_config") and "num_replicas" not in override:
        opts.pop("num_replicas", None)
    return opts


def current_app_name(default: str = "llm") -> str:
    """The Serve application this replica belongs to (names the shared stats/limiter actors)."""
    try:
        from ray import serve

        return serve.get_replica_context().app_name or default
    except Exception:  # outside a Serve replica (unit tests, scripts)
        return default
