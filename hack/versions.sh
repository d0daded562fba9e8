# Pinned versions of the local control plane and where their binaries are cached.
# Sourced by hack/*.sh; change a version here and the cache key changes with it.
K8S_VERSION=${K8S_VERSION:-1.36.3}
ETCD_VERSION=${ETCD_VERSION:-3.6.16}
KWOK_VERSION=${KWOK_VERSION:-0.8.0}
HELM_VERSION=${HELM_VERSION:-3.19.0}
MB_CACHE=${MB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/modelbudget}

k8s_bin()  { echo "$MB_CACHE/k8s-v$K8S_VERSION/bin"; }
etcd_bin() { echo "$MB_CACHE/etcd-v$ETCD_VERSION/bin"; }
kwok_bin() { echo "$MB_CACHE/kwok-v$KWOK_VERSION/bin"; }
helm_bin() { echo "$MB_CACHE/helm-v$HELM_VERSION/bin"; }

# The node pool engines' real CRDs (hack/crds.sh), read from their Go modules and cached
# next to the binaries, never committed.
KARPENTER_VERSION=${KARPENTER_VERSION:-1.15.0}
CLUSTER_API_VERSION=${CLUSTER_API_VERSION:-1.13.6}
# Gateway API standard channel (GatewayClass, Gateway, HTTPRoute): the routes whose backend
# weights the operator publishes.
GATEWAY_API_VERSION=${GATEWAY_API_VERSION:-1.7.0}
crd_dir()  { echo "$MB_CACHE/crds/$1-v$2"; }
