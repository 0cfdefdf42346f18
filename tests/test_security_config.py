"""docs/security.md findings that are configuration, checked on the committed manifests:
S2 (API-key auth on in the KubeRay Serve config, keys from the mounted Secret) and S3 (the
admin routes need an admin key by default)."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _rayservice() -> dict:
    docs = [d for d in yaml.safe_load_all((REPO / "kuberay" / "base" / "rayservice.yaml").read_text()) if d]
    return next(d for d in docs if d.get("kind") == "RayService")


def test_s2_kuberay_serve_config_turns_auth_on_with_the_mounted_secret():
    from deployments.config import ServiceConfig

    svc = _rayservice()
    serve_cfg = yaml.safe_load(svc["spec"]["serveConfigV2"])
    app = next(a for a in serve_cfg["applications"] if a["name"] == "llm")
    cfg = ServiceConfig.model_validate(app["args"])
    assert cfg.auth.enabled and cfg.auth.file
    # the keys file lies in a Secret volume mounted read-only on every container that runs the ingress
    cluster = svc["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        secrets = {v["name"]: v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
        ray = next(c for c in pod["containers"] if c["name"].startswith("ray"))
        mounts = [m for m in ray.get("volumeMounts", []) if m["name"] in secrets]
        assert any(cfg.auth.file.startswith(m["mountPath"].rstrip("/") + "/") and m.get("readOnly") for m in mounts), \
            f"{ray['name']}: {cfg.auth.file} is not on a read-only Secret mount"
    # S3: plain keys are clients unless the operator says otherwise; the LoRA routes are admin routes
    assert cfg.auth.plain_keys_role == "client"
    assert {"/v1/load_lora_adapter", "/v1/unload_lora_adapter"} <= set(cfg.auth.admin_paths)
