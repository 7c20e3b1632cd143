{{/* mailgate.name: the chart name, or nameOverride. */}}
{{- define "mailgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* mailgate.fullname: the base name of every object, at most 63 characters. */}}
{{- define "mailgate.fullname" -}}
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

{{/* mailgate.objectName: the full name with a suffix, kept within 63 characters. */}}
{{- define "mailgate.objectName" -}}
{{- $root := index . 0 -}}
{{- $suffix := index . 1 -}}
{{- printf "%s-%s" (include "mailgate.fullname" $root | trunc (int (sub 62 (len $suffix)))) $suffix | trimSuffix "-" -}}
{{- end -}}

{{/* mailgate.chart: chart name and version for the helm.sh/chart label. */}}
{{- define "mailgate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* mailgate.selectorLabels: the labels that select mailgate's pods. */}}
{{- define "mailgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mailgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: server
{{- end -}}

{{/* mailgate.labels: the standard labels of every object, plus commonLabels. */}}
{{- define "mailgate.labels" -}}
helm.sh/chart: {{ include "mailgate.chart" . }}
app.kubernetes.io/name: {{ include "mailgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: mailgate
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* mailgate.annotations: `annotations:` of an object's metadata (commonAnnotations and its own), or nothing. */}}
{{- define "mailgate.annotations" -}}
{{- $root := index . 0 -}}
{{- $all := merge (deepCopy (index . 1)) $root.Values.commonAnnotations -}}
{{- with $all }}
  annotations:
    {{- toYaml . | nindent 4 }}
{{- end }}
{{- end -}}

{{/* mailgate.serviceAccountName: the ServiceAccount the pods run as. */}}
{{- define "mailgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "mailgate.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* mailgate.image: repository with the digest, or the tag (default: appVersion). */}}
{{- define "mailgate.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* mailgate.listenerNames: the listeners the chart knows, in a fixed order. */}}
{{- define "mailgate.listenerNames" -}}
pop3 pop3s smtp lmtp
{{- end -}}

{{/* mailgate.clientListeners: enabled listeners on the client Service (not LMTP), space-separated. */}}
{{- define "mailgate.clientListeners" -}}
{{- $names := list -}}
{{- range $name := list "pop3" "pop3s" "smtp" -}}
{{- if (index $.Values.listeners $name).enabled -}}
{{- $names = append $names $name -}}
{{- end -}}
{{- end -}}
{{- join " " $names -}}
{{- end -}}

{{/* mailgate.listen: "address:port" for the pod, in brackets for IPv6. */}}
{{- define "mailgate.listen" -}}
{{- $root := index . 0 -}}
{{- $port := index . 1 -}}
{{- $addr := $root.Values.listenAddress -}}
{{- if contains ":" $addr -}}
{{- printf "[%s]:%d" $addr (int $port) -}}
{{- else -}}
{{- printf "%s:%d" $addr (int $port) -}}
{{- end -}}
{{- end -}}

{{/* mailgate.domainSlug: a domain name as a DNS label part (dots to dashes). */}}
{{- define "mailgate.domainSlug" -}}
{{- . | lower | replace "." "-" | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{/* mailgate.selfSigned: "true" when mailgate makes its own default certificate: tls.selfSigned=true, or left unset with no Secret and no cert-manager named. */}}
{{- define "mailgate.selfSigned" -}}
{{- $tls := .Values.tls -}}
{{- if kindIs "bool" $tls.selfSigned -}}
{{- if $tls.selfSigned -}}true{{- end -}}
{{- else if not (or $tls.secretName $tls.certManager.enabled) -}}
true
{{- end -}}
{{- end -}}

{{/* mailgate.defaultTlsSecret: the Secret of the default certificate (empty when self-signed). */}}
{{- define "mailgate.defaultTlsSecret" -}}
{{- if .Values.tls.secretName -}}
{{- .Values.tls.secretName -}}
{{- else if .Values.tls.certManager.enabled -}}
{{- include "mailgate.objectName" (list . "tls") -}}
{{- end -}}
{{- end -}}

{{/* mailgate.domainTlsSecret: the Secret of one domain's certificate (empty: the default serves it). */}}
{{- define "mailgate.domainTlsSecret" -}}
{{- $root := index . 0 -}}
{{- $domain := index . 1 -}}
{{- $tls := $domain.tls | default dict -}}
{{- if $tls.secretName -}}
{{- $tls.secretName -}}
{{- else if and $root.Values.tls.certManager.enabled $tls.dnsNames -}}
{{- include "mailgate.objectName" (list $root (printf "%s-tls" (include "mailgate.domainSlug" $domain.name))) -}}
{{- end -}}
{{- end -}}

{{/* mailgate.redisFullname: name of the in-chart Redis objects. */}}
{{- define "mailgate.redisFullname" -}}
{{- include "mailgate.objectName" (list . "redis") -}}
{{- end -}}

{{/* mailgate.redisSecretName: the Secret holding the in-chart Redis password. */}}
{{- define "mailgate.redisSecretName" -}}
{{- default (include "mailgate.redisFullname" .) .Values.redis.internal.existingSecret -}}
{{- end -}}

{{/* mailgate.clustered: "true" when the replicas run as a cluster: more than one, or cluster.enabled. */}}
{{- define "mailgate.clustered" -}}
{{- if or .Values.cluster.enabled (gt (int .Values.replicaCount) 1) -}}true{{- end -}}
{{- end -}}

{{/* mailgate.replicaNames: the StatefulSet's pod names, which are the replica names (at least one), space-separated. */}}
{{- define "mailgate.replicaNames" -}}
{{- $names := list -}}
{{- range $i := until (int (max 1 (int .Values.replicaCount))) -}}
{{- $names = append $names (printf "%s-%d" (include "mailgate.fullname" $) $i) -}}
{{- end -}}
{{- join " " $names -}}
{{- end -}}

{{/* mailgate.clusterTlsSecret: the Secret with the replicas' certificate, key and cluster CA. */}}
{{- define "mailgate.clusterTlsSecret" -}}
{{- default (include "mailgate.objectName" (list . "cluster-tls")) .Values.cluster.tls.existingSecret -}}
{{- end -}}

{{/* mailgate.clusterCaName: the chart's own cluster CA (Certificate, its Secret and the CA Issuer). */}}
{{- define "mailgate.clusterCaName" -}}
{{- include "mailgate.objectName" (list . "cluster-ca") -}}
{{- end -}}

{{/* mailgate.clusterSecretName: the Secret with the cluster-wide server secret. */}}
{{- define "mailgate.clusterSecretName" -}}
{{- default (include "mailgate.objectName" (list . "cluster-secret")) .Values.cluster.secret.existingSecret -}}
{{- end -}}

{{/* mailgate.clusterSecretKey: the key of the server secret in that Secret. */}}
{{- define "mailgate.clusterSecretKey" -}}
{{- if .Values.cluster.secret.existingSecret -}}
{{- .Values.cluster.secret.existingSecretKey -}}
{{- else -}}
cluster-secret
{{- end -}}
{{- end -}}

{{/* mailgate.clusterTlsDir: where the replicas' certificate Secret is mounted (tls.crt, tls.key, ca.crt). */}}
{{- define "mailgate.clusterTlsDir" -}}/etc/mailgate/cluster/tls{{- end -}}

{{/* mailgate.clusterSecretPath: where the server secret is mounted ([cluster] secret_file). */}}
{{- define "mailgate.clusterSecretPath" -}}/etc/mailgate/cluster/secret/secret{{- end -}}

{{/* mailgate.dataDir: data_dir, a directory mailgate makes (mode 0700) on the volume. */}}
{{- define "mailgate.dataDir" -}}/var/lib/mailgate/data{{- end -}}

{{/* mailgate.configPath: where the ConfigMap's mailgate.toml is mounted (MAILGATE_CONFIG). */}}
{{- define "mailgate.configPath" -}}/etc/mailgate/config/mailgate.toml{{- end -}}

{{/* mailgate.accountsPath: where the accounts Secret's key is mounted. */}}
{{- define "mailgate.accountsPath" -}}/etc/mailgate/accounts/accounts{{- end -}}

{{/* mailgate.redisCaPath: where the Redis CA Secret's ca.crt is mounted. */}}
{{- define "mailgate.redisCaPath" -}}/etc/mailgate/redis-ca/ca.crt{{- end -}}

{{/* mailgate.config: the mailgate.toml tree as YAML: config values plus what the chart owns. */}}
{{- define "mailgate.config" -}}
{{- $c := deepCopy .Values.config -}}
{{- if not $c.hostname -}}
{{- $_ := unset $c "hostname" -}}
{{- end -}}
{{- $_ := set $c "data_dir" (include "mailgate.dataDir" .) -}}
{{- $l := .Values.listeners -}}
{{- $pop3 := $c.pop3 | default dict -}}
{{- $_ := set $pop3 "listen" (ternary (include "mailgate.listen" (list . $l.pop3.containerPort)) "" $l.pop3.enabled) -}}
{{- $_ := set $pop3 "tls_listen" (ternary (include "mailgate.listen" (list . $l.pop3s.containerPort)) "" $l.pop3s.enabled) -}}
{{- $_ := set $c "pop3" $pop3 -}}
{{- $lmtp := $c.lmtp | default dict -}}
{{- $_ := set $lmtp "listen" (ternary (include "mailgate.listen" (list . $l.lmtp.containerPort)) "" $l.lmtp.enabled) -}}
{{- $_ := set $lmtp "allow_from" $l.lmtp.allowFrom -}}
{{- $_ := set $c "lmtp" $lmtp -}}
{{- $smtp := $c.smtp | default dict -}}
{{- $_ := set $smtp "listen" (ternary (include "mailgate.listen" (list . $l.smtp.containerPort)) "" $l.smtp.enabled) -}}
{{- $_ := set $c "smtp" $smtp -}}
{{- $_ := set $c "metrics" (dict "listen" (include "mailgate.listen" (list . .Values.metrics.containerPort))) -}}
{{- $tls := $c.tls | default dict -}}
{{- if not (include "mailgate.selfSigned" .) -}}
{{- $_ := set $tls "cert" "/etc/mailgate/tls/default/tls.crt" -}}
{{- $_ := set $tls "key" "/etc/mailgate/tls/default/tls.key" -}}
{{- end -}}
{{- $sni := dict -}}
{{- range .Values.domains -}}
{{- if include "mailgate.domainTlsSecret" (list $ .) -}}
{{- $dir := printf "/etc/mailgate/tls/domains/%s" (lower .name) -}}
{{- $_ := set $sni (lower .name) (dict "cert" (printf "%s/tls.crt" $dir) "key" (printf "%s/tls.key" $dir)) -}}
{{- end -}}
{{- end -}}
{{- if $sni -}}
{{- $_ := set $tls "domains" $sni -}}
{{- end -}}
{{- $_ := set $c "tls" $tls -}}
{{- $locks := $c.locks | default dict -}}
{{- if and (eq (toString $locks.backend) "redis") .Values.redis.external.caSecret -}}
{{- $_ := set $locks "redis_ca_file" (include "mailgate.redisCaPath" .) -}}
{{- end -}}
{{- if and (eq (toString $locks.backend) "redis") .Values.redis.external.sentinels -}}
{{- $_ := set $locks "redis_sentinels" .Values.redis.external.sentinels -}}
{{- $_ := set $locks "redis_sentinel_master" .Values.redis.external.sentinelMaster -}}
{{- end -}}
{{- $_ := set $c "locks" $locks -}}
{{- $_ := unset $c "cluster" -}}
{{- if include "mailgate.clustered" . -}}
{{- $cl := .Values.cluster -}}
{{- $cluster := deepCopy (.Values.config.cluster | default dict) -}}
{{- $headless := include "mailgate.objectName" (list . "headless") -}}
{{- $peers := dict -}}
{{- range $name := splitList " " (include "mailgate.replicaNames" .) -}}
{{- $_ := set $peers $name (printf "%s.%s.%s.svc.%s:%d" $name $headless $.Release.Namespace $cl.clusterDomain (int $cl.port)) -}}
{{- end -}}
{{- $dir := include "mailgate.clusterTlsDir" . -}}
{{- $_ := set $cluster "listen" (include "mailgate.listen" (list . $cl.port)) -}}
{{- $_ := set $cluster "cert" (printf "%s/tls.crt" $dir) -}}
{{- $_ := set $cluster "key" (printf "%s/tls.key" $dir) -}}
{{- $_ := set $cluster "ca" (printf "%s/ca.crt" $dir) -}}
{{- $_ := set $cluster "secret_file" (include "mailgate.clusterSecretPath" .) -}}
{{- $_ := set $cluster "peers" $peers -}}
{{- $pins := dict -}}
{{- range $domain, $replica := $cl.pins -}}
{{- $_ := set $pins (lower $domain) $replica -}}
{{- end -}}
{{- if $pins -}}
{{- $_ := set $cluster "pins" $pins -}}
{{- end -}}
{{- $_ := set $c "cluster" $cluster -}}
{{- end -}}
{{- $provision := dict -}}
{{- with .Values.domains -}}
{{- $names := list -}}
{{- range . -}}
{{- $names = append $names (lower .name) -}}
{{- end -}}
{{- $_ := set $provision "domains" $names -}}
{{- end -}}
{{- if .Values.provisioning.accountsSecret -}}
{{- $_ := set $provision "accounts_file" (include "mailgate.accountsPath" .) -}}
{{- end -}}
{{- if $provision -}}
{{- $_ := set $c "provision" $provision -}}
{{- end -}}
{{- $proxied := list -}}
{{- range $name := splitList " " (include "mailgate.listenerNames" .) -}}
{{- $listener := index $l $name -}}
{{- if and $listener.enabled $listener.proxyProtocol -}}
{{- $proxied = append $proxied $name -}}
{{- end -}}
{{- end -}}
{{- if $proxied -}}
{{- $_ := set $c "proxy_protocol" (dict "listeners" $proxied "trusted_networks" .Values.proxyProtocolSettings.trustedNetworks "header_timeout_secs" .Values.proxyProtocolSettings.headerTimeoutSecs) -}}
{{- end -}}
{{- toYaml $c -}}
{{- end -}}

{{/* mailgate.toml.key: a TOML key, quoted unless bare. */}}
{{- define "mailgate.toml.key" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . -}}
{{- . -}}
{{- else -}}
{{- toJson . -}}
{{- end -}}
{{- end -}}

{{/* mailgate.toml.value: a TOML value (Helm reads every number as a float; mailgate's are integers). */}}
{{- define "mailgate.toml.value" -}}
{{- if kindIs "bool" . -}}
{{- . -}}
{{- else if kindIs "string" . -}}
{{- toJson . -}}
{{- else if or (kindIs "float64" .) (kindIs "int" .) (kindIs "int64" .) -}}
{{- int64 . -}}
{{- else if kindIs "slice" . -}}
[{{- range $i, $e := . -}}{{- if $i }}, {{ end -}}{{- include "mailgate.toml.value" $e -}}{{- end -}}]
{{- else -}}
{{- fail (printf "config: %v (%s) cannot be written as TOML" . (kindOf .)) -}}
{{- end -}}
{{- end -}}

{{/* mailgate.toml.table: one TOML table (list of path segments, map), its keys before its subtables. */}}
{{- define "mailgate.toml.table" -}}
{{- $path := index . 0 -}}
{{- $table := index . 1 -}}
{{- $scalars := list -}}
{{- $tables := list -}}
{{- range $k, $v := $table -}}
{{- if kindIs "map" $v -}}
{{- $tables = append $tables $k -}}
{{- else if not (kindIs "invalid" $v) -}}
{{- $scalars = append $scalars $k -}}
{{- end -}}
{{- end -}}
{{- if and $path $scalars }}

[{{ range $i, $p := $path }}{{ if $i }}.{{ end }}{{ include "mailgate.toml.key" $p }}{{ end }}]
{{- end -}}
{{- range $k := $scalars }}
{{ include "mailgate.toml.key" $k }} = {{ include "mailgate.toml.value" (index $table $k) }}
{{- end -}}
{{- range $k := $tables -}}
{{- include "mailgate.toml.table" (list (append $path $k) (index $table $k)) -}}
{{- end -}}
{{- end -}}

{{/* mailgate.configToml: mailgate.toml as the ConfigMap holds it. */}}
{{- define "mailgate.configToml" -}}
# Rendered by the mailgate chart from its values; every key and its default are in mailgate.example.toml.
{{- include "mailgate.toml.table" (list (list) (include "mailgate.config" . | fromYaml)) }}
{{ end -}}

{{/* mailgate.redisEnv: the env entries that give mailgate its Redis URL (secrets stay in Secrets). */}}
{{- define "mailgate.redisEnv" -}}
{{- $ext := .Values.redis.external -}}
{{- if .Values.redis.internal.enabled }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "mailgate.redisSecretName" . }}
      key: redis-password
- name: MAILGATE_LOCKS__REDIS_URL
  value: {{ printf "redis://:$(REDIS_PASSWORD)@%s:6379/0" (include "mailgate.redisFullname" .) | quote }}
{{- else if $ext.urlSecret }}
- name: MAILGATE_LOCKS__REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ $ext.urlSecret }}
      key: {{ $ext.urlSecretKey }}
{{- else }}
{{- $auth := "" }}
{{- if $ext.existingSecret }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $ext.existingSecret }}
      key: {{ $ext.existingSecretPasswordKey }}
{{- $auth = printf "%s:$(REDIS_PASSWORD)@" $ext.username }}
{{- else if $ext.username }}
{{- $auth = printf "%s@" $ext.username }}
{{- end }}
{{- /* With sentinels the URL's host is never used: they name the master. */}}
- name: MAILGATE_LOCKS__REDIS_URL
  value: {{ printf "%s://%s%s:%d/%d" (ternary "rediss" "redis" $ext.tls) $auth ($ext.host | default "sentinel-master") (int $ext.port) (int $ext.db) | quote }}
{{- end }}
{{- end -}}

{{/* mailgate.validateValues: fails rendering with every problem found, one per line. */}}
{{- define "mailgate.validateValues" -}}
{{- $errors := list -}}
{{- $v := .Values -}}
{{- $backend := toString (($v.config.locks | default dict).backend | default "local") -}}
{{- $cl := $v.cluster -}}
{{- $ct := $cl.tls -}}
{{- $replicas := int $v.replicaCount -}}
{{- if include "mailgate.clustered" . -}}
{{- $needs := list -}}
{{- if ne $backend "redis" -}}
{{- $needs = append $needs "Redis for the domains' homes (config.locks.backend=redis, with redis.internal.enabled=true or redis.external.host)" -}}
{{- end -}}
{{- if not (or $ct.existingSecret $ct.certManager.enabled) -}}
{{- $needs = append $needs "certificates for the replicas' mutual TLS (cluster.tls.certManager.enabled=true, or cluster.tls.existingSecret with tls.crt, tls.key and ca.crt)" -}}
{{- end -}}
{{- if $needs -}}
{{- $errors = append $errors (printf "%s runs mailgate as a cluster, which needs %s" (ternary (printf "replicaCount=%d" $replicas) "cluster.enabled=true" (gt $replicas 1)) (join " and " $needs)) -}}
{{- end -}}
{{- if and $ct.existingSecret $ct.certManager.enabled -}}
{{- $errors = append $errors "cluster.tls: use either existingSecret or certManager.enabled, not both" -}}
{{- end -}}
{{- $names := splitList " " (include "mailgate.replicaNames" .) -}}
{{- range $domain, $replica := $cl.pins -}}
{{- if not (has $replica $names) -}}
{{- $errors = append $errors (printf "cluster.pins: %s is pinned to %s, which is not a replica (%s)" $domain $replica (join ", " $names)) -}}
{{- end -}}
{{- end -}}
{{- $budget := $v.podDisruptionBudget -}}
{{- if and $budget.enabled (gt $replicas 1) (not (kindIs "string" $budget.maxUnavailable)) (ge (int $budget.maxUnavailable) $replicas) -}}
{{- $errors = append $errors (printf "podDisruptionBudget.maxUnavailable=%d lets all %d replicas be evicted at once, and with them every domain: keep it below replicaCount (1 drains one replica at a time)" (int $budget.maxUnavailable) $replicas) -}}
{{- end -}}
{{- else -}}
{{- $unused := list -}}
{{- range $name, $set := dict "cluster.tls.existingSecret" $ct.existingSecret "cluster.tls.certManager.enabled" $ct.certManager.enabled "cluster.secret.existingSecret" $cl.secret.existingSecret "cluster.pins" $cl.pins "config.cluster" $v.config.cluster -}}
{{- if $set -}}
{{- $unused = append $unused $name -}}
{{- end -}}
{{- end -}}
{{- if $unused -}}
{{- $errors = append $errors (printf "%s: only used in cluster mode (replicaCount > 1, or cluster.enabled=true for a cluster of one replica)" (join ", " $unused)) -}}
{{- end -}}
{{- end -}}
{{- $ports := dict -}}
{{- $servicePorts := dict -}}
{{- range $name := splitList " " (include "mailgate.listenerNames" .) -}}
{{- $l := index $v.listeners $name -}}
{{- if $l.enabled -}}
{{- $p := toString (int $l.containerPort) -}}
{{- if hasKey $ports $p -}}
{{- $errors = append $errors (printf "listeners.%s.containerPort %s is already used by %s" $name $p (get $ports $p)) -}}
{{- else -}}
{{- $_ := set $ports $p (printf "listeners.%s.containerPort" (toString $name)) -}}
{{- end -}}
{{- if ne $name "lmtp" -}}
{{- $sp := toString (int $l.servicePort) -}}
{{- if hasKey $servicePorts $sp -}}
{{- $errors = append $errors (printf "listeners.%s.servicePort %s is already used by %s on the client Service" $name $sp (get $servicePorts $sp)) -}}
{{- else -}}
{{- $_ := set $servicePorts $sp (printf "listeners.%s.servicePort" (toString $name)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $mp := toString (int $v.metrics.containerPort) -}}
{{- if hasKey $ports $mp -}}
{{- $errors = append $errors (printf "metrics.containerPort %s is already used by %s" $mp (get $ports $mp)) -}}
{{- else -}}
{{- $_ := set $ports $mp "metrics.containerPort" -}}
{{- end -}}
{{- if include "mailgate.clustered" . -}}
{{- $cp := toString (int $cl.port) -}}
{{- if hasKey $ports $cp -}}
{{- $errors = append $errors (printf "cluster.port %s is already used by %s" $cp (get $ports $cp)) -}}
{{- end -}}
{{- end -}}
{{- if not (include "mailgate.clientListeners" .) -}}
{{- $errors = append $errors "listeners: enable at least one of pop3, pop3s and smtp, or clients cannot reach mailgate" -}}
{{- end -}}
{{- $cm := $v.tls.certManager -}}
{{- $named := or $v.tls.secretName $cm.enabled -}}
{{- if and (eq (toString $v.tls.selfSigned) "false") (not $named) -}}
{{- $errors = append $errors "tls.selfSigned=false: name the existing kubernetes.io/tls Secret (tls.crt, tls.key) of the default certificate in tls.secretName, or set tls.certManager.enabled=true to have cert-manager issue it (leave tls.selfSigned unset for a self-signed one, for trying the chart only)" -}}
{{- end -}}
{{- if and (eq (toString $v.tls.selfSigned) "true") $named -}}
{{- $errors = append $errors "tls.selfSigned=true cannot be combined with tls.secretName or tls.certManager.enabled: leave tls.selfSigned unset to use the certificate named" -}}
{{- end -}}
{{- if $cm.enabled -}}
{{- if not $cm.issuerRef.name -}}
{{- $errors = append $errors "tls.certManager.issuerRef.name: name the Issuer or ClusterIssuer that signs the certificates" -}}
{{- end -}}
{{- if and (not $v.tls.secretName) (not $cm.dnsNames) -}}
{{- $errors = append $errors "tls.certManager.dnsNames: list the names of the default certificate (the host names mail clients connect to)" -}}
{{- end -}}
{{- end -}}
{{- $seen := dict -}}
{{- range $i, $d := $v.domains -}}
{{- $name := lower (toString $d.name) -}}
{{- if hasKey $seen $name -}}
{{- $errors = append $errors (printf "domains[%d]: %s is listed twice" $i $name) -}}
{{- end -}}
{{- $_ := set $seen $name true -}}
{{- $tls := $d.tls | default dict -}}
{{- if and $tls (not (include "mailgate.domainTlsSecret" (list $ $d))) -}}
{{- if $cm.enabled -}}
{{- $errors = append $errors (printf "domains[%d] (%s): tls needs secretName (an existing Secret) or dnsNames (for cert-manager)" $i $name) -}}
{{- else -}}
{{- $errors = append $errors (printf "domains[%d] (%s): tls.secretName: name the existing kubernetes.io/tls Secret of this domain's certificate (dnsNames need tls.certManager.enabled=true)" $i $name) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and $v.provisioning.accountsSecret (not $v.domains) -}}
{{- $errors = append $errors "provisioning.accountsSecret: list the accounts' domains in domains[]; an account whose domain is not listed stops mailgate at start" -}}
{{- end -}}
{{- $ext := $v.redis.external -}}
{{- if eq $backend "redis" -}}
{{- if and $v.redis.internal.enabled (or $ext.host $ext.urlSecret $ext.sentinels) -}}
{{- $errors = append $errors "redis: use either redis.internal.enabled or an external Redis (redis.external.host / urlSecret / sentinels), not both" -}}
{{- else if not (or $v.redis.internal.enabled $ext.host $ext.urlSecret $ext.sentinels) -}}
{{- $errors = append $errors "config.locks.backend=redis: set redis.external.host (or redis.external.urlSecret, or redis.external.sentinels) for an external Redis, or redis.internal.enabled=true" -}}
{{- end -}}
{{- if and $ext.sentinels (not $ext.sentinelMaster) -}}
{{- $errors = append $errors "redis.external.sentinels: set redis.external.sentinelMaster, the name the sentinels monitor the master under" -}}
{{- else if and $ext.sentinelMaster (not $ext.sentinels) -}}
{{- $errors = append $errors "redis.external.sentinelMaster is only used with redis.external.sentinels" -}}
{{- end -}}
{{- if and $ext.caSecret (not (or $ext.tls $ext.urlSecret)) -}}
{{- $errors = append $errors "redis.external.caSecret is only used with redis.external.tls=true (rediss://)" -}}
{{- end -}}
{{- else if $v.redis.internal.enabled -}}
{{- $errors = append $errors "redis.internal.enabled: the in-chart Redis is only used with config.locks.backend=redis" -}}
{{- end -}}
{{- $proxied := false -}}
{{- range $name := splitList " " (include "mailgate.listenerNames" .) -}}
{{- $l := index $v.listeners $name -}}
{{- if and $l.enabled $l.proxyProtocol -}}
{{- $proxied = true -}}
{{- end -}}
{{- end -}}
{{- if and $proxied (not $v.proxyProtocolSettings.trustedNetworks) -}}
{{- $errors = append $errors "proxyProtocolSettings.trustedNetworks: list the CIDRs the PROXY headers come from (the load balancer's or the nodes' addresses); without them every connection to a PROXY listener is closed" -}}
{{- end -}}
{{- $grace := int ((($v.config.limits | default dict).shutdown_grace_secs) | default 10) -}}
{{- $needed := add $grace (int $v.lifecycle.preStopSleepSeconds) 5 -}}
{{- if lt (int $v.terminationGracePeriodSeconds) (int $needed) -}}
{{- $errors = append $errors (printf "terminationGracePeriodSeconds=%d must be at least lifecycle.preStopSleepSeconds (%d) + config.limits.shutdown_grace_secs (%d) + 5 = %d, or Kubernetes kills mailgate while sessions drain" (int $v.terminationGracePeriodSeconds) (int $v.lifecycle.preStopSleepSeconds) $grace (int $needed)) -}}
{{- end -}}
{{- if $errors -}}
{{- fail (printf "\n\nmailgate: the values cannot be deployed:\n  - %s\n" (join "\n  - " $errors)) -}}
{{- end -}}
{{- end -}}
