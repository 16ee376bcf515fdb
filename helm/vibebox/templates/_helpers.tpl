{{/* Names, labels and per-service settings shared by the templates. */}}

{{- define "vibebox.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "vibebox.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Labels every object carries. Call with (dict "root" $ "component" "gateway"). */}}
{{- define "vibebox.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: vibebox
{{ include "vibebox.selectorLabels" . }}
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The labels pods are selected by. */}}
{{- define "vibebox.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vibebox.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Selects every pod of this release (the default-deny policy). */}}
{{- define "vibebox.releaseSelector" -}}
app.kubernetes.io/name: {{ include "vibebox.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "vibebox.image" -}}
{{- $img := .root.Values.image -}}
{{- $tag := default .root.Chart.AppVersion $img.tag -}}
{{- if $img.registry -}}
{{- printf "%s/%s/%s:%s" $img.registry $img.repositoryPrefix .service $tag -}}
{{- else -}}
{{- printf "%s/%s:%s" $img.repositoryPrefix .service $tag -}}
{{- end -}}
{{- end -}}

{{- define "vibebox.tlsSecret" -}}
{{- $names := .root.Values.tls.secretNames | default dict -}}
{{- default (printf "%s-%s-tls" (include "vibebox.fullname" .root) .service) (get $names .service) -}}
{{- end -}}

{{- define "vibebox.serviceName" -}}
{{- printf "%s-%s" (include "vibebox.fullname" .root) .service -}}
{{- end -}}

{{- define "vibebox.url" -}}
{{- $port := (get .root.Values .service).port -}}
{{- printf "https://%s:%v" (include "vibebox.serviceName" .) $port -}}
{{- end -}}

{{- define "vibebox.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "vibebox.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "vibebox.dindSecret" -}}
{{- default (printf "%s-dind-tls" (include "vibebox.fullname" .)) .Values.dind.serverTlsSecret -}}
{{- end -}}

{{- define "vibebox.dindClientSecret" -}}
{{- default (printf "%s-dind-client-tls" (include "vibebox.fullname" .)) .Values.dind.clientTlsSecret -}}
{{- end -}}

{{/* A NetworkPolicy peer selecting one component's pods. */}}
{{- define "vibebox.peer" -}}
- podSelector:
    matchLabels:
      {{- include "vibebox.selectorLabels" . | nindent 6 }}
{{- end -}}

{{/* Egress to cluster DNS. */}}
{{- define "vibebox.dnsEgress" -}}
- to:
    - namespaceSelector:
        {{- toYaml .Values.networkPolicies.dns.namespaceSelector | nindent 8 }}
      podSelector:
        {{- toYaml .Values.networkPolicies.dns.podSelector | nindent 8 }}
  ports:
    - {protocol: UDP, port: 53}
    - {protocol: TCP, port: 53}
{{- end -}}
