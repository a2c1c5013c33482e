{{/* Names, labels and the pieces several templates share. */}}

{{- define "shoal.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "shoal.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Object name of one part: (dict "root" $ "part" "agent") */}}
{{- define "shoal.part" -}}
{{- printf "%s-%s" (include "shoal.fullname" .root | trunc 50 | trimSuffix "-") .part -}}
{{- end -}}

{{- define "shoal.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
{{ include "shoal.selector" . }}
{{- end -}}

{{- define "shoal.selector" -}}
app.kubernetes.io/name: {{ include "shoal.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .part }}
{{- end -}}

{{- define "shoal.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The Secret with the cluster's keys and tokens (generated, or the operator's). */}}
{{- define "shoal.keysSecret" -}}
{{- default (include "shoal.part" (dict "root" . "part" "keys")) .Values.secrets.existingSecret -}}
{{- end -}}

{{- define "shoal.trackerURL" -}}
{{- printf "http://%s.%s.svc.%s:%d" (include "shoal.part" (dict "root" . "part" "tracker")) .Release.Namespace .Values.clusterDomain (int .Values.tracker.port) -}}
{{- end -}}

{{- define "shoal.originURL" -}}
{{- printf "http://%s.%s.svc.%s:%d" (include "shoal.part" (dict "root" . "part" "origin")) .Release.Namespace .Values.clusterDomain (int .Values.origin.port) -}}
{{- end -}}

{{/* Where a component finds an upstream's password: /etc/shoal/upstreams/<role>-<index>.password */}}
{{- define "shoal.passwordPath" -}}
{{- printf "/etc/shoal/upstreams/%s-%d.password" .role .index -}}
{{- end -}}

{{/*
The `upstreams` entries of a component's configuration, as JSON: (dict "root" $ "role" "origin"|"node").
A login is written only when the role has a username (the agent gets one only in node mode).
*/}}
{{- define "shoal.upstreams" -}}
{{- $out := list -}}
{{- range $i, $u := .root.Values.upstreams -}}
{{- $entry := dict "name" $u.name "url" $u.url -}}
{{- $login := get $u $.role | default dict -}}
{{- if and $login.username (or (eq $.role "origin") (eq $.root.Values.agent.auth.unauthenticated "node")) -}}
{{- $_ := set $entry "username" $login.username -}}
{{- $_ := set $entry "password" (dict "file" (include "shoal.passwordPath" (dict "role" $.role "index" $i))) -}}
{{- end -}}
{{- if $u.tokenRealms }}{{ $_ := set $entry "token_realms" $u.tokenRealms }}{{ end -}}
{{- if $u.redirectHosts }}{{ $_ := set $entry "redirect_hosts" $u.redirectHosts }}{{ end -}}
{{- $out = append $out $entry -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/*
The projected volume sources for the upstream passwords a role needs: (dict "root" $ "role" ...).
Each password comes from the upstream's existingSecret, or from <release>-upstreams.
*/}}
{{- define "shoal.passwordSources" -}}
{{- range $i, $u := .root.Values.upstreams -}}
{{- $login := get $u $.role | default dict -}}
{{- if and $login.username (or (eq $.role "origin") (eq $.root.Values.agent.auth.unauthenticated "node")) }}
- secret:
    name: {{ default (include "shoal.part" (dict "root" $.root "part" "upstreams")) $login.existingSecret }}
    items:
      - key: {{ ternary (default "password" $login.existingSecretKey) (printf "%s-%d" $.role $i) (not (empty $login.existingSecret)) }}
        path: {{ printf "%s-%d.password" $.role $i }}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The pod and container security settings every shoal container shares. */}}
{{- define "shoal.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "shoal.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The generated keys: the existing Secret's values when there is one (upgrades never rotate
them), else new ones. The public key is always derived from the private key (see secret.yaml). */}}
{{- define "shoal.generatedKeys" -}}
{{- $name := include "shoal.part" (dict "root" . "part" "keys") -}}
{{- $existing := (lookup "v1" "Secret" .Release.Namespace $name) | default dict -}}
{{- $data := (get $existing "data") | default dict -}}
{{- $signing := "" -}}
{{- if hasKey $data "origin-signing.pem" }}{{ $signing = index $data "origin-signing.pem" | b64dec }}{{ else }}{{ $signing = genPrivateKey "ed25519" }}{{ end -}}
{{- $node := "" -}}
{{- if hasKey $data "node.token" }}{{ $node = index $data "node.token" | b64dec }}{{ else }}{{ $node = randAlphaNum 43 }}{{ end -}}
{{- $registration := "" -}}
{{- if hasKey $data "registration.token" }}{{ $registration = index $data "registration.token" | b64dec }}{{ else }}{{ $registration = randAlphaNum 43 }}{{ end -}}
{{- toJson (dict "signing" $signing "public" (include "shoal.publicKey" $signing) "node" $node "registration" $registration) -}}
{{- end -}}

{{/*
The Ed25519 public key (PEM, SubjectPublicKeyInfo) of a private key PEM. Templates cannot do the
curve arithmetic, but sprig can make a self-signed certificate with the key: the certificate's
DER holds the key's SubjectPublicKeyInfo, which for Ed25519 is always these 12 bytes (SEQUENCE,
AlgorithmIdentifier id-Ed25519, BIT STRING of 33 bytes) and then the 32-byte public key.
split and trunc work on bytes. tests/deploy/test_helm.py checks the result against the
cryptography library's derivation.
*/}}
{{- define "shoal.publicKey" -}}
{{- $cert := genSelfSignedCertWithKey "shoal-origin" nil nil 1 . -}}
{{- $der := $cert.Cert | replace "-----BEGIN CERTIFICATE-----" "" | replace "-----END CERTIFICATE-----" "" | nospace | b64dec -}}
{{- $prefix := "\x30\x2a\x30\x05\x06\x03\x2b\x65\x70\x03\x21\x00" -}}
{{- $parts := splitList $prefix $der -}}
{{- if ne (len $parts) 2 }}{{ fail "secrets: the origin's signing key is not an Ed25519 key" }}{{ end -}}
{{- printf "-----BEGIN PUBLIC KEY-----\n%s\n-----END PUBLIC KEY-----\n" (printf "%s%s" $prefix (index $parts 1 | trunc 32) | b64enc) -}}
{{- end -}}
