#!/usr/bin/env bash
# The operator on the local testbed, end to end: a GPU Deployment behind a synthetic vLLM server
# whose demand ramps up and down, a KwokNodePool of fake 4-GPU nodes, and the operator keeping
# spend under the ModelBudget in examples/local-demo.yaml.
#
#   hack/demo.sh [up]    start the testbed if needed, then everything above (idempotent)
#   hack/demo.sh down    stop the demo's processes, delete namespace demo and the pool (testbed stays)
#
# Settings (environment, with defaults):
#   MB_DEMO_RAMP="0:1,60:12,240:12,300:3"   demand in req/s, piecewise linear over seconds
#   MB_DEMO_INTERVAL=10                      seconds between reconciles
#   MB_DEMO_TOKENS=800                       mean tokens a request wants to generate
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
RAMP=${MB_DEMO_RAMP:-0:1,60:12,240:12,300:3}
INTERVAL=${MB_DEMO_INTERVAL:-10}
TOKENS=${MB_DEMO_TOKENS:-800}
PYTHON=${MB_PYTHON:-$REPO/.venv/bin/python}
MODELBUDGET=$(dirname "$PYTHON")/modelbudget
OPERATOR_METRICS=127.0.0.1:19300
OPERATOR_LIVENESS=127.0.0.1:19301
LOCAL=$REPO/.local
LOGS=$LOCAL/logs
RUN=$LOCAL/run
source "$REPO/hack/lib.sh"

say() { echo "[demo] $*"; }
die() { echo "demo: $*" >&2; exit 1; }

# stop NAME: stop the demo process of .local/run/NAME.pid and wait until it has exited.
stop() {
  local name=$1 pid
  pid=$(cat "$RUN/$name.pid" 2>/dev/null) || return 0
  if pid_alive "$pid" && belongs_to "$pid" "$LOCAL"; then
    stop_pid "$pid" && say "stopped $name (pid $pid)"
  fi
  rm -f "$RUN/$name.pid"
}

start_bg() {
  local name=$1; shift
  (cd "$REPO" && exec setsid "$@" >>"$LOGS/$name.log" 2>&1 </dev/null) &
  echo $! >"$RUN/$name.pid"
  say "started $name (pid $!, log $LOGS/$name.log)"
}

testbed_env() { eval "$("$REPO/hack/testbed.sh" env)"; }

cmd_down() {
  testbed_env
  # The operator's finalizer is on the ModelBudget: delete it while the operator still runs.
  kubectl delete modelbudgets --all -n demo --ignore-not-found --timeout 30s >/dev/null 2>&1 \
    || kubectl patch modelbudget demo-llm -n demo --type merge -p '{"metadata":{"finalizers":null}}' >/dev/null 2>&1 \
    || true
  stop demo-operator
  stop demo-modelserver
  kubectl delete namespace demo --ignore-not-found --wait=false >/dev/null
  kubectl delete kwoknodepools.testbed.modelbudget.dev gpu-pool --ignore-not-found >/dev/null
  say "demo removed (the testbed keeps running: hack/testbed.sh down)"
}

cmd_up() {
  mkdir -p "$LOGS" "$RUN"
  # The demo's own ports first, checked as the testbed checks its own: free, or the holder named.
  stop demo-operator
  stop demo-modelserver
  local server=${MB_MODELSERVER_ADDR:-127.0.0.1:19400}
  ports_free "${server##*:}:model server" "${OPERATOR_METRICS##*:}:operator metrics" \
    "${OPERATOR_LIVENESS##*:}:operator liveness" \
    || die "cannot start: ports are taken (above); stop the holder (or hack/demo.sh down for an earlier demo)"
  "$REPO/hack/testbed.sh" up
  testbed_env

  kubectl apply -f "$REPO/crds/modelbudget.dev_modelbudgets.yaml" -f "$REPO/crds/modelbudget.dev_gpupools.yaml" >/dev/null
  kubectl wait --for condition=Established --timeout 60s crd/modelbudgets.modelbudget.dev crd/gpupools.modelbudget.dev >/dev/null
  kubectl create namespace demo --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  kubectl apply -f - >/dev/null <<EOF
apiVersion: testbed.modelbudget.dev/v1alpha1
kind: KwokNodePool
metadata:
  name: gpu-pool
spec:
  replicas: 1
  gpusPerNode: 4
  gpuType: nvidia-l4
  provisioningDelaySeconds: 10
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: demo-llm
  namespace: demo
  labels: {app: demo-llm}
spec:
  replicas: 1
  selector:
    matchLabels: {app: demo-llm}
  template:
    metadata:
      labels: {app: demo-llm}
    spec:
      nodeSelector: {modelbudget.dev/pool: gpu-pool}
      tolerations:
        - {key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}
      containers:
        - name: server
          image: fake.invalid/vllm:latest
          resources:
            requests: {nvidia.com/gpu: "1"}
            limits: {nvidia.com/gpu: "1"}
EOF
  say "namespace demo, Deployment demo-llm (1 replica), KwokNodePool gpu-pool (1 node) applied"

  start_bg demo-modelserver "$PYTHON" -m modelbudget.testbed.modelserver --kubeconfig "$KUBECONFIG" \
    --namespace demo --deployment demo-llm --listen "$MB_MODELSERVER_ADDR" \
    --rate-curve "$RAMP" --generated-tokens-mean "$TOKENS" --tokens-per-second-per-replica 1000
  start_bg demo-operator "$MODELBUDGET" run --kubeconfig "$KUBECONFIG" --namespace demo \
    --interval "$INTERVAL" --lease-namespace demo --inline-cluster-pools=allow \
    --metrics-addr "$OPERATOR_METRICS" --liveness "http://$OPERATOR_LIVENESS/healthz"
  kubectl apply -f "$REPO/examples/local-demo.yaml" >/dev/null
  say "ModelBudget demo-llm applied (examples/local-demo.yaml); demand ramps along $RAMP req/s"
  cat <<EOF

Watch it:
  eval "\$(hack/testbed.sh env)"
  kubectl get mb -n demo -w                      # spend, plan, Ready
  kubectl get deploy,pods -n demo -w             # replicas following demand
  kubectl get kwoknodepools,nodes -w             # GPU nodes following replicas
  kubectl describe mb -n demo demo-llm           # conditions and Events
  curl -s http://$OPERATOR_METRICS/metrics | grep ^modelbudget_
Step the demand by hand:  curl -X POST -d '{"rps": 20}' http://$MB_MODELSERVER_ADDR/control
Stop:                     hack/demo.sh down
EOF
}

case ${1:-up} in
  up) cmd_up ;;
  down) cmd_down ;;
  *) echo "usage: $0 [up|down]" >&2; exit 2 ;;
esac
