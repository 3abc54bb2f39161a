{{/* Chart name. */}}
{{- define "nanogate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{/* Resource name prefix: the release name, with the chart name appended unless present. */}}
{{- define "nanogate.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "nanogate.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "nanogate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "nanogate.labels" -}}
helm.sh/chart: {{ include "nanogate.chart" . }}
{{ include "nanogate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: nanogate
{{- end -}}

{{/* Labels selecting the operator pods. */}}
{{- define "nanogate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "nanogate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "nanogate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (printf "%s-operator" (include "nanogate.fullname" .)) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Names shared by the templates and the operator's flags. */}}
{{- define "nanogate.webhookService" -}}{{ include "nanogate.fullname" . }}-webhook{{- end -}}
{{- define "nanogate.hubService" -}}{{ include "nanogate.fullname" . }}-hub{{- end -}}
{{- define "nanogate.metricsService" -}}{{ include "nanogate.fullname" . }}-metrics{{- end -}}
{{- define "nanogate.mutatingWebhook" -}}{{ include "nanogate.fullname" . }}-injector{{- end -}}
{{- define "nanogate.validatingWebhook" -}}{{ include "nanogate.fullname" . }}-validator{{- end -}}
{{- define "nanogate.leaseName" -}}{{ include "nanogate.fullname" . }}-operator{{- end -}}
{{/* The Secret the operator creates for its CA and serving certificate (never templated). */}}
{{- define "nanogate.certSecret" -}}{{ include "nanogate.webhookService" . }}-certs{{- end -}}
{{/* The Secret cert-manager writes in cert-manager mode. */}}
{{- define "nanogate.certManagerSecret" -}}{{ include "nanogate.webhookService" . }}-tls{{- end -}}

{{/* The operator's nano-agent image: repository@digest, else repository:tag (appVersion). */}}
{{- define "nanogate.sidecarImage" -}}
{{- with .Values.sidecar.image -}}
{{- if .digest -}}
{{ .repository }}@{{ .digest }}
{{- else -}}
{{ .repository }}:{{ default $.Chart.AppVersion .tag }}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "nanogate.hubAdvertise" -}}
{{- if .Values.localDevelopment.enabled -}}
{{- .Values.localDevelopment.hubAdvertise -}}
{{- else if .Values.hubAdvertise -}}
{{- .Values.hubAdvertise -}}
{{- else -}}
{{- printf "%s.%s.svc:%v" (include "nanogate.hubService" .) .Release.Namespace .Values.service.hub.port -}}
{{- end -}}
{{- end -}}

{{/* Namespaces the webhooks never see: the configured ones plus the release namespace. */}}
{{- /*
namespaceSelector of a webhook: [$ extraLabels excludeRelease]. The built-in exclusion
(excludeNamespaces, and the release namespace when excludeRelease, by
kubernetes.io/metadata.name), ANDed with webhook.namespaceSelector and with the matchLabels
extraLabels (which win over the user's on the same key).
*/ -}}
{{- define "nanogate.namespaceSelector" -}}
{{- $ := index . 0 -}}
{{- $user := $.Values.webhook.namespaceSelector | default dict -}}
{{- $labels := merge (dict) (index . 1) ($user.matchLabels | default dict) -}}
{{- $excluded := $.Values.webhook.excludeNamespaces -}}
{{- if index . 2 }}{{ $excluded = append $excluded $.Release.Namespace }}{{ end -}}
namespaceSelector:
  {{- with $labels }}
  matchLabels:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  matchExpressions:
    - key: kubernetes.io/metadata.name
      operator: NotIn
      values:
        {{- range ($excluded | uniq) }}
        - {{ . | quote }}
        {{- end }}
    {{- with $user.matchExpressions }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end -}}

{{- /*
objectSelector of an injection webhook: [$ extraLabels extraExpressions], ANDed with
webhook.inject.objectSelector; nothing when all are empty (every pod).
*/ -}}
{{- define "nanogate.objectSelector" -}}
{{- $ := index . 0 -}}
{{- $user := $.Values.webhook.inject.objectSelector | default dict -}}
{{- $labels := merge (dict) (index . 1) ($user.matchLabels | default dict) -}}
{{- $exprs := concat (index . 2) ($user.matchExpressions | default list) -}}
{{- if or $labels $exprs }}
objectSelector:
  {{- with $labels }}
  matchLabels:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $exprs }}
  matchExpressions:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- end -}}

{{/* failurePolicy of the injector / the validator: the deprecated webhook.failurePolicy wins. */}}
{{- define "nanogate.injectFailurePolicy" -}}
{{- .Values.webhook.failurePolicy | default .Values.webhook.inject.failurePolicy -}}
{{- end -}}
{{- define "nanogate.validateFailurePolicy" -}}
{{- .Values.webhook.failurePolicy | default .Values.webhook.validate.failurePolicy -}}
{{- end -}}

{{/* clientConfig of a webhook; $path is "/mutate" or "/validate". */}}
{{- define "nanogate.clientConfig" -}}
{{- $ := index . 0 -}}
{{- $path := index . 1 -}}
clientConfig:
  {{- if $.Values.localDevelopment.enabled }}
  url: {{ printf "%s%s" $.Values.localDevelopment.webhookURL $path | quote }}
  {{- else }}
  service:
    name: {{ include "nanogate.webhookService" $ }}
    namespace: {{ $.Release.Namespace }}
    path: {{ $path }}
    port: {{ $.Values.service.webhook.port }}
  {{- end }}
{{- end -}}

{{/* Annotations of the webhook configurations (cert-manager's CA injection in that mode). */}}
{{- define "nanogate.webhookAnnotations" -}}
{{- if and .Values.webhook.certManager.enabled (not .Values.localDevelopment.enabled) }}
  annotations:
    cert-manager.io/inject-ca-from: {{ printf "%s/%s" .Release.Namespace (include "nanogate.webhookService" .) }}
{{- end }}
{{- end -}}
