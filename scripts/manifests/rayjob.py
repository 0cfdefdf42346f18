"""The KubeRay RayJob that runs the batch classifier, from the RayService's sources
(`python scripts/gen_kuberay.py` writes it with the other manifests).

One source: the job's Ray cluster is the RayService's ``rayClusterConfig`` (head + GPU worker
group, image, model PVC; ``kuberay/base/rayservice.yaml``) and its service config is the one the
RayService deploys (``configs/serve_config.yaml`` + ``kuberay/serve-overrides.yaml``, through
``scripts/manifests/rayservice.py``), passed to ``batch/classify.py`` as ``LLM_SERVE_BATCH_ARGS``.
What the job adds: every GPU worker pod up for the run (one engine actor per GPU), a
ReadWriteMany data volume at ``/data`` on every pod (input ``/data/input``, output
``/data/output``: the workers write the shards), and retries that resume from the finished
shards (``backoffLimit``). The file lives outside ``kuberay/`` so that ``kubectl apply -k
kuberay/`` never starts a job.
"""

from __future__ import annotations

import copy
import difflib
import json
import shlex
from typing import Any

import yaml

from scripts.manifests import rayservice as gen

REPO = gen.REPO
RAYJOB = REPO / "cluster" / "kuberay" / "rayjob-classify.yaml"
DATA_CLAIM = "llm-serve-batch-data"
DATA_MOUNT = "/data"
JOB_ARGS = ["/data/input", "--out", "/data/output", "--text-field", "sentence", "--id-field", "id"]


def _add_data_volume(template: dict[str, Any]) -> None:
    spec = template["spec"]
    spec.setdefault("volumes", []).append({"name": "batch-data", "persistentVolumeClaim": {"claimName": DATA_CLAIM}})
    for c in spec["containers"]:
        c.setdefault("volumeMounts", []).append({"name": "batch-data", "mountPath": DATA_MOUNT})


def submitter_template(cluster: dict[str, Any]) -> dict[str, Any]:
    """The pod KubeRay runs `ray job submit` in (K8sJobMode; KubeRay fills in the command): the
    head's image, pod security and resources of KubeRay's default submitter, a read-only root with
    /tmp writable (the job CLI's tempfile use) and no service-account token (it talks to the
    dashboard over HTTP, with the Ray token KubeRay injects)."""
    head = cluster["headGroupSpec"]["template"]
    ray_container = head["spec"]["containers"][0]
    return {
        "metadata": {
            "labels": {"app.kubernetes.io/name": "llm-serve", "app.kubernetes.io/component": "batch-classify-submitter"}
        },
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "securityContext": copy.deepcopy(head["spec"]["securityContext"]),
            "containers": [
                {
                    "name": "ray-job-submitter",
                    "image": ray_container["image"],
                    "imagePullPolicy": ray_container.get("imagePullPolicy", "IfNotPresent"),
                    "env": [{"name": "PYTHONDONTWRITEBYTECODE", "value": "1"}],
                    "resources": {
                        "requests": {"cpu": "500m", "memory": "200Mi"},
                        "limits": {"cpu": "1", "memory": "1Gi"},
                    },
                    "securityContext": copy.deepcopy(ray_container["securityContext"]),
                    "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                }
            ],
            "volumes": [{"name": "tmp", "emptyDir": {}}],
        },
    }


def rayjob() -> dict[str, Any]:
    """The RayJob object (checked against the service config it runs)."""
    cfg = gen.serve_config("gpu")
    service = yaml.safe_load(gen.render_env_blocks(gen.render_rayservice(gen.RAYSERVICE.read_text(), cfg)))
    gen.check_consistency(service, cfg, "gpu")  # model and adapters on the GPU workers' volumes
    cluster = copy.deepcopy(service["spec"]["rayClusterConfig"])
    engines = 0
    for group in cluster["workerGroupSpecs"]:
        gpus = int(group.get("rayStartParams", {}).get("num-gpus", "0"))
        if gpus:
            group["replicas"] = group["minReplicas"] = group["maxReplicas"]  # every GPU for the run
            engines += group["maxReplicas"] * gpus
        _add_data_volume(group["template"])
        for c in group["template"]["spec"]["containers"]:
            # the service's /health/ready: no Serve on the batch cluster (KubeRay's raylet probe)
            c.pop("readinessProbe", None)
    _add_data_volume(cluster["headGroupSpec"]["template"])
    args = gen.app_args(cfg)
    entry = [
        "python",
        "-m",
        "batch.classify",
        *JOB_ARGS,
        "--concurrency",
        str(engines),
        "--num-gpus",
        "1",
        "--no-progress",
    ]
    runtime_env = {"env_vars": {"LLM_SERVE_BATCH_ARGS": json.dumps(args, sort_keys=True, separators=(",", ":"))}}
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {
            "name": "llm-serve-classify",
            "namespace": "llm-serve",
            "labels": {
                "app.kubernetes.io/name": "llm-serve",
                "app.kubernetes.io/part-of": "llm-serve",
                "app.kubernetes.io/component": "batch-classify",
            },
        },
        "spec": {
            "entrypoint": shlex.join(entry),
            "runtimeEnvYAML": yaml.safe_dump(runtime_env, sort_keys=True, width=10_000),
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 3600,
            "backoffLimit": 2,  # a retry resumes: finished shards are kept in /data/output
            "submitterPodTemplate": submitter_template(cluster),
            "rayClusterSpec": cluster,
        },
    }


def render() -> str:
    header = gen.HEADER.format(
        sources="kuberay/base/rayservice.yaml + configs/serve_config.yaml + kuberay/serve-overrides.yaml"
    ) + (
        "# Batch classification of an archive (batch/classify.py) on the RayService's cluster shape:\n"
        f"# one vLLM engine per GPU. Needs a ReadWriteMany PVC {DATA_CLAIM!r} holding the input at /data/input;\n"
        "# the output lands in /data/output. Input, fields and paths: edit JOB_ARGS in scripts/manifests/rayjob.py.\n"
        "#   kubectl apply -n llm-serve -f cluster/kuberay/rayjob-classify.yaml\n"
    )
    return header + yaml.dump(rayjob(), Dumper=gen._BlockDumper, sort_keys=False, allow_unicode=True, width=100)


def stale() -> str:
    """A unified diff when the committed file differs from the generated one ('' when not)."""
    have = RAYJOB.read_text() if RAYJOB.exists() else ""
    want = render()
    rel = str(RAYJOB.relative_to(REPO))
    return "".join(
        difflib.unified_diff(have.splitlines(True), want.splitlines(True), f"{rel} (committed)", f"{rel} (generated)")
    )
