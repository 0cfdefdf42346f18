#!/usr/bin/env bash
# Runs the test suite (after scripts/setup.sh): real Ray, real vLLM CPU engine, tiny model.
# Extra arguments go to pytest, e.g. `scripts/test.sh -k backpressure` or `-m soak`.
set -uo pipefail
cd "$(dirname "$0")/.."
# promtool + prometheus for the monitoring tests (idempotent; the tests skip if impossible).
scripts/install_test_deps.sh || echo "warning: could not install prometheus; its tests will skip"
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 VLLM_NO_USAGE_STATS=1 PYTHONUNBUFFERED=1
.venv/bin/python -m pytest -m "not soak" "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi
exit "$rc"
