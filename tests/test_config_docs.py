"""docs/configuration.md is generated from the pydantic ServiceConfig and every field is
documented (no Ray, no Serve)."""

from __future__ import annotations

import subprocess
import sys

from pydantic import BaseModel

from deployments.config import REPO_ROOT, ServiceConfig
from scripts import gen_config_docs


def test_every_schema_field_has_a_description():
    schema = ServiceConfig.model_json_schema()
    missing = [
        f"{model}.{name}"
        for model, node in [("ServiceConfig", schema), *schema["$defs"].items()]
        for name, prop in node.get("properties", {}).items()
        if not str(prop.get("description", "")).strip()
    ]
    assert not missing, f"fields without a description: {missing}"


def test_configuration_doc_is_up_to_date():
    committed = gen_config_docs.OUT.read_text() if gen_config_docs.OUT.exists() else ""
    assert committed == gen_config_docs.render(), (
        "docs/configuration.md is stale: run `python scripts/gen_config_docs.py`"
    )


def test_every_field_is_in_the_doc():
    text = gen_config_docs.render()

    def walk(model, prefix=""):
        for name, field in model.model_fields.items():
            path = prefix + name
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):  # a nested section
                assert f"## `{path}`" in text
                walk(ann, path + ".")
            else:
                assert f"| `{path}` |" in text, path

    walk(ServiceConfig)


def test_check_mode_cli(tmp_path, monkeypatch):
    r = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "gen_config_docs.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    stale = tmp_path / "configuration.md"
    stale.write_text(gen_config_docs.render().replace("| `512` |", "| `256` |"))
    monkeypatch.setattr(gen_config_docs, "OUT", stale)
    assert gen_config_docs.main(["--check"]) == 1
    assert stale.read_text().count("| `256` |") == 1  # --check never writes
