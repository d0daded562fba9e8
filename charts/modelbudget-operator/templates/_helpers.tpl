{{/* Names and labels, the usual way: <release>-<chart> unless the release name already holds it. */}}
{{- define "mb.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mb.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "mb.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mb.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "mb.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "mb.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "mb.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mb.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "mb.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "mb.leaseName" -}}
{{- default (include "mb.fullname" .) .Values.leaderElection.leaseName }}
{{- end }}

{{/*
Permissions in every namespace whose ModelBudgets are reconciled. The chart README lists the
same rules (tests/unit/test_chart.py keeps the two equal); each one names the code that needs it.
*/}}
{{- define "mb.namespacedRules" -}}
# kopf: watch ModelBudgets, add/remove its finalizer (controller/handlers.py).
- apiGroups: ["modelbudget.dev"]
  resources: ["modelbudgets"]
  verbs: ["list", "watch", "patch"]
# kopf: the status patch of each reconcile.
- apiGroups: ["modelbudget.dev"]
  resources: ["modelbudgets/status"]
  verbs: ["patch"]
# kopf.event: Events on changes (condition flips, actions taken).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
# adapters/scaler.py: set the serving Deployment's replicas.
- apiGroups: ["apps"]
  resources: ["deployments/scale"]
  verbs: ["patch"]
# adapters/scaler.py: replicas and ready replicas, from a watched mirror (adapters/watchcache.py);
# adapters/tokenlimit.py: the pod-template annotation (tokenLimits.publish.podTemplateAnnotation).
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["list", "watch", "patch"]
# adapters/tokenlimit.py: the token-limit ConfigMap (read from a watched mirror of the operator's own, by label; GET before a write).
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch", "create", "patch"]
# adapters/secrets.py: Prometheus credentials and CA named in spec.metrics (get by name only).
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
# adapters/conflicts.py: another autoscaler on the same Deployment makes the operator stand back
# (read from a watched mirror: adapters/watchcache.py).
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["list", "watch"]
- apiGroups: ["keda.sh"]
  resources: ["scaledobjects"]
  verbs: ["list", "watch"]
# adapters/routing.py: the variants' weights on the HTTPRoute named in spec.routing (get by name).
- apiGroups: ["gateway.networking.k8s.io"]
  resources: ["httproutes"]
  verbs: ["get", "patch"]
# adapters/capacitybuffer.py: the forecast's headroom in the ModelBudget's own CapacityBuffer
# (read from a watched mirror of the operator's, by label; GET before a write; never deleted).
- apiGroups: ["autoscaling.x-k8s.io"]
  resources: ["capacitybuffers"]
  verbs: ["get", "list", "watch", "create", "patch"]
{{- if .Values.rbac.nodePoolProviders.clusterAPI }}
# adapters/nodepools.py: Cluster API pools are sized by spec.replicas.
- apiGroups: ["cluster.x-k8s.io"]
  resources: ["machinedeployments"]
  verbs: ["get", "patch"]
{{- end }}
{{- end }}

{{/* Cluster-scoped permissions: needed in every mode, Nodes and most pool providers have no namespace. */}}
{{- define "mb.clusterRules" -}}
# adapters/nodepools.py: nodes running in each pool (by label selector, from a watched mirror).
- apiGroups: [""]
  resources: ["nodes"]
  verbs: ["list", "watch"]
# controller/handlers.py + adapters/gpupools.py: the pool reconciler (one writer per shared pool).
- apiGroups: ["modelbudget.dev"]
  resources: ["gpupools"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["modelbudget.dev"]
  resources: ["gpupools/status"]
  verbs: ["patch"]
# adapters/gpupools.py: a namespace's labels, matched against a GpuPool's namespaceSelector.
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["get"]
{{- if .Values.rbac.nodePoolProviders.karpenter }}
# adapters/nodepools.py: Karpenter pools are sized by spec.limits["nvidia.com/gpu"].
- apiGroups: ["karpenter.sh"]
  resources: ["nodepools"]
  verbs: ["get", "patch"]
{{- end }}
{{- if .Values.rbac.nodePoolProviders.kwok }}
# adapters/nodepools.py: the local testbed's pools.
- apiGroups: ["testbed.modelbudget.dev"]
  resources: ["kwoknodepools"]
  verbs: ["get", "patch"]
{{- end }}
{{- end }}
