"""docs/security.md findings that are configuration, checked on the committed manifests:
S2 (API-key auth on in the KubeRay Serve config, keys from the mounted Secret) and S3 (the
admin routes need an admin key by default; runtime LoRA loads only from the adapter folder).
S10's manifest checks (read-only root filesystems, image digests) are in tests/test_kuberay.py."""

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
        assert any(cfg.auth.file.startswith(m["mountPath"].rstrip("/") + "/") and m.get("readOnly") for m in mounts), (
            f"{ray['name']}: {cfg.auth.file} is not on a read-only Secret mount"
        )
    # S3: plain keys are clients unless the operator says otherwise; the LoRA routes are admin routes
    assert cfg.auth.plain_keys_role == "client"
    assert {"/v1/load_lora_adapter", "/v1/unload_lora_adapter"} <= set(cfg.auth.admin_paths)


def test_s3_kuberay_runtime_lora_loads_only_from_the_adapter_folder_on_the_pvc():
    """S3: on KubeRay, POST /v1/load_lora_adapter reads only from /models/adapters (the model
    PVC, mounted read-only on every GPU worker), never from the image or a writable volume."""
    from deployments.config import ServiceConfig

    svc = _rayservice()
    app = next(a for a in yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"] if a["name"] == "llm")
    cfg = ServiceConfig.model_validate(app["args"])
    assert cfg.lora.allow_runtime_loading and cfg.lora.adapter_roots == ["/models/adapters"]
    for group in svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        ray = next(c for c in group["template"]["spec"]["containers"] if c["name"].startswith("ray"))
        mounts = [m for m in ray["volumeMounts"] if "/models/adapters/".startswith(m["mountPath"].rstrip("/") + "/")]
        assert mounts and all(m.get("readOnly") for m in mounts), (group["groupName"], mounts)
