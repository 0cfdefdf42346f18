"""Validate JSON against OpenAI's published API document (`../shared/openai/openapi.json`,
OpenAPI 3.1, its `components/schemas` being JSON Schema 2020-12), for any test:

    from openai_schema import assert_valid, schema_errors
    assert_valid("CreateChatCompletionResponse", resp.json())

The whole document goes into a `referencing.Registry` under one URI and a schema is
`{"$ref": "<uri>#/components/schemas/<name>"}`, so every `$ref` inside it resolves against the
document (an unknown name or a dangling `$ref` raises, it never validates vacuously).

The document's quirks, handled once here (`load_document`):

- `"nullable": true` — an OpenAPI 3.0 keyword still used ~110 times in this 3.1 document
  (e.g. the stream chunk's `usage`, `choices[].logprobs`, `choices[].finish_reason`).
  JSON Schema ignores unknown keywords, so read literally those fields could never be null,
  which is plainly not what OpenAI means (its own SDKs, generated from this file, accept null
  there, and its servers send it). A schema carrying it becomes `anyOf: [it, {"type": "null"}]`;
  an `allOf` member that is only `{"nullable": true}` makes the whole `allOf` nullable.
- Erratum: a few component schemas (`Model` among them) have `properties` and `required` but no
  `"type": "object"`, so any non-object (a list, a string) would pass them; they get the type.
- Erratum: `CreateCompletionResponse` says streamed and non-streamed completions share one
  shape, but its `finish_reason` (required, not nullable) cannot hold the `null` that every
  streamed chunk before the last carries (OpenAI's and vLLM's servers alike). Stream chunks are
  checked against `CreateCompletionStreamResponse`, derived here: the same schema with
  `finish_reason` nullable and nothing else changed.

`format` (e.g. `unixtime`) is annotation only, as JSON Schema 2020-12 says, and `x-*` /
`discriminator` / `example` keywords are ignored; extra properties are allowed wherever the
document does not forbid them (OpenAI's objects are open), so fields beyond OpenAI's (vLLM's
`stop_reason`, a model card's `root`/`parent`) pass.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from referencing import Registry
from referencing.jsonschema import DRAFT202012

DOCUMENT = Path(__file__).resolve().parents[2] / "shared" / "openai" / "openapi.json"
URI = "https://openai.example/openapi.json"  # the registry key; nothing is fetched


def _nullable(node: Any) -> Any:
    """The 3.0 `nullable` keyword rewritten as 2020-12 (see the module docstring), recursively."""
    if isinstance(node, list):
        return [_nullable(v) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: _nullable(v) for k, v in node.items()}
    nullable = node.pop("nullable", None) is True
    if isinstance(node.get("allOf"), list):
        members = [m for m in node["allOf"] if m != {}]
        if len(members) != len(node["allOf"]):  # a member that was only {"nullable": true}
            nullable = True
            node["allOf"] = members
    if not nullable:
        return node
    annotations = {k: node.pop(k) for k in ("description", "title", "default", "example", "deprecated") if k in node}
    return {**annotations, "anyOf": [node, {"type": "null"}]}


def _errata(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    for schema in schemas.values():
        if "properties" in schema and not {"type", "anyOf", "oneOf", "allOf", "$ref"} & set(schema):
            schema["type"] = "object"
    if "CreateCompletionStreamResponse" not in schemas:
        stream = copy.deepcopy(schemas["CreateCompletionResponse"])
        choice = stream["properties"]["choices"]["items"]
        choice["properties"]["finish_reason"] = {"anyOf": [choice["properties"]["finish_reason"], {"type": "null"}]}
        stream["description"] = (
            "Erratum (tests/openai_schema.py): CreateCompletionResponse with "
            "finish_reason nullable, as streamed chunks carry it."
        )
        schemas["CreateCompletionStreamResponse"] = stream


def load_document(path: Path | str = DOCUMENT) -> dict[str, Any]:
    doc = _nullable(json.loads(Path(path).read_text()))
    _errata(doc)
    return doc


@functools.cache
def _registry(path: str) -> Registry:
    return Registry().with_resource(URI, DRAFT202012.create_resource(load_document(path)))


@functools.cache
def validator(name: str, path: str = str(DOCUMENT)) -> Draft202012Validator:
    """A validator for `components/schemas/<name>`; an unknown name is a KeyError."""
    registry = _registry(path)
    if name not in registry[URI].contents["components"]["schemas"]:
        raise KeyError(f"no schema {name!r} in {path}")
    return Draft202012Validator({"$ref": f"{URI}#/components/schemas/{name}"}, registry=registry)


def schema_errors(name: str, instance: Any, path: str = str(DOCUMENT)) -> list[str]:
    """Every way `instance` breaks the schema, as `$.json.path: message` lines (empty: valid)."""
    found = []
    for err in validator(name, path).iter_errors(instance):
        line = f"{err.json_path}: {err.message}"
        if err.context:  # an anyOf/oneOf: also the likeliest branch's own reason
            branches = [e for e in err.context if not (e.validator == "type" and e.validator_value == "null")]
            best = best_match(branches or err.context)
            line += f" [likeliest branch: {best.json_path}: {best.message}]"
        found.append(line)
    return sorted(set(found))


def assert_valid(name: str, instance: Any, what: str = "") -> None:
    problems = schema_errors(name, instance)
    if problems:
        shown = json.dumps(instance, ensure_ascii=False)[:1500]
        raise AssertionError(
            f"{what or 'instance'} does not match OpenAI's {name}:\n  " + "\n  ".join(problems) + f"\ninstance: {shown}"
        )
