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

{{/* Where the mutual-TLS material comes from: "certManager" (Certificates),
     "secrets" (Secrets the operator made: tls.existingSecrets, or any Secret
     named in tls.secretNames / dind.*TlsSecret) or "chart" (the chart's own
     CA, see vibebox.pki). */}}
{{- define "vibebox.tlsSource" -}}
{{- $named := or .Values.dind.serverTlsSecret .Values.dind.clientTlsSecret -}}
{{- range $service, $name := (.Values.tls.secretNames | default dict) -}}
{{- if $name -}}{{- $named = true -}}{{- end -}}
{{- end -}}
{{- if .Values.tls.certManager.enabled -}}
certManager
{{- else if or .Values.tls.existingSecrets $named -}}
secrets
{{- else -}}
chart
{{- end -}}
{{- end -}}

{{/* Refuses to take over a Secret this release did not make (an operator's
     Secret with a default name, from before the chart made its own PKI):
     Helm would fail later with a less helpful message. */}}
{{- define "vibebox.pki.owned" -}}
{{- $root := index . 0 -}}
{{- $old := index . 1 -}}
{{- $what := index . 2 -}}
{{- if $old -}}
{{- $annotations := $old.metadata.annotations | default dict -}}
{{- if ne (get $annotations "meta.helm.sh/release-name" | toString) $root.Release.Name -}}
{{- fail (printf "Secret %s/%s exists and was not made by release %q: set tls.existingSecrets=true to use the Secrets you made (for %s), or delete it so that the chart makes its own" $root.Release.Namespace $old.metadata.name $root.Release.Name $what) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* One Secret of the chart's PKI: kept as it is in the cluster (lookup)
     while it names the same subject, is signed by the current CA and has
     more than renewBeforeDays left; otherwise issued anew. Arguments: dict
     root, name, cn, dns, ips, ca (nil for a CA, else the signing CA's entry),
     days, out (the dict the entry is stored in). */}}
{{- define "vibebox.pki.issue" -}}
{{- $a := . -}}
{{- $root := $a.root -}}
{{- $g := $root.Values.tls.generated -}}
{{- $now := now | unixEpoch | atoi -}}
{{- $renewAt := add $now (mul (int $g.renewBeforeDays) 86400) -}}
{{- $subject := toJson (list $a.cn $a.dns $a.ips (ternary "ca" "leaf" (empty $a.ca))) | sha256sum | trunc 16 -}}
{{- $old := lookup "v1" "Secret" $root.Release.Namespace $a.name -}}
{{- include "vibebox.pki.owned" (list $root $old "the services' mutual TLS") -}}
{{- $keep := false -}}
{{- if $old -}}
{{- $ann := $old.metadata.annotations | default dict -}}
{{- $data := $old.data | default dict -}}
{{- if and (eq (get $ann "vibebox.io/subject" | toString) $subject) (gt (get $ann "vibebox.io/not-after" | toString | atoi) $renewAt) (get $data "tls.crt") (get $data "tls.key") -}}
{{- $keep = true -}}
{{- if $a.ca -}}
{{- $keep = eq (get $data "ca.crt" | toString) (get $a.ca.data "tls.crt") -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $entry := dict -}}
{{- if $keep -}}
{{- $ann := $old.metadata.annotations -}}
{{- $entry = dict "data" (dict "tls.crt" (get $old.data "tls.crt") "tls.key" (get $old.data "tls.key")) "notAfter" (get $ann "vibebox.io/not-after") "expires" (get $ann "vibebox.io/expires" | default "") -}}
{{- if $a.ca -}}
{{- $_ := set $entry.data "ca.crt" (get $old.data "ca.crt") -}}
{{- else -}}
{{- $_ := set $entry "cert" (buildCustomCert (get $old.data "tls.crt") (get $old.data "tls.key")) -}}
{{- end -}}
{{- else -}}
{{- $key := genPrivateKey "ecdsa" -}}
{{- $cert := dict -}}
{{- if $a.ca -}}
{{- $cert = genSignedCertWithKey $a.cn $a.ips $a.dns (int $a.days) $a.ca.cert $key -}}
{{- else -}}
{{- $cert = genCAWithKey $a.cn (int $a.days) $key -}}
{{- end -}}
{{- $entry = dict "data" (dict "tls.crt" (b64enc $cert.Cert) "tls.key" (b64enc $cert.Key)) "cert" $cert "notAfter" (add $now (mul (int $a.days) 86400) | toString) "expires" (dateInZone "2006-01-02T15:04:05Z" (now | dateModify (printf "+%dh" (mul (int $a.days) 24))) "UTC") -}}
{{- if $a.ca -}}
{{- $_ := set $entry.data "ca.crt" (get $a.ca.data "tls.crt") -}}
{{- end -}}
{{- end -}}
{{- $_ := set $entry "subject" $subject -}}
{{- $_ := set $a.out $a.name $entry -}}
{{- end -}}

{{/* The chart's own PKI (tls source "chart"), computed once per render and
     kept in .Values.__vibeboxPki (templates and the pods' checksums read
     the same keys): a CA for the five services (certificates with CN
     <service>, the identity server-kit reads when there is no URI SAN),
     and a second CA for the Docker daemon, so that no service certificate
     opens the daemon and no daemon certificate is a service identity.
     Keys are ECDSA P-256. Entries: name -> {data, notAfter, expires, subject}. */}}
{{- define "vibebox.pki" -}}
{{- if and (eq (include "vibebox.tlsSource" .) "chart") (not (hasKey .Values "__vibeboxPki")) -}}
{{- $root := . -}}
{{- $g := .Values.tls.generated -}}
{{- if ge (int $g.renewBeforeDays) (int $g.certValidityDays) -}}
{{- fail "tls.generated.renewBeforeDays must be less than tls.generated.certValidityDays (else every upgrade issues new certificates)" -}}
{{- end -}}
{{- $fullname := include "vibebox.fullname" . -}}
{{- $ns := .Release.Namespace -}}
{{- $out := dict -}}
{{- $caName := printf "%s-ca" $fullname -}}
{{- $dindCaName := printf "%s-dind-ca" $fullname -}}
{{- include "vibebox.pki.issue" (dict "root" $root "name" $caName "cn" (printf "VibeBox services CA %s/%s" $ns .Release.Name) "dns" (list) "ips" (list) "ca" nil "days" $g.caValidityDays "out" $out) -}}
{{- include "vibebox.pki.issue" (dict "root" $root "name" $dindCaName "cn" (printf "VibeBox Docker CA %s/%s" $ns .Release.Name) "dns" (list) "ips" (list) "ca" nil "days" $g.caValidityDays "out" $out) -}}
{{- range $service := list "gateway" "identity" "policy" "orchestrator" "audit" -}}
{{- $host := printf "%s-%s" $fullname $service -}}
{{- include "vibebox.pki.issue" (dict "root" $root "name" (include "vibebox.tlsSecret" (dict "root" $root "service" $service)) "cn" $service "dns" (list $host (printf "%s.%s.svc" $host $ns) "localhost") "ips" (list "127.0.0.1") "ca" (get $out $caName) "days" $g.certValidityDays "out" $out) -}}
{{- end -}}
{{- $dind := printf "%s-dind" $fullname -}}
{{- include "vibebox.pki.issue" (dict "root" $root "name" (include "vibebox.dindSecret" $root) "cn" $dind "dns" (list $dind (printf "%s.%s.svc" $dind $ns) "localhost") "ips" (list "127.0.0.1") "ca" (get $out $dindCaName) "days" $g.certValidityDays "out" $out) -}}
{{- include "vibebox.pki.issue" (dict "root" $root "name" (include "vibebox.dindClientSecret" $root) "cn" "orchestrator" "dns" (list) "ips" (list) "ca" (get $out $dindCaName) "days" $g.certValidityDays "out" $out) -}}
{{- $_ := set .Values "__vibeboxPki" $out -}}
{{- end -}}
{{- end -}}

{{/* checksum/tls of the chart-made Secrets a pod mounts (a renewed
     certificate rolls the pods that use it). Call with (dict "root" $
     "secrets" (list names...)). Empty unless the chart makes the PKI. */}}
{{- define "vibebox.pki.checksum" -}}
{{- include "vibebox.pki" .root -}}
{{- $pki := get .root.Values "__vibeboxPki" | default dict -}}
{{- $sum := list -}}
{{- range $name := .secrets -}}
{{- with get $pki $name -}}
{{- $sum = append $sum (get .data "tls.crt") -}}
{{- end -}}
{{- end -}}
{{- if $sum -}}
{{- join "," $sum | sha256sum -}}
{{- end -}}
{{- end -}}

{{/* Pod template metadata: the component's labels with podLabels (which
     cannot override them), podAnnotations and the given checksums. Call with
     (dict "root" $ "component" c "values" v "annotations" dict). */}}
{{- define "vibebox.podMetadata" -}}
{{- $labels := include "vibebox.labels" . | fromYaml -}}
{{- $labels = merge $labels (.values.podLabels | default dict) -}}
labels:
  {{- toYaml $labels | nindent 2 }}
{{- $annotations := merge (.annotations | default dict) (.values.podAnnotations | default dict) -}}
{{- with $annotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Scheduling extension points of a pod spec (nodeSelector, tolerations,
     affinity, topologySpreadConstraints, priorityClassName). A spread
     constraint without a labelSelector gets the component's pods. Call with
     (dict "root" $ "component" c "values" v). */}}
{{- define "vibebox.scheduling" -}}
{{- $v := .values -}}
{{- with $v.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with $v.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if $v.topologySpreadConstraints }}
{{- $selector := dict "matchLabels" (include "vibebox.selectorLabels" . | fromYaml) }}
topologySpreadConstraints:
  {{- range $c := $v.topologySpreadConstraints }}
  {{- $cc := deepCopy $c }}
  {{- if not (hasKey $cc "labelSelector") }}
  {{- $_ := set $cc "labelSelector" $selector }}
  {{- end }}
  - {{- toYaml $cc | nindent 4 }}
  {{- end }}
{{- end }}
{{- end -}}
