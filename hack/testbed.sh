#!/usr/bin/env bash
# The local testbed: a real control plane whose GPU nodes are kwok fakes, the KwokNodePool
# controller (the local node pool provider) and Prometheus, all bound to 127.0.0.1.
#
#   hack/testbed.sh up       start what is not running yet (idempotent), print each phase's time
#   hack/testbed.sh down     stop everything started here, wait until it has exited and its
#                            ports are free, and delete its state (logs stay)
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
# `up` checks every port it needs before starting anything and names the process holding a
# taken one. If a phase fails, it says which, shows the last lines of that component's log and
# stops whatever this call started. Readiness waits allow $MB_READY_TIMEOUT seconds each (a cold
# first start on a loaded machine can take minutes), print progress, fail at once when the
# awaited process exits, and start a component that died during start-up once more.
#
# Settings (environment, with defaults):
#   MB_PROMETHEUS_ADDR=127.0.0.1:19090  MB_MODELSERVER_ADDR=127.0.0.1:19400  MB_SCRAPE_INTERVAL=2s
#   MB_APISERVER_PORT=16443  MB_ETCD_PORT=12379  MB_ETCD_PEER_PORT=12380  MB_KCM_PORT=20257
#   MB_SCHEDULER_PORT=20259  MB_KWOK_PORT=20247  MB_CLUSTER_NAME=modelbudget  MB_READY_TIMEOUT=300
#   MB_PYTHON=<repo>/.venv/bin/python   MB_PROMETHEUS_BIN=$(command -v prometheus)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
source "$REPO/hack/versions.sh"
source "$REPO/hack/lib.sh"

PROMETHEUS_ADDR=${MB_PROMETHEUS_ADDR:-127.0.0.1:19090}
MODELSERVER_ADDR=${MB_MODELSERVER_ADDR:-127.0.0.1:19400}
SCRAPE_INTERVAL=${MB_SCRAPE_INTERVAL:-2s}
CLUSTER=${MB_CLUSTER_NAME:-modelbudget}
READY_TIMEOUT=${MB_READY_TIMEOUT:-300}
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
# kwokctl's components, in the order it starts them.
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok-controller)

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

# Where each log stood when this `up` started its process: failures show only what came after.
declare -A LOG_START=()
mark_log() { LOG_START[$1]=$(stat -c %s "$1" 2>/dev/null || echo 0); }
new_log_tail() { log_tail "$1" "${2:-15}" "${LOG_START[$1]:-0}"; }

# fail_phase WHY LOG...: the phase failed: say why, with the last lines of each log.
fail_phase() {
  local why=$1 log; shift
  {
    echo "testbed: phase '$PHASE' failed: $why"
    for log in "$@"; do new_log_tail "$log"; done
  } >&2
  exit 1
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

# The control plane's ports: from the cluster's saved config once it exists (ports are fixed
# when it is created), else from the settings.
saved_port() { sed -n "s/^[[:space:]]*$1:[[:space:]]*\([0-9]*\)[[:space:]]*$/\1/p" "$CLUSTER_DIR/kwok.yaml" 2>/dev/null | head -1; }
control_plane_ports() {
  local key default what port
  while read -r key default what; do
    port=$(saved_port "$key"); echo "${port:-$default}:$what"
  done <<EOF
kubeApiserverPort ${MB_APISERVER_PORT:-16443} kube-apiserver
etcdPort ${MB_ETCD_PORT:-12379} etcd
etcdPeerPort ${MB_ETCD_PEER_PORT:-12380} etcd-peer
kubeControllerManagerPort ${MB_KCM_PORT:-20257} kube-controller-manager
kubeSchedulerPort ${MB_SCHEDULER_PORT:-20259} kube-scheduler
kwokControllerPort ${MB_KWOK_PORT:-20247} kwok-controller
EOF
}
prometheus_port() { echo "${PROMETHEUS_ADDR##*:}:prometheus"; }

# require_ports_free PORT:WHAT...: fail at once, naming each taken port's holder.
require_ports_free() {
  ports_free "$@" && return 0
  die "cannot start: ports are taken (above). Stop the holder, or choose other ports (MB_*_PORT, MB_PROMETHEUS_ADDR;
  docs/testbed.md). A holder from this checkout is a leftover: hack/testbed.sh down stops it."
}

pid_of() { local pid; pid=$(tr -d '[:space:]' 2>/dev/null <"$RUN/$1.pid") && echo "$pid"; }
is_running() { pid_alive "$(pid_of "$1")"; }
component_pid() { tr -d '[:space:]' 2>/dev/null <"$CLUSTER_DIR/pids/$1.pid"; }
component_log() { echo "$CLUSTER_DIR/logs/$1.log"; }

# start_bg NAME CMD...: start CMD detached (own session, so a Ctrl-C in the caller's shell
# does not reach it), logging to .local/logs/NAME.log, pid in .local/run/NAME.pid.
start_bg() {
  local name=$1; shift
  mark_log "$LOGS/$name.log"
  (cd "$REPO" && exec setsid "$@" >>"$LOGS/$name.log" 2>&1 </dev/null 9>&-) &
  echo $! >"$RUN/$name.pid"
}

apiserver_ready() { [ -s "$KUBECONFIG_FILE" ] && kc get --raw /readyz >/dev/null 2>&1; }

# wait_ready WHAT PID_FN LOG CMD...: poll CMD every 0.5 s, up to $READY_TIMEOUT s, with a progress
# line every 15 s; fail the phase on timeout with the last lines of LOG. PID_FN (word-split, so
# it may carry an argument) prints the pid of the process being waited for: once it has exited
# there is nothing to wait for, and wait_ready returns 3 at once.
wait_ready() {
  local what=$1 pid_fn=$2 log=$3; shift 3
  local start=$SECONDS next=15 elapsed
  until "$@" >/dev/null 2>&1; do
    pid_alive "$($pid_fn)" || return 3
    elapsed=$((SECONDS - start))
    [ "$elapsed" -lt "$READY_TIMEOUT" ] \
      || fail_phase "timed out after ${READY_TIMEOUT}s waiting for $what (MB_READY_TIMEOUT)" "$log"
    if [ "$elapsed" -ge "$next" ]; then
      say "  still waiting for $what (${elapsed}s of ${READY_TIMEOUT}s)"
      next=$((next + 15))
    fi
    sleep 0.5
  done
}

# wait_process WHAT PID_FN LOG CMD...: wait_ready, failing the phase if the process exits.
wait_process() {
  local rc=0
  wait_ready "$@" || rc=$?
  [ "$rc" = 0 ] || fail_phase "$1: the process exited" "$3"
}

# wait_component WHAT COMPONENT CMD...: wait_ready for a kwokctl component; one that exits
# is started once more (restart_components).
wait_component() {
  local what=$1 c=$2 rc=0; shift 2
  wait_ready "$what" "component_pid $c" "$(component_log "$c")" "$@" || rc=$?
  [ "$rc" = 0 ] && return 0
  restart_components "$c"
  rc=0
  wait_ready "$what" "component_pid $c" "$(component_log "$c")" "$@" || rc=$?
  [ "$rc" = 0 ] || fail_phase "$what: $c exited again" "$(component_log "$c")"
}

# dead_components: the kwokctl components that were started and have exited.
dead_components() {
  local c pid
  for c in "${COMPONENTS[@]}"; do
    pid=$(component_pid "$c") || continue
    if [ -n "$pid" ] && ! pid_alive "$pid"; then echo "$c"; fi
  done
}

# kwokctl_up: `kwokctl create cluster` (on a cluster created before, it starts what is not
# running), in the background and watched: a component that exits meanwhile ends it at once
# (kwokctl itself would wait two minutes for the apiserver) and is printed.
kwokctl_up() {
  [ -f "$CLUSTER_DIR/kwok.yaml" ] || kwokctl_config >"$LOCAL/kwokctl.yaml"
  "$KWOKCTL" --config "$LOCAL/kwokctl.yaml" --config "$REPO/hack/manifests/kwok-stages.yaml" \
    --name "$CLUSTER" create cluster --kubeconfig "$KUBECONFIG_FILE" >>"$LOGS/kwokctl.log" 2>&1 9>&- &
  local pid=$! dead
  while pid_alive "$pid"; do
    dead=$(dead_components)
    if [ -n "$dead" ]; then
      kill "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
      echo "$dead"
      return 1
    fi
    sleep 0.5
  done
  wait "$pid"
}

# restart_components COMPONENT...: they exited during start-up: start them once more, as a cold
# first start can make one give up (e.g. kube-controller-manager on a slow apiserver). One that
# could not bind its port is not retried.
restart_components() {
  local c
  for c in "$@"; do
    new_log_tail "$(component_log "$c")" 50 | grep -q "address already in use" \
      && fail_phase "$c could not bind its port" "$(component_log "$c")"
    say "  $c exited during start-up; starting it once more"
    new_log_tail "$(component_log "$c")" 5
    rm -f "$CLUSTER_DIR/pids/$c.pid"  # kwokctl starts a component only when its pid file is stale
  done
  local dead logs=()
  dead=$(kwokctl_up) && return 0
  [ -n "$dead" ] || fail_phase "kwokctl failed" "$LOGS/kwokctl.log"
  for c in $dead; do logs+=("$(component_log "$c")"); done
  fail_phase "$(echo $dead) exited again" "${logs[@]}"
}

start_control_plane() {
  local dead c pid
  mark_log "$LOGS/kwokctl.log"
  for c in "${COMPONENTS[@]}"; do
    mark_log "$(component_log "$c")"
    # A pid file left by an earlier run (a reboot, a kill) would read as a death right away;
    # and kwokctl takes a zombie's pid for a running component and would not start it.
    if pid=$(component_pid "$c") && ! pid_alive "$pid"; then rm -f "$CLUSTER_DIR/pids/$c.pid"; fi
  done
  dead=$(kwokctl_up) && return 0
  [ -n "$dead" ] || fail_phase "kwokctl failed" "$LOGS/kwokctl.log"
  restart_components $dead
}

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


# What this `up` started, so that a failure stops exactly that.
STARTED=()

up_control_plane() {
  phase "control plane (kwokctl)"
  if apiserver_ready; then
    phase_done "already running"
    return
  fi
  STARTED+=(control-plane)
  ln -sfn "$CLUSTER_DIR/logs" "$LOGS/kwok"
  ln -sfn "$CLUSTER_DIR/pids" "$RUN/kwok"
  start_control_plane
  [ -s "$KUBECONFIG_FILE" ] || cp "$CLUSTER_DIR/kubeconfig.yaml" "$KUBECONFIG_FILE"
  wait_component "the apiserver" kube-apiserver apiserver_ready
  phase_done
  # Pods need the namespace's default ServiceAccount, which kube-controller-manager creates:
  # once it exists, the controllers are working.
  phase "kube-controller-manager"
  wait_component "kube-controller-manager (default ServiceAccount)" kube-controller-manager \
    kc -n default get serviceaccount default
  phase_done
}

up_pool_controller() {
  phase "KwokNodePool CRD + controller"
  kc apply -f "$REPO/hack/manifests/kwoknodepool-crd.yaml" >/dev/null
  kc wait --for condition=Established --timeout "${READY_TIMEOUT}s" crd/kwoknodepools.testbed.modelbudget.dev >/dev/null
  if is_running poolcontroller; then
    phase_done "already running"
    return
  fi
  local log=$LOGS/poolcontroller.log
  STARTED+=(poolcontroller)
  start_bg poolcontroller "$PYTHON" -m modelbudget.testbed.poolcontroller --kubeconfig "$KUBECONFIG_FILE"
  # Only what this start logs counts: the log keeps earlier runs.
  wait_process "the pool controller" "pid_of poolcontroller" "$log" \
    bash -c 'tail -c +$(($2 + 1)) "$1" | grep -q reconciling' _ "$log" "${LOG_START[$log]}"
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
  STARTED+=(prometheus)
  start_bg prometheus "$PROMETHEUS_BIN" --config.file="$PROM_DIR/prometheus.yml" \
    --storage.tsdb.path="$PROM_DIR/data" --storage.tsdb.retention.time=2d \
    --web.listen-address="$PROMETHEUS_ADDR" --web.enable-lifecycle
  wait_process "prometheus" "pid_of prometheus" "$LOGS/prometheus.log" curl -fsS "http://$PROMETHEUS_ADDR/-/ready"
  phase_done
}

# After a failed `up`: stop what it started, newest first. The cluster's state and every log
# stay for a look (`down` deletes the state).
undo_up() {
  local i
  [ ${#STARTED[@]} -gt 0 ] || return 0
  echo "testbed: stopping what this 'up' started: ${STARTED[*]}" >&2
  for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do
    case ${STARTED[i]} in
      control-plane) stop_control_plane ;;
      *) stop_run "${STARTED[i]}" ;;
    esac
  done
}

cmd_up() {
  check_binaries
  mkdir -p "$LOGS" "$RUN"
  # Every port first: a taken one fails here, before anything starts.
  local ports=()
  apiserver_ready || ports+=($(control_plane_ports))
  is_running prometheus || ports+=("$(prometheus_port)")
  require_ports_free "${ports[@]}"
  trap 'undo_up' EXIT
  local t0; t0=$(now_ms)
  up_control_plane
  up_pool_controller
  phase "node pool engines' CRDs"; KUBECONFIG=$KUBECONFIG_FILE "$REPO/hack/crds.sh" install; phase_done
  up_prometheus
  trap - EXIT
  PHASE=total PHASE_T0=$t0 phase_done
  say "ready: eval \"\$(hack/testbed.sh env)\""
}

# stop_run NAME: stop the process of .local/run/NAME.pid, if it is this checkout's.
stop_run() {
  local pid; pid=$(pid_of "$1") || return 0
  if pid_alive "$pid" && belongs_to "$pid" "$LOCAL"; then
    stop_pid "$pid" && say "stopped $1 (pid $pid)"
  fi
  rm -f "$RUN/$1.pid"
}

# stop_port_holders PORT:WHAT...: stop the processes of this checkout listening on these ports
# (one whose pid file is lost, e.g. after a crash); others are left alone.
stop_port_holders() {
  local spec pid
  for spec in "$@"; do
    for pid in $(port_pids "${spec%%:*}"); do
      if belongs_to "$pid" "$LOCAL"; then
        say "stopping $(describe_pid "$pid"), untracked on port ${spec%%:*}"
        stop_pid "$pid"
      fi
    done
  done
}

# stop_control_plane: stop every kwokctl component, newest first, including one restarted by
# hand (a fault test writes its new pid into kwokctl's pid file) and any process of this
# checkout still listening on a control-plane port; returns once they have all exited. The pid
# files go too: kwokctl takes a zombie's pid for a running component and would not start it.
stop_control_plane() {
  local i c pid
  for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do
    c=${COMPONENTS[i]}
    pid=$(component_pid "$c") || continue
    if pid_alive "$pid" && belongs_to "$pid" "$LOCAL"; then
      stop_pid "$pid" && say "stopped $c (pid $pid)"
    fi
    rm -f "$CLUSTER_DIR/pids/$c.pid"
  done
  stop_port_holders $(control_plane_ports)
}

cmd_down() {
  local name spec busy=()
  # Every process with a pid file here, the demo's too: the files go with .local/run.
  for name in "$RUN"/*.pid; do
    if [ -f "$name" ]; then stop_run "$(basename "$name" .pid)"; fi
  done
  stop_port_holders "$(prometheus_port)"
  stop_control_plane
  # The components' logs live in the cluster's directory: keep a copy for post-mortems.
  if [ -d "$CLUSTER_DIR/logs" ]; then
    rm -rf "$LOGS/kwok.previous" && cp -r "$CLUSTER_DIR/logs" "$LOGS/kwok.previous"
  fi
  if [ -d "$CLUSTER_DIR" ] && [ -x "$KWOKCTL" ]; then
    # Nothing runs any more; kwokctl removes the cluster's state and its kubeconfig context
    # (--kubeconfig: never ~/.kube/config).
    "$KWOKCTL" --name "$CLUSTER" delete cluster --kubeconfig "$KUBECONFIG_FILE" >>"$LOGS/kwokctl.log" 2>&1 \
      || say "kwokctl delete cluster failed (see $LOGS/kwokctl.log); removing its state directly"
    say "deleted cluster $CLUSTER"
  fi
  # A port still taken now is someone else's (another checkout's testbed?): name it.
  for spec in $(control_plane_ports) "$(prometheus_port)"; do
    if port_taken "${spec%%:*}"; then busy+=("$spec"); fi
  done
  rm -rf "$KWOK_WORKDIR" "$PROM_DIR" "$RUN" "$KUBECONFIG_FILE" "$LOCAL/kwokctl.yaml" "$LOGS/kwok"
  if [ ${#busy[@]} -gt 0 ]; then
    ports_free "${busy[@]}" || true
    die "this checkout's testbed is stopped, but the ports above are held by processes that are not its own"
  fi
}

cmd_status() {
  local name
  if apiserver_ready; then say "apiserver: ready ($(kc config view --minify -o jsonpath='{.clusters[0].cluster.server}'))"
  else say "apiserver: down"; fi
  for name in "${COMPONENTS[@]}"; do
    [ -f "$CLUSTER_DIR/pids/$name.pid" ] || continue
    if pid_alive "$(component_pid "$name")"; then say "$name: running (pid $(component_pid "$name"))"
    else say "$name: NOT running"; fi
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
