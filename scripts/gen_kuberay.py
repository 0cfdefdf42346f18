#!/usr/bin/env python3
"""Generate the KubeRay manifests' derived parts from the repo's single sources of truth.

    python scripts/gen_kuberay.py           # rewrite what is stale
    python scripts/gen_kuberay.py --check   # exit 1 (with a diff) when anything is stale
    python scripts/gen_kuberay.py --print [--variant cpu]   # the Serve config, as deployed

What is generated, and from what:

* ``kuberay/base/rayservice.yaml``: the ``serveConfigV2`` block between its BEGIN/END GENERATED
  markers (the rest of the file is hand-written) = ``configs/serve_config.yaml`` deep-merged
  with ``kuberay/serve-overrides.yaml`` (production: GPU, 0.0.0.0, the model and its LoRA
  adapter on the PVC, Qwen3-8B engine settings).
* ``kuberay/overlays/cpu/rayservice-patch.yaml``: the CPU overlay's JSON patch of the
  RayService: its ``serveConfigV2`` (``configs/serve_config.yaml`` +
  ``kuberay/overlays/cpu/serve-overrides.yaml``) and a CPU-only cluster (no GPU, no PVC).
* the Ray containers' fast-path environment in ``kuberay/base/rayservice.yaml`` (between the
  ``# BEGIN/END GENERATED fast-path env`` markers of each container's ``env``) and in the CPU
  overlay's worker: ``configs/fast-path.env`` plus the image's ``llm-serve-haproxy`` as Serve's
  HAProxy binary, the request path ``make run`` serves on.
* ``configs/one-box.yaml``: the one-box production config (``cluster.supervise``, the compose
  recipe in ``cluster/onebox/``) = ``configs/serve_config.yaml`` + ``cluster/onebox/serve-overrides.yaml``.
* ``cluster/kuberay/rayjob-classify.yaml``: the batch classifier's RayJob (``scripts/manifests/rayjob.py``).
* the worker containers' ``readinessProbe`` (between ``# BEGIN/END GENERATED readiness probe``
  in ``kuberay/base/rayservice.yaml``, and in the CPU overlay's worker): the service's
  ``/health/ready`` through the pod's own Serve proxy (``WORKER_READINESS_PROBE``).
* ``kuberay/base/monitoring/prometheusrule.yaml``: a PrometheusRule carrying the rule groups of
  ``monitoring/alerts.yaml`` and ``monitoring/engine_alerts.yaml`` unchanged.

Every generated Serve config is checked before anything is written: Ray's own
``ServeDeploySchema``, the service's ``ServiceConfig`` for the application ``args``, and its
consistency with the cluster spec (model path on a mounted volume, GPU replicas fitting the
GPU worker group, the Serve port the Service targets, the autoscaling target within
``max_ongoing_requests``).
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

import yaml

from scripts.manifests import rayjob
from scripts.manifests import rayservice as rs


def outputs() -> dict[Path, str]:
    """Every generated file's expected content."""
    gpu_cfg = rs.serve_config("gpu")
    rayservice_text = rs.render_probe_blocks(
        rs.render_env_blocks(rs.render_rayservice(rs.RAYSERVICE.read_text(), gpu_cfg))
    )
    rayservice = yaml.safe_load(rayservice_text)
    rs.check_consistency(rayservice, gpu_cfg, "gpu")
    rs.check_probes(rayservice, gpu_cfg, "gpu")

    cpu_cfg = rs.serve_config("cpu")
    patch_text = rs.cpu_patch(cpu_cfg)
    cpu_service = rs.apply_json_patch(rayservice, yaml.safe_load(patch_text))
    rs.check_consistency(cpu_service, cpu_cfg, "cpu")
    rs.check_probes(cpu_service, cpu_cfg, "cpu")
    onebox = (
        rs.HEADER.format(sources="configs/serve_config.yaml + cluster/onebox/serve-overrides.yaml")
        + ("# One-box production (docs/one-box.md): `.venv/bin/python -m cluster.supervise` serves it.\n")
        + rs.dump_serve_config(rs.serve_config("onebox"))
    )
    return {
        rs.RAYSERVICE: rayservice_text,
        rs.CPU_PATCH: patch_text,
        rs.PROMETHEUS_RULE: rs.prometheus_rule(),
        rs.ONEBOX_CONFIG: onebox,
        rayjob.RAYJOB: rayjob.render(),
    }


def stale() -> dict[Path, str]:
    """Generated files whose committed content differs, with a unified diff each."""
    out = {}
    for path, want in outputs().items():
        have = path.read_text() if path.exists() else ""
        if have != want:
            rel = str(path.relative_to(rs.REPO))
            out[path] = "".join(
                difflib.unified_diff(
                    have.splitlines(True), want.splitlines(True), f"{rel} (committed)", f"{rel} (generated)"
                )
            )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 when a generated file is stale")
    p.add_argument("--print", dest="print_", action="store_true", help="print the Serve config")
    p.add_argument("--variant", choices=("gpu", "cpu", "onebox"), default="gpu")
    a = p.parse_args(argv)
    try:
        if a.print_:
            sys.stdout.write(rs.dump_serve_config(rs.serve_config(a.variant)))
            return 0
        diffs = stale()
    except rs.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if a.check:
        for diff in diffs.values():
            sys.stdout.write(diff)
        if diffs:
            print(f"\n{len(diffs)} generated file(s) stale: run `python scripts/gen_kuberay.py`", file=sys.stderr)
            return 1
        print("kuberay manifests are up to date")
        return 0
    for path, content in outputs().items():
        if path in diffs:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
            print(f"wrote {path.relative_to(rs.REPO)}")
    if not diffs:
        print("kuberay manifests are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
