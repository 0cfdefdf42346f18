"""Generate docs/configuration.md, the configuration reference, from the pydantic
``ServiceConfig`` (deployments/config.py): one table per section with each field's path, type,
default and description, all read from ``ServiceConfig.model_json_schema()``.

    python scripts/gen_config_docs.py           # write docs/configuration.md
    python scripts/gen_config_docs.py --check   # exit 1 when the committed file is stale
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from typing import Any

from deployments.config import REPO_ROOT, ServiceConfig

OUT = REPO_ROOT / "docs" / "configuration.md"
COMMAND = "python scripts/gen_config_docs.py"

INTRO = f"""# Configuration reference

<!-- Generated from deployments/config.py by `{COMMAND}`: edit the field
descriptions there, then regenerate (tests/test_config_docs.py fails when this file is stale). -->

The `args` of the `llm` application in `configs/serve_config.yaml` are a `ServiceConfig`
(`deployments/config.py`): every field below, with its default. The shipped config states only
what differs from these defaults; the KubeRay `serveConfigV2` deep-merges
`kuberay/serve-overrides.yaml` over it (`scripts/gen_kuberay.py`). Unknown keys are rejected.
The options under `deployments` deep-merge over each deployment class's own Serve options; a
`null` there deletes the key, so the class's default (or Serve's) applies again.
"""

_TYPES = {"integer": "int", "number": "float", "string": "str", "boolean": "bool", "null": "null"}
_BOUNDS = (("exclusiveMinimum", ">"), ("minimum", "≥"), ("exclusiveMaximum", "<"), ("maximum", "≤"))


def resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """`node` with a `$ref` (or a single-entry `allOf` around one) replaced by its definition."""
    if len(node.get("allOf", ())) == 1:
        node = node["allOf"][0]
    ref = node.get("$ref")
    return defs[ref.rsplit("/", 1)[-1]] if ref else node


def type_name(node: dict[str, Any], defs: dict[str, Any]) -> str:
    node = resolve(node, defs)
    if "anyOf" in node:
        return " or ".join(type_name(n, defs) for n in node["anyOf"])
    if "enum" in node:
        return " or ".join(f"`{json.dumps(v)}`" for v in node["enum"])
    kind = node.get("type")
    if kind == "array":
        return f"list[{type_name(node.get('items') or {}, defs)}]"
    if kind == "object":
        keys = node.get("propertyNames", {}).get("enum")
        values = node.get("additionalProperties")
        value = type_name(values, defs) if isinstance(values, dict) and values else "any"
        return f"dict[str, {value}]" + (f" (keys: {', '.join(keys)})" if keys else "")
    bounds = ", ".join(f"{op} {node[key]}" for key, op in _BOUNDS if key in node)
    return (_TYPES.get(kind, kind) if kind else "any") + (f" ({bounds})" if bounds else "")


def cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def sections(schema: dict[str, Any]) -> list[tuple[str, str, list[tuple[str, ...]]]]:
    """(path, intro, rows) for the top level and each nested model, depth first. A field whose
    default is built by a factory has no `default` in the schema: it comes from `ServiceConfig()`."""
    defs = schema.get("$defs", {})
    built = ServiceConfig().model_dump(mode="json")
    out: list[tuple[str, str, list[tuple[str, ...]]]] = []

    def visit(node: dict[str, Any], path: str, intro: str, defaults: dict[str, Any]) -> None:
        rows: list[tuple[str, ...]] = []
        nested = []
        for name, prop in node.get("properties", {}).items():
            full = f"{path}.{name}" if path else name
            target = resolve(prop, defs)
            if "properties" in target:
                nested.append((target, full, target.get("description") or prop.get("description", ""), defaults[name]))
                continue
            default = prop["default"] if "default" in prop else defaults[name]
            rows.append(
                (
                    f"`{full}`",
                    type_name(prop, defs),
                    f"`{json.dumps(default, ensure_ascii=False)}`",
                    cell(prop.get("description", "")),
                )
            )
        out.append((path, intro, rows))
        for args in nested:
            visit(*args)

    visit(schema, "", schema.get("description", ""), built)
    return out


def render() -> str:
    schema = ServiceConfig.model_json_schema()
    parts = [INTRO, "Sections:\n"]
    parts += [
        f"- [`{name}`](#{name}): {cell(prop.get('description', ''))}"
        for name, prop in schema["properties"].items()
        if "properties" in resolve(prop, schema.get("$defs", {}))
    ]
    for path, intro, rows in sections(schema):
        parts.append(f"\n## {f'`{path}`' if path else 'Top level'}\n\n{cell(intro)}\n")
        parts.append("| Field | Type | Default | Description |\n|---|---|---|---|")
        parts += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/configuration.md is stale")
    args = parser.parse_args(argv)
    text = render()
    rel = OUT.relative_to(REPO_ROOT) if OUT.is_relative_to(REPO_ROOT) else OUT
    if not args.check:
        OUT.write_text(text)
        print(f"wrote {rel}")
        return 0
    current = OUT.read_text() if OUT.exists() else ""
    if current == text:
        print(f"{rel} is up to date")
        return 0
    diff = difflib.unified_diff(
        current.splitlines(), text.splitlines(), f"{rel} (committed)", f"{rel} (generated)", lineterm=""
    )
    print(
        f"{rel} differs from what deployments/config.py generates; run `{COMMAND}`.\n" + "\n".join(list(diff)[:60]),
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
