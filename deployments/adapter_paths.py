"""What a model replica may load as a LoRA adapter (`check_adapter`, on its own node's
filesystem): a runtime-loaded adapter only from inside `lora.adapter_roots` after resolving
symlinks and `..` (each file of the folder too), and every adapter only with the files of an
allow-list (`ALLOWED_FILES`: safetensors weights, JSON/text/markdown configs and tokenizer files;
pickled `.bin`/`.pt` weights and anything else are refused). Messages name the adapter as the
client sent it, never a resolved or configured server path."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deployments.api.errors import APIError

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
# Weight files vLLM would read with torch.load (a pickle, even with weights_only=True): refused.
PICKLED_WEIGHTS = ("adapter_model.bin", "adapter_model.pt")
# What an adapter folder may hold (its top-level files; subfolders are never read): what peft's
# save_pretrained, scripts/train_lora.py and the Hugging Face Hub put there. Weights only as
# safetensors; configs, tokenizer files and notes as JSON, text, markdown or Jinja; a
# sentencepiece `tokenizer.model` (protobuf). Nothing that unpickles or executes.
ALLOWED_FILES = (
    "*.safetensors",
    "*.json",
    "*.txt",
    "*.md",
    "*.jinja",
    "tokenizer.model",
    ".gitattributes",
)
# Suffixes of files torch/pickle would load: refused with the hint to re-save as safetensors.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def file_allowed(name: str) -> bool:
    """`name` (a file name, no folder) matches `ALLOWED_FILES`."""
    import fnmatch

    return any(fnmatch.fnmatchcase(name, pattern) for pattern in ALLOWED_FILES)


def _bad_path(what: str, message: str, code: str = "invalid_lora_path") -> APIError:
    return APIError(400, f"{what} {message}", param="lora_path", code=code)


def _inside(path: str, root: str) -> bool:
    """`path` lies strictly inside `root` (both absolute and resolved): by path components, so
    `/models/adapters-evil` is not inside `/models/adapters`."""
    try:
        return path != root and os.path.commonpath([path, root]) == root
    except ValueError:
        return False


def resolve_adapter_roots(roots: Sequence[str]) -> list[str]:
    """The configured adapter roots (`lora.adapter_roots`; operator configuration, so
    `resolve_path` applies), each with its own symlinks resolved."""
    from deployments.config import resolve_path

    return [os.path.realpath(resolve_path(r)) for r in roots]


def adapter_in_roots(path: str, roots: Sequence[str], what: str) -> str:
    """`path` with symlinks and `..` resolved (`os.path.realpath`) if it lies inside one of the
    resolved `roots`, and so do the adapter's config and weight files (a symlinked file must not
    point out of the roots either); else APIError 400 `lora_path_not_allowed`. `what` names the
    adapter in messages as the client sent it: the roots and resolved paths are never shown."""
    if "\x00" in path:
        raise _bad_path(what, "is not a valid path.")
    real = os.path.realpath(path)
    if not any(_inside(real, root) for root in roots):
        raise _bad_path(
            what,
            "is outside the folders this service loads adapters from (lora.adapter_roots).",
            "lora_path_not_allowed",
        )
    try:
        names = sorted(os.listdir(real))
    except OSError:
        names = []  # not a folder, or unreadable: validate_adapter_dir says which
    for name in names:  # every entry: a symlinked file (or folder) must not lead out either
        f = os.path.join(real, name)
        if os.path.islink(f) and not any(_inside(os.path.realpath(f), root) for root in roots):
            raise _bad_path(
                what,
                f"has {name} pointing outside the folders this service loads adapters from (lora.adapter_roots).",
                "lora_path_not_allowed",
            )
    return real


def validate_adapter_dir(path: str, max_rank: int, what: str | None = None) -> dict[str, Any]:
    """Check that `path` holds a peft LoRA adapter vLLM can load with safetensors only; return
    its config. `what` names the adapter in messages (default: the path itself); messages never
    show another path, nor the text of an OS error (which would name the server's files).

    Raises APIError(400, param `lora_path`) with a clear message otherwise."""
    what = what or f"LoRA adapter path {path!r}"
    p = Path(path)
    if "\x00" in path:
        raise _bad_path(what, "is not a valid path.")
    if not p.is_dir():
        raise _bad_path(what, "is not a folder on the model replica's node.")
    cfg_file = p / CONFIG_FILE
    if not cfg_file.is_file():
        raise _bad_path(what, f"has no {CONFIG_FILE}: not a peft adapter.")
    check_adapter_files(p, what)
    if not (p / WEIGHTS_FILE).is_file():
        raise _bad_path(what, f"has no {WEIGHTS_FILE} weights (only safetensors adapters are loaded).")
    try:
        cfg = json.loads(cfg_file.read_text())
    except OSError as exc:
        raise _bad_path(what, f"has an unreadable {CONFIG_FILE}: {exc.strerror or type(exc).__name__}.") from None
    except ValueError as exc:  # JSON errors name a line and column, no path
        raise _bad_path(what, f"has an unreadable {CONFIG_FILE}: {exc}") from None
    if not isinstance(cfg, dict):
        raise _bad_path(what, f"has an {CONFIG_FILE} that is not a JSON object.")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise _bad_path(what, f"is a {cfg.get('peft_type')} adapter; only LoRA is supported.")
    try:
        rank = int(cfg.get("r", 0) or 0)
    except (TypeError, ValueError):
        rank = 0
    if rank <= 0 or rank > max_rank:
        raise APIError(
            400,
            f"adapter rank {rank} is outside 1..{max_rank} (lora.max_lora_rank).",
            param="lora_path",
            code="invalid_lora_rank",
        )
    return cfg


def check_adapter_files(folder: Path, what: str) -> None:
    """Every top-level file of the adapter `folder` matches `ALLOWED_FILES` and is a regular file
    (or a symlink to one); subfolders are not read. 400 `lora_weights_not_safetensors` for
    pickled weights, `lora_file_not_allowed` for anything else, naming the files (not paths)."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        raise _bad_path(what, f"cannot be listed: {exc.strerror or type(exc).__name__}.") from None
    pickled, other = [], []
    for entry in entries:
        try:
            if entry.is_dir():
                continue  # never read (a checkpoint folder, huggingface_hub's .cache)
            regular = entry.is_file()
        except OSError:
            regular = False
        if not regular:
            other.append(entry.name)  # a FIFO, socket, device or dangling link
        elif entry.name in PICKLED_WEIGHTS or entry.name.lower().endswith(PICKLE_SUFFIXES):
            pickled.append(entry.name)
        elif not file_allowed(entry.name):
            other.append(entry.name)
    if pickled:
        raise _bad_path(
            what,
            f"has pickled weights ({', '.join(pickled)}): only {WEIGHTS_FILE} adapters are "
            "loaded. Save it with safetensors (peft: save_pretrained(..., safe_serialization=True)) "
            "and remove the pickle.",
            "lora_weights_not_safetensors",
        )
    if other:
        shown = ", ".join(repr(n) for n in other[:5]) + (f" and {len(other) - 5} more" if len(other) > 5 else "")
        raise _bad_path(
            what,
            f"has files an adapter folder may not hold: {shown}. Allowed: regular files named "
            f"{', '.join(ALLOWED_FILES)}; remove the others.",
            "lora_file_not_allowed",
        )


def check_adapter(path: str, lora: Any, what: str, *, configured: bool = False) -> tuple[str, dict[str, Any]]:
    """The folder to hand vLLM and the adapter's config, on the model replica's node.

    A runtime-loaded adapter (`POST /v1/load_lora_adapter`) must lie inside `lora.adapter_roots`
    (resolved; the resolved folder is what vLLM then reads, so a symlink swapped later cannot
    redirect it); an adapter of `lora.adapters` (`configured`) is the operator's own and is read
    where it is. Both must be safetensors-only peft LoRA adapters (`validate_adapter_dir`)."""
    folder = path if configured else adapter_in_roots(path, resolve_adapter_roots(lora.adapter_roots), what)
    return folder, validate_adapter_dir(folder, lora.max_lora_rank, what)
