#!/usr/bin/env bash
# The real CRDs of the node pool engines the operator resizes, for the testbed:
#   karpenter.sh NodePool             sigs.k8s.io/karpenter     pkg/apis/crds/karpenter.sh_nodepools.yaml
#   cluster.x-k8s.io MachineDeployment sigs.k8s.io/cluster-api  config/crd/bases/cluster.x-k8s.io_machinedeployments.yaml
# SIG Autoscaling's CapacityBuffer, where the forecast's headroom goes on clusters that serve it:
#   autoscaling.x-k8s.io CapacityBuffer sigs.k8s.io/karpenter   pkg/apis/crds/autoscaling.x-k8s.io_capacitybuffers.yaml
# and the Gateway API's standard channel, whose HTTPRoute backend weights the operator sets:
#   gateway.networking.k8s.io GatewayClass, Gateway, HTTPRoute  sigs.k8s.io/gateway-api  config/crd/standard/
# Each is read from its module's zip on the Go module proxy (checksummed by `go mod download`
# against the Go checksum database), at the version pinned in hack/versions.sh, and cached in
# $MB_CACHE/crds/; a second run only checks the cache.
#
# Usage: hack/crds.sh fetch      cache the CRD files, print their paths
#        hack/crds.sh install    fetch, then apply them to $KUBECONFIG's cluster and wait until
#                                they are Established (hack/testbed.sh up calls this)
set -euo pipefail
source "$(dirname "$0")/versions.sh"

die() { echo "crds: $*" >&2; exit 1; }
log() { echo "[crds $(date +%H:%M:%S)] $*" >&2; }

# name module version path-in-module
CRDS=(
  "karpenter sigs.k8s.io/karpenter $KARPENTER_VERSION pkg/apis/crds/karpenter.sh_nodepools.yaml"
  "karpenter sigs.k8s.io/karpenter $KARPENTER_VERSION pkg/apis/crds/autoscaling.x-k8s.io_capacitybuffers.yaml"
  "cluster-api sigs.k8s.io/cluster-api $CLUSTER_API_VERSION config/crd/bases/cluster.x-k8s.io_machinedeployments.yaml"
  "gateway-api sigs.k8s.io/gateway-api $GATEWAY_API_VERSION config/crd/standard/gateway.networking.k8s.io_gatewayclasses.yaml"
  "gateway-api sigs.k8s.io/gateway-api $GATEWAY_API_VERSION config/crd/standard/gateway.networking.k8s.io_gateways.yaml"
  "gateway-api sigs.k8s.io/gateway-api $GATEWAY_API_VERSION config/crd/standard/gateway.networking.k8s.io_httproutes.yaml"
)

# fetch_one NAME MODULE VERSION PATH: the cached file's path on stdout.
fetch_one() {
  local name=$1 module=$2 version=$3 path=$4
  local out; out="$(crd_dir "$name" "$version")/$(basename "$path")"
  if [ -s "$out" ]; then echo "$out"; return; fi
  command -v go >/dev/null || die "Go is not installed: it fetches $module@v$version from the Go module proxy"
  log "$module@v$version: go mod download"
  # The module's zip is all we need. `go mod download` still reports an error when the module's
  # go.mod asks for a newer Go than the local toolchain (karpenter does), after it has downloaded
  # and verified the zip: so the exit status is not the verdict, a verified Zip in the report is.
  local report zip
  report=$(cd /tmp && GOFLAGS=-mod=mod GOTOOLCHAIN=local go mod download -json "$module@v$version" 2>&1) || true
  zip=$(python3 -c 'import json,sys; d=json.loads(sys.stdin.read()); print(d["Zip"] if d.get("Sum") and d.get("Zip") else "")' \
    <<<"$report" 2>/dev/null) || zip=''
  [ -n "$zip" ] && [ -s "$zip" ] || die "cannot download $module@v$version: is the Go module proxy reachable (GOPROXY=$(go env GOPROXY))?
$report"
  mkdir -p "$(dirname "$out")"
  python3 - "$zip" "$module@v$version/$path" "$out.tmp" <<'PY' || die "$path not found in $zip"
import sys, zipfile
archive, member, out = sys.argv[1:]
with zipfile.ZipFile(archive) as z, open(out, "wb") as f:
    f.write(z.read(member))
PY
  mv "$out.tmp" "$out"
  log "cached $out"
  echo "$out"
}

cmd_fetch() {
  local entry
  for entry in "${CRDS[@]}"; do
    # shellcheck disable=SC2086  # the entry is four words on purpose
    fetch_one $entry
  done
}

cmd_install() {
  local kubectl files
  kubectl=$(k8s_bin)/kubectl
  [ -x "$kubectl" ] || die "no kubectl at $kubectl: run hack/build-binaries.sh"
  [ -n "${KUBECONFIG:-}" ] || die "KUBECONFIG is not set: eval \"\$(hack/testbed.sh env)\""
  mapfile -t files < <(cmd_fetch)
  local args=() f
  for f in "${files[@]}"; do args+=(-f "$f"); done
  # Server-side: these CRDs are too large for client-side apply's last-applied annotation.
  "$kubectl" apply --server-side --force-conflicts --field-manager modelbudget-testbed "${args[@]}" >/dev/null \
    || die "the apiserver refused a CRD (${files[*]})"
  "$kubectl" wait --for condition=Established --timeout 60s \
    crd/nodepools.karpenter.sh crd/machinedeployments.cluster.x-k8s.io >/dev/null \
    || die "the engines' CRDs did not become Established"
  "$kubectl" wait --for condition=Established --timeout 60s \
    crd/gatewayclasses.gateway.networking.k8s.io crd/gateways.gateway.networking.k8s.io \
    crd/httproutes.gateway.networking.k8s.io >/dev/null \
    || die "the Gateway API CRDs did not become Established"
  "$kubectl" wait --for condition=Established --timeout 60s crd/capacitybuffers.autoscaling.x-k8s.io >/dev/null \
    || die "the CapacityBuffer CRD did not become Established"
  log "installed karpenter v$KARPENTER_VERSION NodePool and CapacityBuffer, cluster-api v$CLUSTER_API_VERSION MachineDeployment"
  log "installed gateway-api v$GATEWAY_API_VERSION GatewayClass, Gateway, HTTPRoute (standard channel)"
}

case ${1:-} in
  fetch) cmd_fetch ;;
  install) cmd_install ;;
  *) echo "usage: $0 fetch|install" >&2; exit 2 ;;
esac
