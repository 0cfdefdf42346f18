"""The RayService's derived parts (scripts/gen_kuberay.py writes them): its `serveConfigV2`, the
CPU overlay's patch, the fast-path environment and readiness probes of its containers, the
one-box config and the PrometheusRule — each from the repository's single sources, and every
generated Serve config checked (Ray's `ServeDeploySchema`, the service's `ServiceConfig`, its fit
with the cluster spec) before anything is written."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonpatch
import yaml

from cluster.haproxy_wrapper import fast_path_env
from deployments.admission.client_address import PROXY_SECRET_ENV
from deployments.config import ServiceConfig, deep_merge

REPO = Path(__file__).resolve().parents[2]
SERVE_CONFIG = REPO / "configs" / "serve_config.yaml"
KUBERAY = REPO / "kuberay"
BASE = KUBERAY / "base"
RAYSERVICE = BASE / "rayservice.yaml"
PROD_OVERRIDES = KUBERAY / "serve-overrides.yaml"
CPU_DIR = KUBERAY / "overlays" / "cpu"
CPU_OVERRIDES = CPU_DIR / "serve-overrides.yaml"
CPU_PATCH = CPU_DIR / "rayservice-patch.yaml"
ONEBOX_OVERRIDES = REPO / "cluster" / "onebox" / "serve-overrides.yaml"
ONEBOX_CONFIG = REPO / "configs" / "one-box.yaml"
ALERTS = REPO / "monitoring" / "alerts.yaml"
ENGINE_ALERTS = REPO / "monitoring" / "engine_alerts.yaml"
PROMETHEUS_RULE = BASE / "monitoring" / "prometheusrule.yaml"

# Where `pip install -e .` puts console scripts in the rayproject/ray image (cluster/Dockerfile).
IMAGE_HAPROXY = "/home/ray/anaconda3/bin/llm-serve-haproxy"

# ----------------------------------------------------------------------------- read-only root
# Every container runs with `readOnlyRootFilesystem: true`. The paths the Ray containers write
# (found by reading the installed Ray 2.60 / Serve / vLLM 0.32 / torch 2.13 / Triton / huggingface
# packages, not by guessing) are emptyDir volumes; a few writers are pointed into them by
# environment variables (WRITABLE_ENV). HOME itself cannot be a volume: the app (/home/ray/app)
# and Python (/home/ray/anaconda3) live there. check_consistency() and tests/test_kuberay.py
# hold every Ray container to this list.
RAY_HOME = "/home/ray"  # HOME of the image's user `ray` (uid 1000)
WRITABLE_PATHS: dict[str, str] = {
    "/tmp": "tempfile.gettempdir(): vLLM's ZMQ IPC sockets (VLLM_RPC_BASE_PATH); Serve's HAProxy "
    "(RAY_SERVE_HAPROXY_*: /tmp/haproxy-serve/haproxy.cfg, admin.sock, metrics.sock, server-state, "
    "and llm-serve-haproxy's haproxy.cfg.client-addr beside them); torch inductor's default cache "
    "(/tmp/torchinductor_ray); tiktoken's cache; multiprocessing",
    "/tmp/ray": "Ray's temp dir (RAY_TMPDIR unset): session dirs, logs (KubeRay shares this `ray-logs` "
    "volume with the autoscaler sidecar), sockets, runtime envs, plasma fallback, spilled objects",
    "/dev/shm": "Ray's object store (plasma) and vLLM/torch shared memory (medium: Memory)",
    f"{RAY_HOME}/.cache": "XDG cache: vLLM's VLLM_CACHE_ROOT (torch.compile cache, modelinfos, startup plans, "
    "DeepGEMM), FlashInfer's JIT cache, HF_HOME (transformers' dynamic modules), numba, "
    "matplotlib, torch extensions; Triton (TRITON_HOME) and CUDA's JIT cache "
    "(CUDA_CACHE_PATH) are pointed here",
    f"{RAY_HOME}/.config": "XDG config: vLLM's VLLM_CONFIG_ROOT (usage_stats.json, do_not_track), matplotlib",
}
# The emptyDir volume behind each writable path (`ray-logs` is the name KubeRay itself uses, so
# its autoscaler sidecar mounts the same volume).
WRITABLE_VOLUMES: dict[str, str] = {
    "/tmp": "tmp",
    "/tmp/ray": "ray-logs",
    "/dev/shm": "dshm",
    f"{RAY_HOME}/.cache": "home-cache",
    f"{RAY_HOME}/.config": "home-config",
}
WRITABLE_ENV: dict[str, str] = {
    "PYTHONDONTWRITEBYTECODE": "1",  # no __pycache__ beside the app's sources
    "HF_HOME": f"{RAY_HOME}/.cache/huggingface",  # the default, stated
    "TRITON_HOME": f"{RAY_HOME}/.cache",  # Triton's ~/.triton (cache, dumps)
    "CUDA_CACHE_PATH": f"{RAY_HOME}/.cache/nv/ComputeCache",  # CUDA's JIT cache, default ~/.nv
}
# The autoscaler sidecar (`ray kuberay-autoscaler`) writes its monitor logs to /tmp/ray (KubeRay
# mounts `ray-logs` there) and may use tempfile: /tmp.
AUTOSCALER_WRITABLE = {"/tmp": "tmp"}
ENV_BEGIN = "# BEGIN GENERATED fast-path env"
ENV_END = "# END GENERATED fast-path env"

APP_NAME = "llm"
SERVE_PORT = 8000

# Probes (docs/reliability.md). A worker pod takes client traffic (the serve Service) only while
# the service can serve through it: `/health/ready` via the pod's own Serve proxy answers 200
# when the model, the tokenizer, the default model and every configured adapter can serve, and
# fails while the pod has no proxy (no replica on it yet) — the check KubeRay's default worker
# readiness (raylet + proxy `/-/healthz`) makes, plus the service's own. Its liveness stays
# KubeRay's (the raylet): a pod must not be restarted because the *service* is not ready (that
# would kill its model replica), and a worker has no proxy while it holds no replica. The head
# keeps KubeRay's probes: KubeRay submits serveConfigV2 only once the head pod is Ready, so
# its readiness cannot wait for the application (and a Not-Ready head leaves the head
# Service); `/health/live` is for load balancers and uptime checks outside the cluster.
PROBE_BEGIN = "# BEGIN GENERATED readiness probe"
PROBE_END = "# END GENERATED readiness probe"
WORKER_READINESS_PROBE: dict[str, Any] = {
    "httpGet": {"path": "/health/ready", "port": SERVE_PORT},
    "periodSeconds": 10,
    "timeoutSeconds": 8,  # > health.check_timeout_s (check_consistency)
    "failureThreshold": 3,
    "successThreshold": 1,
}
BEGIN = "  # BEGIN GENERATED serveConfigV2"
END = "  # END GENERATED serveConfigV2"
HEADER = "# GENERATED by scripts/gen_kuberay.py from {sources}; do not edit (tests fail on drift).\n"


class ConfigError(ValueError):
    """A generated config that would not work on the cluster it is for."""


# ----------------------------------------------------------------------------- merging


def apply_overrides(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Top-level keys merge into the Serve config; `applications` (a mapping by name) merges
    into the application of that name. The code base's one merge (`deep_merge`): dicts merge,
    anything else replaces, a None value deletes the key."""
    overrides = dict(overrides or {})
    app_overrides = overrides.pop("applications", {}) or {}
    out = deep_merge(config, overrides)
    apps = out.get("applications", [])
    names = [a.get("name") for a in apps]
    for name, app_override in app_overrides.items():
        if name not in names:
            raise ConfigError(f"overrides name application {name!r}; the Serve config has {names}")
        i = names.index(name)
        apps[i] = deep_merge(apps[i], app_override)
    return out


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def serve_config(variant: str = "gpu") -> dict[str, Any]:
    """The Serve config a variant deploys (validated against Ray's and the service's schemas)."""
    overrides = {"gpu": PROD_OVERRIDES, "cpu": CPU_OVERRIDES, "onebox": ONEBOX_OVERRIDES}[variant]
    cfg = apply_overrides(load_yaml(SERVE_CONFIG), load_yaml(overrides) or {})
    validate_serve_config(cfg)
    return cfg


def validate_serve_config(cfg: dict[str, Any]) -> None:
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(cfg)
    for app in cfg["applications"]:
        if app.get("import_path") == "serve_app:build_app":
            ServiceConfig.model_validate(app.get("args") or {})


def app_args(cfg: dict[str, Any], name: str = APP_NAME) -> dict[str, Any]:
    return next(a for a in cfg["applications"] if a["name"] == name).get("args") or {}


# ----------------------------------------------------------------------------- rendering


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings as literal blocks (`|`), so embedded configs stay readable."""


def _str_representer(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str_representer)


def dump_serve_config(cfg: dict[str, Any]) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True, width=100, default_flow_style=False)


def render_rayservice(text: str, cfg: dict[str, Any]) -> str:
    """`text` (rayservice.yaml) with the block between the markers replaced."""
    lines = text.splitlines(keepends=True)
    try:
        b = next(i for i, l in enumerate(lines) if l.startswith(BEGIN))
        e = next(i for i, l in enumerate(lines) if l.startswith(END))
    except StopIteration:
        raise ConfigError(f"{RAYSERVICE.relative_to(REPO)}: generated-block markers missing") from None
    body = "".join("    " + l if l.strip() else "\n" for l in dump_serve_config(cfg).splitlines(keepends=True))
    block = [lines[b], "  serveConfigV2: |\n", body]
    return "".join(lines[:b] + block + lines[e:])


# The HAProxy-to-ingress secret comes from a Secret the operator creates once (docs/kuberay.md):
#   kubectl create secret generic llm-serve-proxy --from-literal=secret=$(openssl rand -hex 32)
# optional, so pods start without it; the ingress then ignores HAProxy's client addresses and
# says so in its log (clients without an API key share one budget).
PROXY_SECRET_REF = {"secretKeyRef": {"name": "llm-serve-proxy", "key": "secret", "optional": True}}


def flow(value: dict) -> str:
    """`value` as one line of YAML flow style."""
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6).strip()


def fast_path_entries() -> list[dict]:
    """The Ray containers' `env` entries for Serve's fast path, as `make run` sets them (the
    secret by reference, never a value in the manifest)."""
    env = fast_path_env(binary=IMAGE_HAPROXY, secret="-" * 32)
    return [
        {"name": k, "valueFrom": PROXY_SECRET_REF} if k == PROXY_SECRET_ENV else {"name": k, "value": v}
        for k, v in env.items()
    ]


def render_env_blocks(text: str) -> str:
    """`text` with every fast-path env block (between ENV_BEGIN and ENV_END) regenerated."""
    entries = fast_path_entries()

    def block(m: re.Match) -> str:
        indent = m.group(1)
        body = "".join(
            f"{indent}- {{name: {e['name']}, "
            + (f"value: {json.dumps(e['value'])}}}\n" if "value" in e else f"valueFrom: {flow(e['valueFrom'])}}}\n")
            for e in entries
        )
        return f"{indent}{ENV_BEGIN}\n{body}{indent}{ENV_END}\n"

    out, n = re.subn(rf"^([ ]*){re.escape(ENV_BEGIN)}\n.*?^[ ]*{re.escape(ENV_END)}\n", block, text, flags=re.M | re.S)
    if n == 0:
        raise ConfigError(f"{RAYSERVICE.relative_to(REPO)}: no `{ENV_BEGIN}` markers in the containers' env")
    return out


def render_probe_blocks(text: str) -> str:
    """`text` with every worker readiness probe block (PROBE_BEGIN … PROBE_END) regenerated."""

    def block(m: re.Match) -> str:
        indent = m.group(1)
        return f"{indent}{PROBE_BEGIN}\n{indent}readinessProbe: {flow(WORKER_READINESS_PROBE)}\n{indent}{PROBE_END}\n"

    out, n = re.subn(
        rf"^([ ]*){re.escape(PROBE_BEGIN)}\n.*?^[ ]*{re.escape(PROBE_END)}\n", block, text, flags=re.M | re.S
    )
    if n == 0:
        raise ConfigError(f"{RAYSERVICE.relative_to(REPO)}: no `{PROBE_BEGIN}` markers in the worker containers")
    return out


def writable_volumes(shm_size: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, volumeMounts) for WRITABLE_PATHS: emptyDirs, /dev/shm in memory up to `shm_size`
    (KubeRay's own default is the container's memory)."""
    volumes, mounts = [], []
    for path, name in WRITABLE_VOLUMES.items():
        volumes.append(
            {"name": name, "emptyDir": {"medium": "Memory", "sizeLimit": shm_size} if path == "/dev/shm" else {}}
        )
        mounts.append({"name": name, "mountPath": path})
    return volumes, mounts


def writable_env() -> list[dict[str, str]]:
    return [{"name": k, "value": v} for k, v in WRITABLE_ENV.items()]


def cpu_patch(cfg: dict[str, Any]) -> str:
    """JSON patch (RFC 6902) turning the GPU RayService into a CPU-only one."""
    head_volumes, head_mounts = writable_volumes("3Gi")
    security = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
        "readOnlyRootFilesystem": True,
    }
    pod_security = {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": 100,
        "fsGroup": 100,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    worker_volumes, worker_mounts = writable_volumes("4Gi")
    env = [
        {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"},
        {"name": "VLLM_NO_USAGE_STATS", "value": "1"},
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        {"name": "TRANSFORMERS_OFFLINE", "value": "1"},
        *writable_env(),
        *fast_path_entries(),
    ]
    worker = {
        "groupName": "cpu",
        "replicas": 1,
        "minReplicas": 1,
        "maxReplicas": 2,
        "rayStartParams": {"num-cpus": "2", "num-gpus": "0", "metrics-export-port": "8080"},
        "template": {
            "metadata": {
                "labels": {"app.kubernetes.io/name": "llm-serve", "app.kubernetes.io/component": "ray-cpu-worker"}
            },
            "spec": {
                "automountServiceAccountToken": False,
                "securityContext": pod_security,
                "containers": [
                    {
                        "name": "ray-worker",
                        "image": "llm-serve:0.1.0",
                        "imagePullPolicy": "IfNotPresent",
                        "ports": [
                            {"name": "serve", "containerPort": SERVE_PORT, "protocol": "TCP"},
                            {"name": "metrics", "containerPort": 8080, "protocol": "TCP"},
                        ],
                        "env": env,
                        "envFrom": [{"secretRef": {"name": "llm-serve-env", "optional": True}}],
                        "resources": {
                            "requests": {"cpu": "2", "memory": "4Gi"},
                            "limits": {"cpu": "2", "memory": "4Gi"},
                        },
                        "securityContext": security,
                        "volumeMounts": worker_mounts,
                        "readinessProbe": copy.deepcopy(WORKER_READINESS_PROBE),
                    }
                ],
                "volumes": worker_volumes,
            },
        },
    }
    head = "/spec/rayClusterConfig/headGroupSpec/template/spec"
    ops = [
        {"op": "replace", "path": "/spec/serveConfigV2", "value": dump_serve_config(cfg)},
        {
            "op": "replace",
            "path": f"{head}/containers/0/resources",
            "value": {"requests": {"cpu": "1", "memory": "3Gi"}, "limits": {"cpu": "2", "memory": "3Gi"}},
        },
        {"op": "replace", "path": "/spec/rayClusterConfig/headGroupSpec/rayStartParams/num-cpus", "value": "2"},
        {"op": "replace", "path": f"{head}/containers/0/volumeMounts", "value": head_mounts},
        {"op": "replace", "path": f"{head}/volumes", "value": head_volumes},
        {"op": "replace", "path": "/spec/rayClusterConfig/workerGroupSpecs", "value": [worker]},
    ]
    header = HEADER.format(sources="configs/serve_config.yaml + kuberay/overlays/cpu/serve-overrides.yaml") + (
        "# JSON patch (RFC 6902) of the RayService for a cluster without GPUs: the CPU Serve config,\n"
        "# a small head, one CPU worker group (1-2 pods) and no model PVC (the image has the tiny model).\n"
    )
    return header + yaml.dump(ops, Dumper=_BlockDumper, sort_keys=False, allow_unicode=True, width=100)


def prometheus_rule() -> str:
    groups = [g for path in (ALERTS, ENGINE_ALERTS) for g in load_yaml(path)["groups"]]
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "llm-serve-alerts", "labels": {"app.kubernetes.io/name": "llm-serve"}},
        "spec": {"groups": groups},
    }
    header = HEADER.format(sources="monitoring/alerts.yaml + monitoring/engine_alerts.yaml") + (
        "# The service's alert rules (HighQueueLength, HighTTFT, ...; the engine's: KV cache,\n"
        "# preemptions, GPU memory, restarts, p95 latency) for the prometheus-operator.\n"
        "# Add the label your Prometheus' ruleSelector expects (e.g. release: kube-prometheus-stack).\n"
    )
    return header + yaml.safe_dump(rule, sort_keys=False, allow_unicode=True, width=100)


# ----------------------------------------------------------------------------- consistency


def _containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    return template.get("spec", {}).get("containers", [])


def _mounted(template: dict[str, Any], path: str) -> bool:
    mounts = [m["mountPath"].rstrip("/") for c in _containers(template) for m in c.get("volumeMounts", [])]
    return any(path == m or path.startswith(m + "/") for m in mounts)


def read_only_root_errors(template: dict[str, Any], ray_containers: bool = True) -> list[str]:
    """What keeps a pod template from running on a read-only root filesystem: a container (or
    init container) without `readOnlyRootFilesystem: true`; with `ray_containers`, a container
    without an emptyDir at each WRITABLE_PATHS path (/dev/shm in memory) or without WRITABLE_ENV."""
    spec = template.get("spec", {})
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    errors = []
    for c in [*spec.get("initContainers", []), *spec.get("containers", [])]:
        if (c.get("securityContext") or {}).get("readOnlyRootFilesystem") is not True:
            errors.append(f"container {c['name']} lacks securityContext.readOnlyRootFilesystem: true")
        if not ray_containers:
            continue
        mounts = {m["mountPath"].rstrip("/") or "/": m for m in c.get("volumeMounts", [])}
        for path in WRITABLE_PATHS:
            m = mounts.get(path)
            empty = volumes.get(m["name"], {}).get("emptyDir") if m else None
            if m is None or m.get("readOnly") or empty is None:
                errors.append(f"container {c['name']}: {path} is not a writable emptyDir mount")
            elif path == "/dev/shm" and empty.get("medium") != "Memory":
                errors.append(f"container {c['name']}: /dev/shm must be an emptyDir with medium: Memory")
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        missing = [k for k, v in WRITABLE_ENV.items() if env.get(k) != v]
        if missing:
            errors.append(
                f"container {c['name']} lacks {', '.join(missing)} (scripts/manifests/rayservice.py WRITABLE_ENV)"
            )
    return errors


def check_consistency(rayservice: dict[str, Any], cfg: dict[str, Any], variant: str) -> None:
    """The Serve config fits the cluster it is deployed on."""
    args = ServiceConfig.model_validate(app_args(cfg))
    cluster = rayservice["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    workers = cluster.get("workerGroupSpecs", [])
    errors = []
    if cfg.get("http_options", {}).get("port") != SERVE_PORT:
        errors.append(f"http_options.port must be {SERVE_PORT} (the serve Service's target port)")
    if cfg.get("http_options", {}).get("host") != "0.0.0.0":
        errors.append("http_options.host must be 0.0.0.0 (pods serve the Service)")
    want_env = {e["name"]: e.get("value", e.get("valueFrom")) for e in fast_path_entries()}
    for group in [head, *workers]:
        for c in _containers(group["template"]):
            have = {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}
            if any(have.get(k) != v for k, v in want_env.items()):
                errors.append(f"container {c['name']} lacks the fast-path environment (configs/fast-path.env)")
        errors += read_only_root_errors(group["template"])
    scaler = cluster.get("autoscalerOptions") or {}
    if cluster.get("enableInTreeAutoscaling"):
        if (scaler.get("securityContext") or {}).get("readOnlyRootFilesystem") is not True:
            errors.append("autoscalerOptions.securityContext lacks readOnlyRootFilesystem: true")
        head_volumes = {v["name"] for v in head["template"]["spec"].get("volumes", [])}
        have = {m["mountPath"]: m["name"] for m in scaler.get("volumeMounts", [])}
        for path, name in AUTOSCALER_WRITABLE.items():
            if have.get(path) != name or name not in head_volumes:
                errors.append(f"autoscalerOptions.volumeMounts lacks {path} (the head's {name} volume)")
    model = args.deployments.get("model", {})
    auto = model.get("autoscaling_config") or {}
    if auto.get("target_ongoing_requests", 2) > model.get("max_ongoing_requests", 3):
        errors.append("model autoscaling target_ongoing_requests exceeds max_ongoing_requests")
    if variant == "gpu":
        if args.accelerator != "gpu":
            errors.append("production must set accelerator: gpu (GPU workers autoscale from zero)")
        if head.get("rayStartParams", {}).get("num-gpus") != "0":
            errors.append("the head group must advertise num-gpus: 0")
        gpu_groups = [w for w in workers if w.get("rayStartParams", {}).get("num-gpus", "0") != "0"]
        if not gpu_groups:
            errors.append("no GPU worker group")
        gpu_slots = sum(w["maxReplicas"] * int(w["rayStartParams"]["num-gpus"]) for w in gpu_groups)
        if auto.get("max_replicas", 1) > gpu_slots:
            errors.append(
                f"model max_replicas {auto.get('max_replicas')} > GPUs the worker groups can provide ({gpu_slots})"
            )
        lora = getattr(args, "lora", None)
        adapters = dict(getattr(lora, "adapters", None) or {})
        for w in gpu_groups:
            roots = list(getattr(lora, "adapter_roots", None) or []) if args.lora.allow_runtime_loading else []
            for what, path in [
                ("model_source", args.model.model_source),
                *((f"LoRA adapter {n}", p) for n, p in adapters.items()),
                *(("lora.adapter_roots entry", r) for r in roots),
            ]:
                if not path.startswith("/") or not _mounted(w["template"], path):
                    errors.append(f"{what} {path} is not on a volume of worker group {w['groupName']}")
        tok = args.model.tokenizer_source or args.model.model_source
        if not _mounted(head["template"], tok):
            errors.append(f"tokenizer files {tok} are not on a volume of the head")
    if errors:
        raise ConfigError(f"{variant} serve config does not fit the RayService:\n  - " + "\n  - ".join(errors))


def check_probes(rayservice: dict[str, Any], cfg: dict[str, Any], variant: str) -> None:
    """The RayService's worker containers carry WORKER_READINESS_PROBE, whose timeout exceeds
    the service's own check deadline. (Not the RayJob's copy of the cluster: no Serve there.)"""
    args = ServiceConfig.model_validate(app_args(cfg))
    errors = []
    for w in rayservice["spec"]["rayClusterConfig"].get("workerGroupSpecs", []):
        for c in _containers(w["template"]):
            probe = c.get("readinessProbe")
            if probe != WORKER_READINESS_PROBE:
                errors.append(f"worker container {c['name']} lacks the /health/ready readiness probe")
            elif probe["timeoutSeconds"] <= args.health.check_timeout_s:
                errors.append("the readiness probe's timeoutSeconds must exceed health.check_timeout_s")
    if errors:
        raise ConfigError(f"{variant} RayService probes:\n  - " + "\n  - ".join(errors))


def apply_json_patch(doc: Any, ops: list[dict[str, Any]]) -> Any:
    """RFC 6902 (the overlays' JSON patches) on a copy of `doc`, which shares nothing with `ops`
    (jsonpatch inserts the op values themselves). A bad op (a missing member to replace or
    remove, an unknown op) raises `jsonpatch.JsonPatchException`."""
    return jsonpatch.apply_patch(doc, copy.deepcopy(ops))
