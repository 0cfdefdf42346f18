"""The embedded model is the same bytes on every machine (shipped, checked by SHA-256), its
recorded figures are the README's, and the script that built it still builds a loadable model."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from scripts import model_checksums as mc

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"


def test_shipped_files_match_their_recorded_checksums():
    assert mc.verify(MODELS) == []
    rels = set(mc.recorded(MODELS))
    # every weight file is recorded
    assert {"tiny-qwen3/model.safetensors", "tiny-qwen3-lora/adapter_model.safetensors"} <= rels
    assert all(len(h) == 64 for h in mc.recorded(MODELS).values())


def test_checksums_are_tracked_by_git():
    """The model files are in the repository, not built per machine."""
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files", "models"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    tracked = {line.removeprefix("models/") for line in out.splitlines()}
    assert set(mc.recorded(MODELS)) | {"SHA256SUMS"} <= tracked


def test_verify_fails_loudly_on_a_changed_missing_or_extra_file(tmp_path: Path):
    models = tmp_path / "models"
    for d in mc.MODEL_DIRS:
        shutil.copytree(MODELS / d, models / d)
    shutil.copy(MODELS / mc.SUMS, models / mc.SUMS)
    assert mc.verify(models) == []
    weights = models / "tiny-qwen3" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    (models / "tiny-qwen3-lora" / "labels.json").unlink()
    (models / "tiny-qwen3" / "extra.bin").write_bytes(b"x")
    problems = mc.verify(models)
    assert any(p.startswith("differs: tiny-qwen3/model.safetensors") for p in problems), problems
    assert "missing: tiny-qwen3-lora/labels.json" in problems
    assert any("extra.bin" in p for p in problems)
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "model_checksums.py"), "--models", str(models)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert "not the shipped one" in proc.stderr and "model.safetensors" in proc.stderr


def test_setup_prints_the_readme_figures():
    """What set-up prints (the figures recorded at build time) is what the README states."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "model_checksums.py")], capture_output=True, text=True, check=True
    )
    acc = mc.heldout(MODELS)
    base, lora = mc.percent(acc["base"]), mc.percent(acc["base+adapter"])
    assert f"base {base}, base+adapter {lora}" in proc.stdout
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert f"**{lora} accuracy**" in readme
    assert f"{base} with the base alone" in readme


def test_shipped_model_matches_the_recipe_and_data():
    from scripts import build_tiny_model as btm

    held = json.loads((MODELS / "tiny-qwen3" / "heldout.json").read_text())
    assert held["recipe"] == btm.RECIPE
    assert held["data_sha256"] == mc.file_sha256(btm.DEFAULT_DATA)
    assert held["fingerprint"] == btm.fingerprint(btm.DEFAULT_DATA, btm.DEFAULT_LABELS, btm.RECIPE)
    adapter = json.loads((MODELS / "tiny-qwen3-lora" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "models/tiny-qwen3"  # no build folder recorded
    tok = json.loads((MODELS / "tiny-qwen3" / "tokenizer_config.json").read_text())
    assert tok.get("chat_template", btm.CHAT_TEMPLATE) == btm.CHAT_TEMPLATE
    if (MODELS / "tiny-qwen3" / "chat_template.jinja").is_file():
        assert (MODELS / "tiny-qwen3" / "chat_template.jinja").read_text() == btm.CHAT_TEMPLATE


def test_build_refuses_to_replace_a_model_without_force(tmp_path: Path):
    (tmp_path / "tiny-qwen3").mkdir()
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "build_tiny_model.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 2 and "--force" in proc.stderr


def test_the_build_script_builds_a_loadable_model(tmp_path: Path):
    """A few-step build (the shipped recipe otherwise): the same tokenizer and model shape as the
    shipped model (the tokenizer's training is integer counting: the same on every CPU), its own
    SHA256SUMS, an adapter transformers + peft load on its base."""
    out = tmp_path / "models"
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "build_tiny_model.py"),
        "--out",
        str(out),
        "--no-progress",
        *("--set", "cls_steps=4", "--set", "lm_steps=2", "--set", "lora_steps=2", "--set", "eval_n=16"),
        *("--set", "threads=1"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert re.search(r"held-out accuracy base [01]\.\d{3}, base\+adapter [01]\.\d{3}", proc.stdout), proc.stdout
    assert mc.verify(out) == []
    assert set(mc.recorded(out)) == set(mc.recorded(MODELS))
    for same in ("tiny-qwen3/tokenizer.json", "tiny-qwen3/config.json", "tiny-qwen3/labels.json"):
        assert (out / same).read_bytes() == (MODELS / same).read_bytes(), same
    held = json.loads((out / "tiny-qwen3" / "heldout.json").read_text())
    assert held["recipe"]["cls_steps"] == 4 and held["accuracy"]["rows"] == 16

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "tiny-qwen3")
    base = AutoModelForCausalLM.from_pretrained(out / "tiny-qwen3", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out / "tiny-qwen3-lora")
    ids = torch.tensor([tok.encode("央行宣布降息")])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], base.config.vocab_size)
    assert torch.isfinite(logits).all()
