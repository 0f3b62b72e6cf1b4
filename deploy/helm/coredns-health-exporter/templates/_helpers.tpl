{{/* The chart's name, and the name of its objects (the release's when it holds it). */}}
{{- define "che.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "che.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "che.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "che.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels on every object: Helm's, and part-of (as deploy/base's kustomization). */}}
{{- define "che.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: coredns-health-exporter
{{- end -}}

{{/* The Deployment's pods: its selector, and the Service's. */}}
{{- define "che.selector" -}}
app.kubernetes.io/name: {{ include "che.name" . }}
{{- end -}}

{{/* The DaemonSet's pods (the job name of their PodMonitor, which the per-node rules select). */}}
{{- define "che.nodeSelector" -}}
app.kubernetes.io/name: {{ include "che.name" . }}-node
{{- end -}}

{{- define "che.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "che.webhookSecret" -}}
{{- .Values.webhook.existingSecret | default (printf "%s-webhook" (include "che.fullname" .)) -}}
{{- end -}}

{{/* The flags both workloads share, after --remediation. */}}
{{- define "che.probeArgs" -}}
{{- with .Values.probe.interval }}
- --interval={{ . }}
{{- end }}
{{- with .Values.probe.timeout }}
- --timeout={{ . }}
{{- end }}
{{- with .Values.probe.protocol }}
- --protocol={{ . }}
{{- end }}
{{- range .Values.probe.queries }}
- --query={{ .name }}{{ with .type }}/{{ . }}{{ end }}
{{- range .expect }}
- --expect={{ . }}
{{- end }}
{{- end }}
{{- with .Values.probe.endpoint }}
- --probe-endpoint={{ . }}
{{- end }}
{{- end -}}

{{/* The container's hardening, and the pods' (the "restricted" Pod Security Standard). */}}
{{- define "che.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "che.securityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end -}}

{{/* The kubelet's probes: HTTPS with a web config (it does not verify the certificate). */}}
{{- define "che.probes" -}}
livenessProbe:
  httpGet:
    path: /-/healthy
    port: http
    {{- if .Values.webConfig.secretName }}
    scheme: HTTPS
    {{- end }}
  periodSeconds: 10
  failureThreshold: 3
readinessProbe:
  httpGet:
    path: /-/ready
    port: http
    {{- if .Values.webConfig.secretName }}
    scheme: HTTPS
    {{- end }}
  periodSeconds: 5
{{- end -}}
