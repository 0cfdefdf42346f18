#!/usr/bin/env bash
# Runs the checks and the test suite (after scripts/setup.sh): ruff (lint, format), mypy, then
# pytest on real Ray, the real vLLM CPU engine and the embedded model. The slowest twenty tests
# are listed at the end of every run.
#
#   scripts/test.sh                  # everything but the opt-in soak runs
#   scripts/test.sh -m unit          # one layer: unit, app or e2e (tests/conftest.py)
#   scripts/test.sh tests/test_api.py -k models
#   LLM_SERVE_SKIP_LINT=1 scripts/test.sh ...   # pytest only (while iterating)
#   LLM_SERVE_TEST_WORKERS=0 scripts/test.sh ... # one process (-s, pdb); default: 2 workers, the
#                                               # session cluster's modules on one of them
set -uo pipefail
cd "$(dirname "$0")/.."
LINTED=(deployments serve_app.py batch cluster scripts tests)
# The tests read the TNEWS data set from ../shared beside the repository (nothing is downloaded).
if [ ! -f ../shared/data/tnews/test.json ]; then
  echo "error: the tests need ../shared/data/tnews/ beside this repository ($(cd .. && pwd)/shared);" \
       "clone the repository next to the shared folder" >&2
  exit 1
fi
if [ -z "${LLM_SERVE_SKIP_LINT:-}" ]; then
  echo "==> ruff check, ruff format --check, mypy"
  .venv/bin/ruff check "${LINTED[@]}" || exit 1
  .venv/bin/ruff format --check "${LINTED[@]}" || exit 1
  .venv/bin/mypy || exit 1
fi
# promtool + prometheus for the monitoring tests (idempotent; the tests skip if impossible).
scripts/install_test_deps.sh || echo "warning: could not install prometheus; its tests will skip"
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 VLLM_NO_USAGE_STATS=1 PYTHONUNBUFFERED=1
markers=(-m "not soak")
for arg in "$@"; do
  if [ "$arg" = "-m" ]; then markers=(); fi  # the caller chooses the markers
done
.venv/bin/python -m pytest -n "${LLM_SERVE_TEST_WORKERS:-2}" "${markers[@]}" --durations=20 --durations-min=0 "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi
exit "$rc"
