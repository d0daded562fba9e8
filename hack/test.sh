#!/usr/bin/env bash
# The whole test suite, as CI runs it (README: `make test`):
#   set-up -> control-plane and image builds in the background -> lint + unit tier (and the hack/
#   script tests) -> wait for the builds -> testbed lifecycle tests (they start and stop it
#   themselves) -> testbed up -> e2e tier -> testbed down.
# Set MB_SKIP_E2E=1 for the unit tier only. The operator image (hack/build-image.sh, with buildah
# and podman it installs) is built and run by the e2e tier where it can be: as root, with buildah
# or apt-get at hand; MB_SKIP_IMAGE=1 leaves it out.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "[test $(date +%H:%M:%S)] $*" >&2; }
start=$SECONDS

hack/setup.sh
PY=${VENV:-.venv}/bin

mkdir -p .local/logs
build_pid= image_pid=
if [ "${MB_SKIP_E2E:-0}" != 1 ]; then
  log "building the control plane in the background (log: .local/logs/build-binaries.log)"
  hack/build-binaries.sh > .local/logs/build-binaries.log 2>&1 &
  build_pid=$!
  if [ "${MB_SKIP_IMAGE:-0}" != 1 ] && [ "$(id -u)" = 0 ] && { command -v buildah || command -v apt-get; } >/dev/null; then
    log "building the operator image in the background (log: .local/logs/build-image.log)"
    hack/build-image.sh --with-podman > .local/logs/build-image.log 2>&1 &
    image_pid=$!
  fi
fi

log "lint: ruff, mypy"
"$PY/ruff" check operator tests bench hack
"$PY/ruff" format --check operator tests bench hack
"$PY/mypy"
"$PY/modelbudget" crd --out-dir crds --check

# The chart tests run helm, which the background build provides: with a build under way they
# wait for it (and skip, outside CI, when there is no helm at all).
chart_tests=(tests/unit/test_chart.py tests/unit/test_alerts.py)
log "unit tier"
if [ -n "$build_pid" ]; then
  "$PY/pytest" tests/unit tests/hack -q -p no:cacheprovider "${chart_tests[@]/#/--ignore=}"
else
  "$PY/pytest" tests/unit tests/hack -q -p no:cacheprovider
fi
log "unit tier passed ($((SECONDS - start)) s so far)"

[ -n "$build_pid" ] || exit 0
if ! wait "$build_pid"; then
  tail -40 .local/logs/build-binaries.log >&2
  log "control-plane build failed"; exit 1
fi
log "control plane built ($((SECONDS - start)) s so far)"
"$PY/pytest" "${chart_tests[@]}" -q -p no:cacheprovider

image_tests=(--ignore tests/e2e/test_image.py)
if [ -n "$image_pid" ]; then
  if ! wait "$image_pid"; then
    tail -40 .local/logs/build-image.log >&2
    log "image build failed"; exit 1
  fi
  log "image built: $(tail -1 .local/logs/build-image.log) ($((SECONDS - start)) s so far)"
  image_tests=()
else
  log "no image build here (needs root and buildah or apt-get): skipping tests/e2e/test_image.py"
fi

# The lifecycle tests need the testbed down (the run ends with it down in any case).
hack/testbed.sh down
log "testbed lifecycle: up and down themselves"
CI=${CI:-1} "$PY/pytest" tests/e2e -m testbed_lifecycle -q -p no:cacheprovider
trap 'hack/testbed.sh down || true' EXIT
hack/testbed.sh up
log "e2e tier"
CI=${CI:-1} "$PY/pytest" tests/e2e -m e2e -q -p no:cacheprovider "${image_tests[@]}"
log "all tiers passed in $((SECONDS - start)) s"
