"""The embedded model's files and their SHA-256, recorded in ``models/SHA256SUMS``.

The embedded model (``models/tiny-qwen3`` and its adapter ``models/tiny-qwen3-lora``) is kept in
the repository: training it on two different CPUs gives two different models (floating-point
results differ with the instruction set, and training amplifies the difference), so every machine
serves and tests the same bytes only if the bytes are shipped. ``scripts/build_tiny_model.py``
still builds it (and writes this file); set-up only checks it.

Invariant: ``models/SHA256SUMS`` lists every file of the two model folders, exactly those, in the
``sha256sum`` format (``<hex>  <path relative to models/>``), so ``cd models && sha256sum -c
SHA256SUMS`` checks it too. ``verify`` fails on a missing, extra or different file.

    python scripts/model_checksums.py [--models models]     # verify, print the checksums and figures
    python scripts/model_checksums.py --write                # after a rebuild: record the new files
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL_DIRS = ("tiny-qwen3", "tiny-qwen3-lora")
SUMS = "SHA256SUMS"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_files(models: Path) -> list[str]:
    """Every file of the model folders, as paths relative to ``models`` (sorted)."""
    out = []
    for d in MODEL_DIRS:
        root = models / d
        if root.is_dir():
            out += [p.relative_to(models).as_posix() for p in sorted(root.rglob("*")) if p.is_file()]
    return out


def compute(models: Path) -> dict[str, str]:
    return {rel: file_sha256(models / rel) for rel in model_files(models)}


def write(models: Path) -> Path:
    sums = compute(models)
    path = models / SUMS
    path.write_text("".join(f"{h}  {rel}\n" for rel, h in sums.items()), encoding="utf-8")
    return path


def recorded(models: Path) -> dict[str, str]:
    path = models / SUMS
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            digest, rel = line.split(None, 1)
            out[rel.strip().lstrip("*")] = digest
    return out


def verify(models: Path) -> list[str]:
    """Problems found (empty: the files are exactly the recorded ones)."""
    if not (models / SUMS).is_file():
        return [f"{models / SUMS} is missing"]
    want = recorded(models)
    have = set(model_files(models))
    problems = [f"missing: {rel}" for rel in sorted(set(want) - have)]
    problems += [f"not recorded in {SUMS}: {rel}" for rel in sorted(have - set(want))]
    for rel in sorted(set(want) & have):
        got = file_sha256(models / rel)
        if got != want[rel]:
            problems.append(f"differs: {rel}: sha256 {got}, recorded {want[rel]}")
    return problems


def heldout(models: Path) -> dict:
    """The held-out accuracy recorded when the shipped model was built."""
    return json.loads((models / "tiny-qwen3" / "heldout.json").read_text(encoding="utf-8"))["accuracy"]


def percent(x: float) -> str:
    """As the README writes it: ``45.4 %``."""
    return f"{x * 100:.1f} %"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, default=REPO / "models", help="the folder holding the model folders")
    ap.add_argument("--write", action="store_true", help="record the current files (after a rebuild)")
    args = ap.parse_args(argv)
    if args.write:
        print(f"wrote {write(args.models)}")
        return 0
    problems = verify(args.models)
    if problems:
        print(f"error: the embedded model in {args.models} is not the shipped one:", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        print(
            "Restore it with `git checkout -- models/` (or, after a deliberate rebuild with "
            "scripts/build_tiny_model.py --force, record it with scripts/model_checksums.py --write).",
            file=sys.stderr,
        )
        return 1
    for rel, digest in recorded(args.models).items():
        print(f"  {digest}  {rel}")
    acc = heldout(args.models)
    print(
        f"embedded model verified ({len(recorded(args.models))} files, {SUMS}); held-out accuracy "
        f"({acc['rows']} rows): base {percent(acc['base'])}, base+adapter {percent(acc['base+adapter'])}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
