#!/usr/bin/env bash
# System packages the tests need beyond the venv, installed only when missing (idempotent):
#   promtool + prometheus (Debian package `prometheus`): alert-rule checks/unit tests and the
#   real Prometheus server the end-to-end test starts (tests/prom_server.py).
# Needs root or passwordless sudo and apt; exits non-zero (tests then skip) when it cannot.
set -euo pipefail

if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
  echo "prometheus/promtool already installed: $(prometheus --version 2>&1 | head -1)"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_test_deps: apt-get not available; install Prometheus (promtool, prometheus) yourself" >&2
  exit 1
fi
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
  else
    echo "install_test_deps: need root (or passwordless sudo) to apt-get install prometheus" >&2
    exit 1
  fi
fi

export DEBIAN_FRONTEND=noninteractive
echo "==> apt-get install prometheus (promtool, prometheus server)"
"${SUDO[@]}" apt-get update -q
"${SUDO[@]}" apt-get install -y -q --no-install-recommends prometheus
# Where systemd runs, the package starts a system Prometheus on :9090; tests start their own
# on free ports, so switch the system one off again.
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
  "${SUDO[@]}" systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
prometheus --version 2>&1 | head -1
