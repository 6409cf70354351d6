{{- define "customllm.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "customllm.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "customllm.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ include "customllm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The server pods: the Service, the PDB, the router's discovery and the autoscaling queries select these. */}}
{{- define "customllm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "customllm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: server
{{- end -}}

{{- define "customllm.routerSelectorLabels" -}}
app.kubernetes.io/name: {{ include "customllm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: router
{{- end -}}

{{/* terminationGracePeriodSeconds: at least preStop + the server's shutdown timeout (+10 s for the exit). */}}
{{- define "customllm.gracePeriod" -}}
{{- $floor := add .Values.preStopSleepSeconds .Values.server.shutdownTimeout -}}
{{- $grace := .Values.terminationGracePeriodSeconds | default (add $floor 10) -}}
{{- if lt (int $grace) (int $floor) -}}
{{- fail (printf "terminationGracePeriodSeconds (%v) must be at least preStopSleepSeconds + server.shutdownTimeout (%v), or in-flight requests are killed" $grace $floor) -}}
{{- end -}}
{{- $grace -}}
{{- end -}}

{{/* The waiting-requests query the autoscalers and the rules share: the queue of this release's replicas. */}}
{{- define "customllm.waitingQuery" -}}
sum(vllm:num_requests_waiting{namespace="{{ .Release.Namespace }}",service="{{ include "customllm.fullname" . }}"})
{{- end -}}

{{- define "customllm.checks" -}}
{{- if lt (int .Values.autoscaling.minReplicas) 1 -}}
{{- fail "autoscaling.minReplicas must be >= 1: a replica that scales from zero makes the first request wait for a model load" -}}
{{- end -}}
{{- if and .Values.autoscaling.keda.enabled .Values.autoscaling.hpa.enabled -}}
{{- fail "enable one of autoscaling.keda and autoscaling.hpa, not both: two autoscalers would fight over the Deployment" -}}
{{- end -}}
{{- end -}}

{{- define "customllm.scalingBehavior" -}}
scaleDown:
  stabilizationWindowSeconds: {{ .Values.autoscaling.scaleDown.stabilizationWindowSeconds }}
  policies:
    - type: Pods
      value: {{ .Values.autoscaling.scaleDown.podsPerPeriod }}
      periodSeconds: {{ .Values.autoscaling.scaleDown.periodSeconds }}
scaleUp:
  stabilizationWindowSeconds: {{ .Values.autoscaling.scaleUp.stabilizationWindowSeconds }}
  policies:
    - type: Pods
      value: {{ .Values.autoscaling.scaleUp.podsPerPeriod }}
      periodSeconds: {{ .Values.autoscaling.scaleUp.periodSeconds }}
{{- end -}}
