#!/usr/bin/env bash
# Builds the local control plane from the Go module proxy, cached by version outside the repo:
#   kube-apiserver, kube-controller-manager, kube-scheduler, kubectl  (k8s.io/kubernetes)
#   etcd (go.etcd.io/etcd/server/v3), kwok + kwokctl (sigs.k8s.io/kwok), helm (helm.sh/helm/v3)
# No release binaries can be downloaded here, so everything is compiled.  A second run with the
# cache present only checks that the binaries exist.  Two copies may run at once (CI's
# background build and `make demo`, say): each component is built holding a lock on
# $MB_CACHE/<component>.lock, so the second copy waits for the first and then finds it cached.
#
# Usage: hack/build-binaries.sh [all|etcd|kwok|k8s|helm]...   (default: all)
# Prints the bin directory of each component on its last line ("BIN <name> <dir>").
set -euo pipefail
source "$(dirname "$0")/versions.sh"

die() { echo "build-binaries: $*" >&2; exit 1; }
log() { echo "[build-binaries $(date +%H:%M:%S)] $*" >&2; }

command -v go >/dev/null || die "Go is not installed (need go >= 1.26 on PATH: apt or /usr/local/go)"
export GOFLAGS="-mod=mod" GOTOOLCHAIN=local CGO_ENABLED=0

# A wrapper module directory, created fresh per build so nothing leaks into the repo.
wrapper() {
  local dir="$MB_CACHE/src/$1"; rm -rf "$dir"; mkdir -p "$dir"; echo "$dir"
}

have() { local d=$1; shift; for b in "$@"; do [ -x "$d/$b" ] || return 1; done; }

build_k8s() {
  local out; out=$(k8s_bin)
  if have "$out" kube-apiserver kube-controller-manager kube-scheduler kubectl; then log "kubernetes v$K8S_VERSION cached in $out"; return; fi
  log "kubernetes v$K8S_VERSION: resolving staging modules from the upstream go.mod"
  local gomod
  gomod=$(go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])') \
    || die "cannot download k8s.io/kubernetes@v$K8S_VERSION: is the Go module proxy reachable (GOPROXY=$(go env GOPROXY))?"
  local minor=${K8S_VERSION#*.}; minor=${minor%%.*}; local patch=${K8S_VERSION##*.}
  local staging; staging=$(sed -n 's#^[[:space:]]*\(k8s\.io/[^ ]*\) => \./staging/.*#\1#p' "$gomod" | sort -u)
  [ -n "$staging" ] || die "no staging replace lines found in $gomod"
  local dir; dir=$(wrapper k8s)
  {
    echo "module local/k8sbuild"; echo; echo "go 1.26"; echo
    echo "require k8s.io/kubernetes v$K8S_VERSION"; echo
    for m in $staging; do echo "replace $m => $m v0.$minor.$patch"; done
  } > "$dir/go.mod"
  cat > "$dir/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
  log "kubernetes: $(echo "$staging" | wc -l) staging modules pinned at v0.$minor.$patch; go mod tidy"
  (cd "$dir" && go mod tidy) || die "go mod tidy failed for the kubernetes wrapper module"
  local ld="-s -w" pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $pkg.gitVersion=v$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ld+=" -X $pkg.gitTreeState=clean -X $pkg.gitCommit=modelbudget-local-build -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  log "kubernetes: compiling 4 commands (about 5 min cold on 2 cores; 10 min for everything)"
  mkdir -p "$out.tmp"
  (cd "$dir" && go build -trimpath -ldflags "$ld" -o "$out.tmp/" \
      k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl) || die "kubernetes build failed"
  rm -rf "$out"; mv "$out.tmp" "$out"
  log "kubernetes: $("$out/kube-apiserver" --version)"
}

build_etcd() {
  local out; out=$(etcd_bin)
  if have "$out" etcd; then log "etcd v$ETCD_VERSION cached in $out"; return; fi
  # etcd's own go.mod has replace lines (so `go install` refuses it); as a dependency of a
  # wrapper module those replaces are ignored and the published modules are used instead.
  local dir; dir=$(wrapper etcd)
  printf 'module local/etcdbuild\n\ngo 1.26\n\nrequire go.etcd.io/etcd/server/v3 v%s\n' "$ETCD_VERSION" > "$dir/go.mod"
  printf '//go:build tools\n\npackage tools\n\nimport _ "go.etcd.io/etcd/server/v3"\n' > "$dir/tools.go"
  log "etcd v$ETCD_VERSION: go mod tidy + build"
  (cd "$dir" && go mod tidy) || die "go mod tidy failed for etcd"
  mkdir -p "$out.tmp"
  (cd "$dir" && go build -trimpath -ldflags "-s -w" -o "$out.tmp/etcd" go.etcd.io/etcd/server/v3) || die "etcd build failed"
  rm -rf "$out"; mv "$out.tmp" "$out"
  log "etcd: $("$out/etcd" --version | head -1)"
}

build_kwok() {
  local out; out=$(kwok_bin)
  if have "$out" kwok kwokctl; then log "kwok v$KWOK_VERSION cached in $out"; return; fi
  log "kwok v$KWOK_VERSION: go install kwok kwokctl"
  mkdir -p "$out.tmp"
  GOBIN="$out.tmp" GOFLAGS= go install -trimpath -ldflags "-s -w" \
    "sigs.k8s.io/kwok/cmd/kwok@v$KWOK_VERSION" "sigs.k8s.io/kwok/cmd/kwokctl@v$KWOK_VERSION" || die "kwok build failed"
  rm -rf "$out"; mv "$out.tmp" "$out"
}

build_helm() {
  local out; out=$(helm_bin)
  if have "$out" helm; then log "helm v$HELM_VERSION cached in $out"; return; fi
  log "helm v$HELM_VERSION: go install"
  mkdir -p "$out.tmp"
  GOBIN="$out.tmp" GOFLAGS= go install -trimpath \
    -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=v$HELM_VERSION" \
    "helm.sh/helm/v3/cmd/helm@v$HELM_VERSION" || die "helm build failed"
  rm -rf "$out"; mv "$out.tmp" "$out"
  log "helm: $("$out/helm" version --short)"
}

# locked NAME: build_NAME holding NAME's lock. Without it, two concurrent builds share the
# wrapper module and the .tmp output directory and break each other.
locked() {
  local lock="$MB_CACHE/$1.lock" fd
  mkdir -p "$MB_CACHE"
  exec {fd}>"$lock"
  if ! flock -n "$fd"; then
    log "$1: another build holds $lock; waiting for it"
    flock "$fd"
  fi
  "build_$1"
  exec {fd}>&-
}

targets=("$@"); [ ${#targets[@]} -gt 0 ] || targets=(all)
for t in "${targets[@]}"; do
  case $t in
    all) locked etcd; locked kwok; locked k8s; locked helm ;;
    etcd|kwok|k8s|helm) locked "$t" ;;
    *) die "unknown target '$t' (all|etcd|kwok|k8s|helm)" ;;
  esac
done
log "done"
