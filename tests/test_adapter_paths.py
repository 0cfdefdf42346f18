"""docs/security.md S3: what `POST /v1/load_lora_adapter` may load, checked where the model
replica checks it (deployments/adapter_paths.py, no Ray): only folders inside `lora.adapter_roots`
once symlinks and `..` are resolved, only safetensors weights, and 400s that name `lora_path`
and no server path but the one the client sent."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import LORA_DIR, REPO
from pydantic import ValidationError

from deployments.adapter_paths import adapter_in_roots, check_adapter, resolve_adapter_roots, validate_adapter_dir
from deployments.api.errors import APIError
from deployments.config import LoraConfig, ServiceConfig


def make_adapter(folder: Path, weights: tuple[str, ...] = ("adapter_model.safetensors",), rank: int = 8) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank}))
    for name in weights:
        (folder / name).write_bytes(b"\0" * 16)  # the checks read names, not tensors
    return folder


@pytest.fixture
def tree(tmp_path):
    """root/ (the adapter root) with a good adapter; outside/ beside it with another one."""
    root = tmp_path / "adapters"
    make_adapter(root / "good")
    make_adapter(tmp_path / "outside" / "secret")
    return tmp_path


def lora(root: Path, **kw) -> LoraConfig:
    return LoraConfig(adapter_roots=[str(root)], **kw)


def refused(call, code: str, shown: str, tmp: Path) -> APIError:
    with pytest.raises(APIError) as info:
        call()
    err = info.value
    assert err.status == 400 and err.param == "lora_path" and err.code == code, (err.code, err.message)
    assert repr(shown) in err.message  # names what the client sent …
    assert str(tmp) not in err.message.replace(shown, "")  # … and no other server path
    body = err.body()["error"]
    assert set(body) >= {"message", "type", "param", "code"} and body["type"] == "invalid_request_error"
    return err


def test_default_root_is_the_models_folder_and_one_is_required():
    assert LoraConfig().adapter_roots == ["models"]
    assert resolve_adapter_roots(["models"]) == [os.path.realpath(REPO / "models")]
    with pytest.raises(ValidationError):
        LoraConfig(adapter_roots=[])
    assert ServiceConfig.model_validate({"lora": {"adapter_roots": ["/models/adapters"]}}).lora.adapter_roots == [
        "/models/adapters"
    ]


def test_adapter_inside_the_root_is_accepted_resolved(tree):
    root = tree / "adapters"
    folder, cfg = check_adapter(str(root / "good"), lora(root), "LoRA adapter path 'x'")
    assert folder == os.path.realpath(root / "good") and cfg["r"] == 8
    # `..` that stays inside, and a symlink to another adapter inside: fine, resolved
    folder, _ = check_adapter(str(root / "good" / ".." / "good"), lora(root), "x")
    assert folder == os.path.realpath(root / "good")
    (root / "alias").symlink_to(root / "good")
    assert check_adapter(str(root / "alias"), lora(root), "x")[0] == os.path.realpath(root / "good")


@pytest.mark.parametrize(
    "make_path",
    [
        lambda t: t / "outside" / "secret",  # plainly outside
        lambda t: t / "adapters" / ".." / "outside" / "secret",  # `..` escape
        lambda t: t / "adapters",  # the root itself is no adapter
        lambda t: Path("/etc"),
    ],
)
def test_paths_outside_the_root_are_refused(tree, make_path):
    path = str(make_path(tree))
    refused(
        lambda: check_adapter(path, lora(tree / "adapters"), f"LoRA adapter path {path!r}"),
        "lora_path_not_allowed",
        path,
        tree,
    )


def test_a_sibling_sharing_the_roots_name_is_outside(tree):
    make_adapter(tree / "adapters-evil" / "x")
    path = str(tree / "adapters-evil" / "x")
    refused(
        lambda: check_adapter(path, lora(tree / "adapters"), f"LoRA adapter path {path!r}"),
        "lora_path_not_allowed",
        path,
        tree,
    )


def test_symlinks_pointing_out_of_the_root_are_refused(tree):
    root = tree / "adapters"
    (root / "link").symlink_to(tree / "outside" / "secret")
    shown = "link"  # the client sent a relative path: the message shows only that
    refused(
        lambda: check_adapter(str(root / "link"), lora(root), f"LoRA adapter path {shown!r}"),
        "lora_path_not_allowed",
        shown,
        tree,
    )
    # a folder inside whose weight file links out
    inner = make_adapter(root / "inner", weights=())
    (inner / "adapter_model.safetensors").symlink_to(tree / "outside" / "secret" / "adapter_model.safetensors")
    refused(
        lambda: check_adapter(str(inner), lora(root), "LoRA adapter path 'inner'"),
        "lora_path_not_allowed",
        "inner",
        tree,
    )
    # a root that is itself a symlink works (a PVC mount point, say)
    (tree / "root-link").symlink_to(root)
    assert check_adapter(str(tree / "root-link" / "good"), lora(tree / "root-link"), "x")[0] == os.path.realpath(
        root / "good"
    )


@pytest.mark.parametrize(
    "weights", [("adapter_model.bin",), ("adapter_model.pt",), ("adapter_model.safetensors", "adapter_model.bin")]
)
def test_pickled_weights_are_refused(tree, weights):
    root = tree / "adapters"
    make_adapter(root / "pickled", weights=weights)
    err = refused(
        lambda: check_adapter(str(root / "pickled"), lora(root), "LoRA adapter path 'pickled'"),
        "lora_weights_not_safetensors",
        "pickled",
        tree,
    )
    assert "safetensors" in err.message and weights[-1] in err.message


def test_missing_pieces_and_bad_configs_are_400_without_server_paths(tree):
    root = tree / "adapters"
    cases = {
        "none": make_adapter(root / "none", weights=()),  # no weights at all
        "notjson": make_adapter(root / "notjson"),
        "dora": make_adapter(root / "dora"),
        "rank": make_adapter(root / "rank", rank=512),
    }
    (cases["notjson"] / "adapter_config.json").write_text("{not json")
    (cases["dora"] / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "r": 8}))
    for shown, folder in cases.items():
        with pytest.raises(APIError) as info:
            check_adapter(str(folder), lora(root), f"LoRA adapter path {shown!r}")
        err = info.value
        assert err.status == 400 and err.param == "lora_path", err.message
        assert str(tree) not in err.message, err.message
    (cases["none"] / "adapter_config.json").unlink()  # not a peft adapter
    refused(
        lambda: check_adapter(str(cases["none"]), lora(root), "LoRA adapter path 'none'"),
        "invalid_lora_path",
        "none",
        tree,
    )
    refused(
        lambda: check_adapter(str(root / "missing"), lora(root), "LoRA adapter path 'missing'"),
        "invalid_lora_path",
        "missing",
        tree,
    )
    refused(
        lambda: check_adapter(str(root) + "/a\x00b", lora(root), "LoRA adapter path 'a'"),
        "invalid_lora_path",
        "a",
        tree,
    )


def test_unreadable_config_names_no_file(tree):
    if os.geteuid() == 0:
        pytest.skip("root reads every file")
    root = tree / "adapters"
    folder = make_adapter(root / "locked")
    (folder / "adapter_config.json").chmod(0)
    try:
        err = refused(
            lambda: check_adapter(str(folder), lora(root), "LoRA adapter path 'locked'"),
            "invalid_lora_path",
            "locked",
            tree,
        )
        assert "Permission denied" in err.message
    finally:
        (folder / "adapter_config.json").chmod(0o644)


def test_configured_adapters_are_exempt_from_the_roots_not_from_safetensors(tree):
    root = tree / "adapters"
    outside = tree / "outside" / "secret"
    folder, _ = check_adapter(str(outside), lora(root), "LoRA adapter 'news'", configured=True)
    assert folder == str(outside)  # read where the operator put it
    make_adapter(tree / "outside" / "old", weights=("adapter_model.bin",))
    with pytest.raises(APIError) as info:
        check_adapter(str(tree / "outside" / "old"), lora(root), "LoRA adapter 'old'", configured=True)
    assert info.value.code == "lora_weights_not_safetensors" and str(tree) not in info.value.message


def test_the_shipped_adapter_passes_with_the_default_root():
    if not LORA_DIR.is_dir():
        pytest.skip("embedded adapter not built (scripts/setup.sh)")
    folder, cfg = check_adapter(str(LORA_DIR), LoraConfig(), "x")
    assert folder == os.path.realpath(LORA_DIR) and cfg.get("r")
    assert validate_adapter_dir(str(LORA_DIR), 64)["peft_type"] == "LORA"


def test_adapter_in_roots_checks_every_root(tree):
    make_adapter(tree / "second" / "a")
    roots = resolve_adapter_roots([str(tree / "adapters"), str(tree / "second")])
    assert adapter_in_roots(str(tree / "second" / "a"), roots, "x") == os.path.realpath(tree / "second" / "a")


# --------------------------------------------------------------------------- issue 24: an allow-list


def test_an_adapter_folder_with_the_usual_files_is_accepted(tree):
    """What peft, scripts/train_lora.py and the Hugging Face Hub put in an adapter folder: the
    weights as safetensors, JSON configs, tokenizer files, a model card, a chat template."""
    root = tree / "adapters"
    folder = root / "good"
    for name in (
        "README.md",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.json",
        "merges.txt",
        "added_tokens.json",
        "chat_template.jinja",
        "tokenizer.model",
        "labels.json",
        "training.json",
        "new_embeddings.safetensors",
        ".gitattributes",
    ):
        (folder / name).write_text("x")
    (folder / "checkpoint-100").mkdir()  # subfolders are never read
    (folder / "checkpoint-100" / "optimizer.pt").write_bytes(b"\0")
    assert check_adapter(str(folder), lora(root), "x")[1]["r"] == 8


@pytest.mark.parametrize(
    "name,code",
    [
        ("training_args.bin", "lora_weights_not_safetensors"),  # HF Trainer's pickle beside the adapter
        ("model.pth", "lora_weights_not_safetensors"),
        ("weights.pkl", "lora_weights_not_safetensors"),
        ("modeling_evil.py", "lora_file_not_allowed"),  # code a trust_remote_code loader would run
        ("libpayload.so", "lora_file_not_allowed"),
        ("model.onnx", "lora_file_not_allowed"),
        ("tokenizer.zip", "lora_file_not_allowed"),
    ],
)
def test_files_outside_the_allow_list_are_refused(tree, name, code):
    """The folder check is an allow-list, not a deny-list of two pickle names: any other file is a
    400 naming it (the configured adapters too)."""
    root = tree / "adapters"
    folder = make_adapter(root / "extra")
    (folder / name).write_bytes(b"\0" * 8)
    err = refused(lambda: check_adapter(str(folder), lora(root), "LoRA adapter path 'extra'"), code, "extra", tree)
    assert repr(name) in err.message or name in err.message
    with pytest.raises(APIError) as info:  # the operator's own adapters are held to it as well
        check_adapter(str(folder), lora(root), "LoRA adapter 'news'", configured=True)
    assert info.value.code == code


def test_special_files_are_refused(tree):
    root = tree / "adapters"
    folder = make_adapter(root / "fifo")
    os.mkfifo(folder / "README.md")  # an allowed name, but a reader would block on it
    refused(
        lambda: check_adapter(str(folder), lora(root), "LoRA adapter path 'fifo'"),
        "lora_file_not_allowed",
        "fifo",
        tree,
    )
    dangling = make_adapter(root / "dangling")
    (dangling / "tokenizer.json").symlink_to(root / "nowhere.json")
    refused(
        lambda: check_adapter(str(dangling), lora(root), "LoRA adapter path 'dangling'"),
        "lora_file_not_allowed",
        "dangling",
        tree,
    )


def test_every_file_must_resolve_inside_the_root(tree):
    """Not only the config and the weights: any file of the folder that is a symlink out of the
    roots (here a tokenizer file pointing at a file elsewhere) is refused."""
    root = tree / "adapters"
    (tree / "outside" / "tokenizer.json").write_text("{}")
    folder = make_adapter(root / "leaky")
    (folder / "tokenizer.json").symlink_to(tree / "outside" / "tokenizer.json")
    err = refused(
        lambda: check_adapter(str(folder), lora(root), "LoRA adapter path 'leaky'"),
        "lora_path_not_allowed",
        "leaky",
        tree,
    )
    assert "tokenizer.json" in err.message
    # a symlink to a file inside the roots is fine
    (folder / "tokenizer.json").unlink()
    (root / "shared-tokenizer.json").write_text("{}")
    (folder / "tokenizer.json").symlink_to(root / "shared-tokenizer.json")
    assert check_adapter(str(folder), lora(root), "x")[0] == os.path.realpath(folder)
