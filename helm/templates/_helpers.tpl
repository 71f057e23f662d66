{{/* The release's name prefix for every object: fullnameOverride, else the release
     and the chart's name (nameOverride), once if one contains the other. */}}
{{- define "mailferry.fullname" -}}
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

{{- define "mailferry.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "mailferry.labels" -}}
app.kubernetes.io/name: {{ include "mailferry.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component (coordinator or worker): pass (list $ "worker"). */}}
{{- define "mailferry.selector" -}}
app.kubernetes.io/name: {{ include "mailferry.name" (index . 0) }}
app.kubernetes.io/instance: {{ (index . 0).Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "mailferry.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "mailferry.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "mailferry.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* mailferry.toml: the values' config, plus what the chart decides (the ops and API
     ports, the sealing key and API token files). URLs come from the Secret as
     environment variables. */}}
{{- define "mailferry.config" -}}
{{- $config := deepCopy .Values.config -}}
{{- $ops := default dict $config.ops -}}
{{- $_ := set $ops "listen" (printf "0.0.0.0:%d" (int .Values.opsPort)) -}}
{{- $_ := set $config "ops" $ops -}}
{{- $_ := set $config "sealing" (dict "key_file" "/etc/mailferry/sealing/keys") -}}
{{- if .Values.secrets.amqpCa.existingSecret -}}
{{- $_ := set $config "amqp_ca_file" "/etc/mailferry/amqp-ca/ca.pem" -}}
{{- end -}}
{{- if .Values.secrets.redisCa.existingSecret -}}
{{- $_ := set $config "redis_ca_file" "/etc/mailferry/redis-ca/ca.pem" -}}
{{- end -}}
{{- if .Values.secrets.oauthCa.existingSecret -}}
{{- $_ := set $config "oauth_ca_file" "/etc/mailferry/oauth-ca/ca.pem" -}}
{{- end -}}
{{- if .Values.api.enabled -}}
{{- $_ := set $config "api" (dict "listen" (printf "0.0.0.0:%d" (int .Values.api.port)) "tokens_file" "/etc/mailferry/api/tokens" "forbid_private_sources" .Values.api.forbidPrivateSources "target_hosts" (default list .Values.api.targetHosts) "limits" (default dict .Values.api.limits)) -}}
{{- end -}}
{{- $_ := include "mailferry.wholeNumbers" $config -}}
{{- toToml $config -}}
{{- end -}}

{{/* Makes every whole number of a map (and of the maps in it) an integer, in place:
     values reach templates as float64, and toToml would write `job_slots = 8.0`. */}}
{{- define "mailferry.wholeNumbers" -}}
{{- range $k, $v := . -}}
{{- if kindIs "map" $v -}}
{{- $_ := include "mailferry.wholeNumbers" $v -}}
{{- else if and (kindIs "float64" $v) (eq $v (float64 (int64 $v))) -}}
{{- $_ := set $ $k (int64 $v) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The pod spec shared by both components: pass (list $ "worker" $grace). */}}
{{- define "mailferry.pod" -}}
{{- $ := index . 0 -}}
{{- $component := index . 1 -}}
{{- $values := index $.Values $component -}}
metadata:
  labels:
    {{- include "mailferry.labels" $ | nindent 4 }}
    app.kubernetes.io/component: {{ $component }}
    {{- with $.Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    checksum/config: {{ include "mailferry.config" $ | sha256sum }}
    {{- with $.Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  {{- with $.Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  serviceAccountName: {{ include "mailferry.serviceAccountName" $ }}
  automountServiceAccountToken: false
  {{- with $.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $.Values.podSecurityContext | nindent 4 }}
  terminationGracePeriodSeconds: {{ index . 2 }}
  containers:
    - name: {{ $component }}
      image: {{ include "mailferry.image" $ }}
      imagePullPolicy: {{ $.Values.image.pullPolicy }}
      args: [{{ $component | quote }}, "--config", "/etc/mailferry/mailferry.toml"]
      env:
        - name: MAILFERRY__AMQP_URL
          valueFrom:
            secretKeyRef:
              name: {{ $.Values.secrets.connections.existingSecret }}
              key: {{ $.Values.secrets.connections.amqpUrlKey }}
        - name: MAILFERRY__REDIS_URL
          valueFrom:
            secretKeyRef:
              name: {{ $.Values.secrets.connections.existingSecret }}
              key: {{ $.Values.secrets.connections.redisUrlKey }}
        {{- with $.Values.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      ports:
        - name: ops
          containerPort: {{ $.Values.opsPort }}
          protocol: TCP
        {{- if and $.Values.api.enabled (eq $component "coordinator") }}
        - name: api
          containerPort: {{ $.Values.api.port }}
          protocol: TCP
        {{- end }}
      livenessProbe:
        httpGet: {path: /healthz, port: ops}
        periodSeconds: 10
        failureThreshold: 3
      readinessProbe:
        httpGet: {path: /readyz, port: ops}
        periodSeconds: 5
        failureThreshold: 2
      startupProbe:
        httpGet: {path: /healthz, port: ops}
        periodSeconds: 2
        failureThreshold: 30
      resources:
        {{- toYaml $values.resources | nindent 8 }}
      securityContext:
        {{- toYaml $.Values.securityContext | nindent 8 }}
      volumeMounts:
        - {name: config, mountPath: /etc/mailferry/mailferry.toml, subPath: mailferry.toml, readOnly: true}
        - {name: sealing, mountPath: /etc/mailferry/sealing, readOnly: true}
        - {name: tmp, mountPath: /tmp}
        {{- if $.Values.secrets.amqpCa.existingSecret }}
        - {name: amqp-ca, mountPath: /etc/mailferry/amqp-ca, readOnly: true}
        {{- end }}
        {{- if $.Values.secrets.redisCa.existingSecret }}
        - {name: redis-ca, mountPath: /etc/mailferry/redis-ca, readOnly: true}
        {{- end }}
        {{- if $.Values.secrets.oauthCa.existingSecret }}
        - {name: oauth-ca, mountPath: /etc/mailferry/oauth-ca, readOnly: true}
        {{- end }}
        {{- if and $.Values.api.enabled (eq $component "coordinator") }}
        - {name: api-tokens, mountPath: /etc/mailferry/api, readOnly: true}
        {{- end }}
  volumes:
    - name: config
      configMap:
        name: {{ include "mailferry.fullname" $ }}
    - name: sealing
      secret:
        secretName: {{ $.Values.secrets.sealing.existingSecret }}
        items:
          - {key: {{ $.Values.secrets.sealing.key }}, path: keys}
    - name: tmp
      emptyDir: {sizeLimit: 64Mi}
    {{- if $.Values.secrets.amqpCa.existingSecret }}
    - name: amqp-ca
      secret:
        secretName: {{ $.Values.secrets.amqpCa.existingSecret }}
        items:
          - {key: {{ $.Values.secrets.amqpCa.key }}, path: ca.pem}
    {{- end }}
    {{- if $.Values.secrets.redisCa.existingSecret }}
    - name: redis-ca
      secret:
        secretName: {{ $.Values.secrets.redisCa.existingSecret }}
        items:
          - {key: {{ $.Values.secrets.redisCa.key }}, path: ca.pem}
    {{- end }}
    {{- if $.Values.secrets.oauthCa.existingSecret }}
    - name: oauth-ca
      secret:
        secretName: {{ $.Values.secrets.oauthCa.existingSecret }}
        items:
          - {key: {{ $.Values.secrets.oauthCa.key }}, path: ca.pem}
    {{- end }}
    {{- if and $.Values.api.enabled (eq $component "coordinator") }}
    - name: api-tokens
      secret:
        secretName: {{ $.Values.secrets.apiTokens.existingSecret }}
        items:
          - {key: {{ $.Values.secrets.apiTokens.key }}, path: tokens}
    {{- end }}
  {{- with $values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if or $values.spreadAcrossNodes $values.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- if $values.spreadAcrossNodes }}
    # Replicas on different nodes where the cluster has them (the two coordinators
    # especially: one node going down must not take both).
    - maxSkew: 1
      topologyKey: kubernetes.io/hostname
      whenUnsatisfiable: ScheduleAnyway
      labelSelector:
        matchLabels:
          {{- include "mailferry.selector" (list $ $component) | nindent 10 }}
    {{- end }}
    {{- with $values.topologySpreadConstraints }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- end }}
{{- end -}}

{{/* Job slots of one worker replica: config.worker.job_slots, else the worker's
     default (8). */}}
{{- define "mailferry.jobSlots" -}}
{{- $worker := default dict .Values.config.worker -}}
{{- int (default 8 $worker.job_slots) -}}
{{- end -}}

{{/* The work one replica takes under KEDA: worker.keda.jobsPerReplica, else its slots. */}}
{{- define "mailferry.jobsPerReplica" -}}
{{- if gt (int .Values.worker.keda.jobsPerReplica) 0 -}}
{{- int .Values.worker.keda.jobsPerReplica -}}
{{- else -}}
{{- include "mailferry.jobSlots" . -}}
{{- end -}}
{{- end -}}

{{/* The HPA's average jobs per worker: worker.hpa.targetJobsPerPod, else three quarters
     of the slots (at least 1). */}}
{{- define "mailferry.targetJobsPerPod" -}}
{{- if gt (int .Values.worker.hpa.targetJobsPerPod) 0 -}}
{{- int .Values.worker.hpa.targetJobsPerPod -}}
{{- else -}}
{{- max 1 (div (mul 3 (int (include "mailferry.jobSlots" .))) 4) -}}
{{- end -}}
{{- end -}}
