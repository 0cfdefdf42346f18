"""Kubernetes CRD schemas as jsonschema, the way the API server applies them (shared by the
manifest tests: tests/test_kuberay.py, tests/test_classify_batch.py)."""

from __future__ import annotations

from typing import Any


def strict(schema: Any) -> Any:
    """An openAPIV3Schema as a jsonschema that rejects unknown fields like the API server."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) if k in ("items", "not") else v for k, v in schema.items()}
    if "properties" in schema:
        out["properties"] = {k: strict(v) for k, v in schema["properties"].items()}
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            out[key] = [strict(s) for s in schema[key]]
    if isinstance(schema.get("additionalProperties"), dict):
        out["additionalProperties"] = strict(schema["additionalProperties"])
    if schema.get("nullable") and "type" in schema:
        out["type"] = [schema["type"], "null"]
    if (
        schema.get("type") == "object"
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out
