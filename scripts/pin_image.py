#!/usr/bin/env python3
"""Pin the serving image by digest for kuberay/overlays/pinned (the release step).

    docker push registry.example.com/llm-serve:0.1.0-gpu 2>&1 | tee push.log
    python -m scripts.pin_image --from-push push.log           # the digest docker push printed
    python -m scripts.pin_image --digest sha256:<64 hex>       # e.g. from `crane digest <image:tag>`
    python -m scripts.pin_image --check                        # exit 1 unless a real digest is pinned

It writes ``kuberay/overlays/pinned/release/kustomization.yaml`` (a kustomize Component, the one
file the pinned overlay takes the image from): the image ``llm-serve`` becomes
``<repository>@sha256:<digest>``. The repository defaults to the ``newName`` that
``kuberay/kustomization.yaml`` gives ``llm-serve`` (where production pushes it); ``--repository``
names another. Nothing here contacts a registry: the digest comes from the push (or ``crane``).
The committed file holds PLACEHOLDER, all zeros, of the right shape but no image's: ``--check``
(the release gate) refuses it; tests/test_kuberay.py checks the shape on every commit.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PRODUCTION = REPO / "kuberay" / "kustomization.yaml"
RELEASE = REPO / "kuberay" / "overlays" / "pinned" / "release" / "kustomization.yaml"
IMAGE = "llm-serve"  # the image name the manifests use (kuberay/base/rayservice.yaml)
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
PLACEHOLDER = "sha256:" + "0" * 64
# `docker push` ends with "<tag>: digest: sha256:<hex> size: <n>"; podman/buildah print the bare digest.
PUSH_DIGEST_RE = re.compile(r"(?:^|[\s:])(sha256:[0-9a-f]{64})(?=\s|$)", re.M)

HEADER = """\
# WRITTEN BY THE RELEASE (python -m scripts.pin_image): the serving image by digest, the one place
# kuberay/overlays/pinned takes it from. {note}
"""


def production_repository() -> str:
    """The repository kuberay/kustomization.yaml deploys `llm-serve` from."""
    kust = yaml.safe_load(PRODUCTION.read_text())
    entry = next(i for i in kust.get("images", []) if i["name"] == IMAGE)
    return entry.get("newName", IMAGE)


def digest_from_push(text: str) -> str:
    """The digest in `docker push` output (the last one printed)."""
    found = PUSH_DIGEST_RE.findall(text)
    if not found:
        raise ValueError("no `digest: sha256:<64 hex>` in the push output")
    return found[-1]


def check_digest(digest: str) -> str:
    if not DIGEST_RE.match(digest):
        raise ValueError(f"{digest!r} is not a sha256 digest (sha256: and 64 lowercase hex digits)")
    return digest


def render(repository: str, digest: str) -> str:
    check_digest(digest)
    note = (
        "sha256:000…000 is the committed PLACEHOLDER, not an image."
        if digest == PLACEHOLDER
        else "Pinned by the release; do not edit by hand."
    )
    doc = {
        "apiVersion": "kustomize.config.k8s.io/v1alpha1",
        "kind": "Component",
        "images": [{"name": IMAGE, "newName": repository, "digest": digest}],
    }
    return HEADER.format(note=note) + yaml.safe_dump(doc, sort_keys=False)


def pinned(path: Path = RELEASE) -> list[dict]:
    """The image entries of the release file."""
    doc = yaml.safe_load(path.read_text()) or {}
    return list(doc.get("images") or [])


def release_errors(path: Path = RELEASE, allow_placeholder: bool = True) -> list[str]:
    """Why the release file does not pin `llm-serve` by a sha256 digest (empty: it does)."""
    entries = pinned(path)
    errors = []
    if [e.get("name") for e in entries] != [IMAGE]:
        errors.append(f"expected exactly one image entry, for {IMAGE!r}: {entries}")
    for e in entries:
        digest = str(e.get("digest", ""))
        if not DIGEST_RE.match(digest):
            errors.append(f"{e.get('name')}: digest {digest!r} is not sha256:<64 lowercase hex>")
        elif digest == PLACEHOLDER and not allow_placeholder:
            errors.append(f"{e.get('name')}: the digest is the placeholder; run the release's pin step")
        if "newTag" in e:
            errors.append(f"{e.get('name')}: newTag beside a digest (the digest must decide)")
        if not e.get("newName"):
            errors.append(f"{e.get('name')}: no newName (the registry repository)")
    return errors


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--digest", help="sha256:<64 hex>, e.g. from `crane digest <image:tag>`")
    src.add_argument("--from-push", metavar="FILE", help="`docker push` output ('-': stdin)")
    src.add_argument("--check", action="store_true", help="exit 1 unless a real digest is pinned")
    p.add_argument(
        "--repository", help=f"registry repository (default: kuberay/kustomization.yaml's newName for {IMAGE})"
    )
    p.add_argument("--file", type=Path, default=RELEASE, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.check:
        errors = release_errors(a.file, allow_placeholder=False)
        for e in errors:
            print(f"error: {a.file}: {e}", file=sys.stderr)
        if not errors:
            print(f"pinned: {pinned(a.file)[0]['newName']}@{pinned(a.file)[0]['digest']}")
        return 1 if errors else 0
    try:
        if a.from_push:
            text = sys.stdin.read() if a.from_push == "-" else Path(a.from_push).read_text()
            digest = digest_from_push(text)
        else:
            digest = check_digest(a.digest.strip())
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    a.file.write_text(render(a.repository or production_repository(), digest))
    print(f"wrote {a.file}: {IMAGE} -> {a.repository or production_repository()}@{digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
