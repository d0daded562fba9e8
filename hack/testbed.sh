#!/usr/bin/env bash
# The local testbed: a real control plane whose GPU nodes are kwok fakes, the KwokNodePool
# controller (the local node pool provider) and Prometheus, all bound to 127.0.0.1.
#
#   hack/testbed.sh up       start what is not running yet (idempotent), print each phase's time
#   hack/testbed.sh down     stop everything started here and delete its state (logs stay)
#   hack/testbed.sh status   what runs, plus the node pools and nodes
#   hack/testbed.sh env      `eval "$(hack/testbed.sh env)"` sets KUBECONFIG, PROMETHEUS_URL, PATH
#
# The control plane is `kwokctl create cluster --runtime binary`, given every binary from
# hack/build-binaries.sh by path so it never downloads anything. kwokctl rather than starting
# the processes by hand, because it already generates the PKI, the kubeconfigs and the kwok
# stage config, knows each version's flags, and starts etcd, kube-apiserver,
# kube-controller-manager (Deployments, ReplicaSets, GC), kube-scheduler and kwok-controller
# with fixed ports on 127.0.0.1. Its state, logs and pids live under .local/kwok/ (linked
# from .local/logs/kwok and .local/run/kwok); nothing is written to ~/.kwok or ~/.kube.
# hack/manifests/kwok-stages.yaml adds a per-pod start-up delay (annotation
# testbed.modelbudget.dev/startup-delay) to kwok's default behaviour.
# The model server is not started here: a test or demo runs one per Deployment
# (python -m modelbudget.testbed.modelserver) on $MB_MODELSERVER_ADDR, which Prometheus scrapes.
#
# Settings (environment, with defaults):
#   MB_PROMETHEUS_ADDR=127.0.0.1:19090  MB_MODELSERVER_ADDR=127.0.0.1:19400  MB_SCRAPE_INTERVAL=2s
#   MB_APISERVER_PORT=16443  MB_ETCD_PORT=12379  MB_ETCD_PEER_PORT=12380  MB_KCM_PORT=20257
#   MB_SCHEDULER_PORT=20259  MB_KWOK_PORT=20247  MB_CLUSTER_NAME=modelbudget
#   MB_PYTHON=<repo>/.venv/bin/python   MB_PROMETHEUS_BIN=$(command -v prometheus)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
source "$REPO/hack/versions.sh"

PROMETHEUS_ADDR=${MB_PROMETHEUS_ADDR:-127.0.0.1:19090}
MODELSERVER_ADDR=${MB_MODELSERVER_ADDR:-127.0.0.1:19400}
SCRAPE_INTERVAL=${MB_SCRAPE_INTERVAL:-2s}
CLUSTER=${MB_CLUSTER_NAME:-modelbudget}
PYTHON=${MB_PYTHON:-$REPO/.venv/bin/python}
PROMETHEUS_BIN=${MB_PROMETHEUS_BIN:-$(command -v prometheus || echo /usr/bin/prometheus)}

LOCAL=$REPO/.local
LOGS=$LOCAL/logs
RUN=$LOCAL/run
KUBECONFIG_FILE=$LOCAL/kubeconfig
export KWOK_WORKDIR=$LOCAL/kwok
CLUSTER_DIR=$KWOK_WORKDIR/clusters/$CLUSTER
PROM_DIR=$LOCAL/prometheus
KWOKCTL=$(kwok_bin)/kwokctl
KUBECTL=$(k8s_bin)/kubectl
export KWOK_KUBECTL_BINARY=$KUBECTL

die() { echo "testbed: $*" >&2; exit 1; }
say() { echo "[testbed] $*"; }
kc() { "$KUBECTL" --kubeconfig "$KUBECONFIG_FILE" "$@"; }
now_ms() { echo $(($(date +%s%N) / 1000000)); }

PHASE='' PHASE_T0=''
phase() { PHASE=$1; PHASE_T0=$(now_ms); say "$PHASE ..."; }
phase_done() {
  local ms=$(($(now_ms) - PHASE_T0))
  printf '[testbed] %-34s %3d.%01ds\n' "$PHASE${1:+ ($1)}" $((ms / 1000)) $((ms % 1000 / 100))
}

# wait_until SECONDS WHAT CMD...: poll CMD every 0.5 s; on timeout, fail naming WHAT and the logs.
wait_until() {
  local timeout=$1 what=$2; shift 2
  local deadline=$(($(date +%s) + timeout))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || die "timed out after ${timeout}s waiting for $what (logs: $LOGS)"
    sleep 0.5
  done
}

check_binaries() {
  local missing=() b
  for b in "$(k8s_bin)"/{kube-apiserver,kube-controller-manager,kube-scheduler,kubectl} \
           "$(etcd_bin)/etcd" "$(kwok_bin)"/{kwok,kwokctl}; do
    [ -x "$b" ] || missing+=("$b")
  done
  [ ${#missing[@]} -eq 0 ] || die "missing binaries: ${missing[*]}
  build them first (about 10 min cold on 2 cores, cached afterwards):  hack/build-binaries.sh"
  [ -x "$PROMETHEUS_BIN" ] || die "prometheus not found ($PROMETHEUS_BIN): apt-get install prometheus, or set MB_PROMETHEUS_BIN"
  [ -x "$PYTHON" ] || die "no Python at $PYTHON: create the venv (python3 -m venv .venv && .venv/bin/pip install -e '.[test]') or set MB_PYTHON"
}

pid_of() { cat "$RUN/$1.pid" 2>/dev/null; }
is_running() { local pid; pid=$(pid_of "$1") && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; }

# start_bg NAME CMD...: start CMD detached (own session, so a Ctrl-C in the caller's shell
# does not reach it), logging to .local/logs/NAME.log, pid in .local/run/NAME.pid.
start_bg() {
  local name=$1; shift
  (cd "$REPO" && exec setsid "$@" >>"$LOGS/$name.log" 2>&1 </dev/null 9>&-) &
  echo $! >"$RUN/$name.pid"
}

stop_bg() {
  local name=$1 pid
  pid=$(pid_of "$name") || return 0
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    say "stopped $name (pid $pid)"
  fi
  rm -f "$RUN/$name.pid"
}

apiserver_ready() { [ -s "$KUBECONFIG_FILE" ] && kc get --raw /readyz >/dev/null 2>&1; }

kwokctl_config() {
  cat <<EOF
apiVersion: config.kwok.x-k8s.io/v1alpha1
kind: KwokctlConfiguration
options:
  runtime: binary
  bindAddress: 127.0.0.1
  kubeVersion: v$K8S_VERSION
  etcdVersion: $ETCD_VERSION
  kubeApiserverPort: ${MB_APISERVER_PORT:-16443}
  etcdPort: ${MB_ETCD_PORT:-12379}
  etcdPeerPort: ${MB_ETCD_PEER_PORT:-12380}
  kubeControllerManagerPort: ${MB_KCM_PORT:-20257}
  kubeSchedulerPort: ${MB_SCHEDULER_PORT:-20259}
  kwokControllerPort: ${MB_KWOK_PORT:-20247}
  kubeApiserverBinary: $(k8s_bin)/kube-apiserver
  kubeControllerManagerBinary: $(k8s_bin)/kube-controller-manager
  kubeSchedulerBinary: $(k8s_bin)/kube-scheduler
  kubectlBinary: $KUBECTL
  etcdBinary: $(etcd_bin)/etcd
  kwokControllerBinary: $(kwok_bin)/kwok
EOF
}

up_control_plane() {
  phase "control plane (kwokctl)"
  if apiserver_ready; then
    phase_done "already running"
    return
  fi
  if [ -f "$CLUSTER_DIR/kwok.yaml" ]; then
    # Created before but stopped (e.g. after a reboot): start it with its saved config.
    "$KWOKCTL" --name "$CLUSTER" start cluster --wait 120s >>"$LOGS/kwokctl.log" 2>&1 9>&- \
      || die "kwokctl start cluster failed, see $LOGS/kwokctl.log"
  else
    kwokctl_config >"$LOCAL/kwokctl.yaml"
    "$KWOKCTL" --config "$LOCAL/kwokctl.yaml" --config "$REPO/hack/manifests/kwok-stages.yaml" \
      --name "$CLUSTER" create cluster \
      --kubeconfig "$KUBECONFIG_FILE" --wait 120s >>"$LOGS/kwokctl.log" 2>&1 9>&- \
      || die "kwokctl create cluster failed, see $LOGS/kwokctl.log and $CLUSTER_DIR/logs/"
  fi
  [ -s "$KUBECONFIG_FILE" ] || cp "$CLUSTER_DIR/kubeconfig.yaml" "$KUBECONFIG_FILE"
  ln -sfn "$CLUSTER_DIR/logs" "$LOGS/kwok"
  ln -sfn "$CLUSTER_DIR/pids" "$RUN/kwok"
  wait_until 60 "the apiserver" apiserver_ready
  phase_done
  # Pods need the namespace's default ServiceAccount, which kube-controller-manager creates:
  # once it exists, the controllers are working.
  phase "kube-controller-manager"
  wait_until 90 "kube-controller-manager (default ServiceAccount)" kc -n default get serviceaccount default
  phase_done
}

up_pool_controller() {
  phase "KwokNodePool CRD + controller"
  kc apply -f "$REPO/hack/manifests/kwoknodepool-crd.yaml" >/dev/null
  kc wait --for condition=Established --timeout 60s crd/kwoknodepools.testbed.modelbudget.dev >/dev/null
  if is_running poolcontroller; then
    phase_done "already running"
    return
  fi
  start_bg poolcontroller "$PYTHON" -m modelbudget.testbed.poolcontroller --kubeconfig "$KUBECONFIG_FILE"
  wait_until 30 "the pool controller" grep -q "reconciling" "$LOGS/poolcontroller.log"
  phase_done
}

up_prometheus() {
  phase "prometheus ($PROMETHEUS_ADDR)"
  mkdir -p "$PROM_DIR/data" "$PROM_DIR/targets"
  sed -e "s#@SCRAPE_INTERVAL@#$SCRAPE_INTERVAL#g" -e "s#@MODELSERVER_ADDR@#$MODELSERVER_ADDR#g" \
      -e "s#@PROMETHEUS_ADDR@#$PROMETHEUS_ADDR#g" -e "s#@TARGETS_DIR@#$PROM_DIR/targets#g" \
      "$REPO/hack/manifests/prometheus.yml.tmpl" >"$PROM_DIR/prometheus.yml"
  if is_running prometheus; then
    curl -fsS -X POST "http://$PROMETHEUS_ADDR/-/reload" >/dev/null || die "prometheus rejected its config reload"
    phase_done "already running, config reloaded"
    return
  fi
  start_bg prometheus "$PROMETHEUS_BIN" --config.file="$PROM_DIR/prometheus.yml" \
    --storage.tsdb.path="$PROM_DIR/data" --storage.tsdb.retention.time=2d \
    --web.listen-address="$PROMETHEUS_ADDR" --web.enable-lifecycle
  wait_until 60 "prometheus" curl -fsS "http://$PROMETHEUS_ADDR/-/ready"
  phase_done
}

cmd_up() {
  check_binaries
  mkdir -p "$LOGS" "$RUN"
  local t0; t0=$(now_ms)
  up_control_plane
  up_pool_controller
  phase "node pool engines' CRDs"; KUBECONFIG=$KUBECONFIG_FILE "$REPO/hack/crds.sh" install; phase_done
  up_prometheus
  PHASE=total PHASE_T0=$t0 phase_done
  say "ready: eval \"\$(hack/testbed.sh env)\""
}

cmd_down() {
  stop_bg poolcontroller
  stop_bg prometheus
  if [ -d "$CLUSTER_DIR" ]; then
    [ -x "$KWOKCTL" ] || die "$KWOKCTL missing: cannot stop the cluster in $CLUSTER_DIR"
    # --kubeconfig: kwokctl removes its context there, and must not touch ~/.kube/config.
    "$KWOKCTL" --name "$CLUSTER" delete cluster --kubeconfig "$KUBECONFIG_FILE" >>"$LOGS/kwokctl.log" 2>&1 \
      || die "kwokctl delete cluster failed, see $LOGS/kwokctl.log"
    say "deleted cluster $CLUSTER"
  fi
  rm -rf "$KWOK_WORKDIR" "$PROM_DIR" "$RUN" "$KUBECONFIG_FILE" "$LOCAL/kwokctl.yaml" "$LOGS/kwok"
}

cmd_status() {
  local name
  if apiserver_ready; then say "apiserver: ready ($(kc config view --minify -o jsonpath='{.clusters[0].cluster.server}'))"
  else say "apiserver: down"; fi
  for name in "$RUN"/kwok/*.pid; do
    [ -f "$name" ] || continue
    if kill -0 "$(cat "$name")" 2>/dev/null; then say "$(basename "$name" .pid): running"
    else say "$(basename "$name" .pid): NOT running"; fi
  done
  for name in poolcontroller prometheus; do
    if is_running $name; then say "$name: running (pid $(pid_of $name))"; else say "$name: down"; fi
  done
  if apiserver_ready; then
    kc get kwoknodepools.testbed.modelbudget.dev 2>/dev/null || true
    kc get nodes -L nvidia.com/gpu.product 2>/dev/null || true
  fi
}

cmd_env() {
  echo "export KUBECONFIG=$KUBECONFIG_FILE"
  echo "export PROMETHEUS_URL=http://$PROMETHEUS_ADDR"
  echo "export MB_MODELSERVER_ADDR=$MODELSERVER_ADDR"
  echo "export MB_PROMETHEUS_TARGETS=$PROM_DIR/targets"
  echo "export PATH=$(k8s_bin):$(kwok_bin):$(helm_bin):\$PATH"
}

# up and down hold a lock: test sessions sharing the testbed may call them at the same time.
# Everything started in the background gets `9>&-`, or it would hold the lock forever.
locked() {
  mkdir -p "$LOCAL"
  exec 9>"$LOCAL/testbed.lock"
  flock 9
  "$@"
}

case ${1:-} in
  up) locked cmd_up ;;
  down) locked cmd_down ;;
  status) cmd_status ;;
  env) cmd_env ;;
  *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
