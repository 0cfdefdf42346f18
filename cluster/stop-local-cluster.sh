#!/usr/bin/env bash
# Stop the local cluster started by start-local-cluster.sh: only the processes it recorded.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" cluster/local_cluster.py stop "$@"
