#!/usr/bin/env bash
# Start a local multi-node Ray cluster: a head (no GPU) plus worker nodes with one logical GPU
# each (`ray start --num-gpus=1`). Arguments go to `local_cluster.py start`, e.g. --workers 3.
# Then:  eval "$(cluster/local_cluster.py env)"   (or the exports printed below)
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" cluster/local_cluster.py start "$@"
