#!/usr/bin/env bash
# Installs what the project needs on a fresh Debian machine, idempotently:
#   Debian's prometheus (the real metrics backend of the testbed), a Python venv with the
#   project and its test extras.  Go (>= 1.26) must already be on the machine: it builds the
#   control plane (hack/build-binaries.sh); Debian's golang is too old for Kubernetes 1.36.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "[setup $(date +%H:%M:%S)] $*" >&2; }

need_apt=()
command -v prometheus >/dev/null || need_apt+=(prometheus)
command -v make >/dev/null || need_apt+=(make)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
if ((${#need_apt[@]})); then
  log "apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
# The Debian package starts a system Prometheus on :9090; the testbed runs its own on loopback.
if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
  systemctl stop prometheus || true
fi

VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  python3 -m venv "$VENV"
fi
stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  log "pip install -e '.[test]'"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -e '.[test]'
  touch "$stamp"
fi
command -v go >/dev/null || log "WARNING: no Go toolchain on PATH; the e2e tier needs it (hack/build-binaries.sh)"
log "ready"
