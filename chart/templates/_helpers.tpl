{{/*
Names and labels (helm create conventions).
*/}}

{{- define "lsbert.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified name, at most 40 characters: KServe derives "<name>-predictor-..." object names from it
and training Job names start with it (RELEASE_NAME); both must stay within DNS-label limits (63).
*/}}
{{- define "lsbert.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "lsbert.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "lsbert.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lsbert.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "lsbert.labels" -}}
helm.sh/chart: {{ include "lsbert.chart" . }}
{{ include "lsbert.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: lsbert
{{- end }}

{{/* Labels of one component: (dict "ctx" $ "component" "predictor") */}}
{{- define "lsbert.componentLabels" -}}
{{ include "lsbert.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "lsbert.componentSelectorLabels" -}}
{{ include "lsbert.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Decisions
*/}}

{{/* "true" when the InferenceService is rendered, "" otherwise. */}}
{{- define "lsbert.kserveEnabled" -}}
{{- $v := toString .Values.kserve.enabled | lower -}}
{{- if eq $v "true" -}}
true
{{- else if eq $v "false" -}}
{{- else if .Capabilities.APIVersions.Has "serving.kserve.io/v1beta1" -}}
true
{{- end -}}
{{- end }}

{{/* "true" when the predictor needs Kubernetes API access (Role, token). */}}
{{- define "lsbert.needsApi" -}}
{{- if or (eq .Values.trainer.launcher "kubernetes") (eq .Values.rollout.strategy "restart") -}}
true
{{- end -}}
{{- end }}

{{/* "true" when checkpoints are on a claim that several nodes can mount read-write (ReadWriteMany). */}}
{{- define "lsbert.claimShared" -}}
{{- if and (eq .Values.storage.type "pvc") (has "ReadWriteMany" .Values.storage.pvc.accessModes) -}}
true
{{- end -}}
{{- end }}

{{/* "true" when checkpoints are on a claim only one node can mount at a time. */}}
{{- define "lsbert.claimSingleNode" -}}
{{- if and (eq .Values.storage.type "pvc") (not (include "lsbert.claimShared" .)) -}}
true
{{- end -}}
{{- end }}

{{/* "true" when training pods are kept on a node that runs a predictor pod (storage.pvc.colocateTrainer). */}}
{{- define "lsbert.colocateTrainer" -}}
{{- $v := toString .Values.storage.pvc.colocateTrainer | lower -}}
{{- if and (eq .Values.storage.type "pvc") (eq .Values.trainer.launcher "kubernetes") -}}
{{- if eq $v "true" -}}
true
{{- else if and (eq $v "auto") (include "lsbert.claimSingleNode" .) -}}
true
{{- end -}}
{{- end -}}
{{- end }}

{{/* Where the Hugging Face cache lives (HF_HOME). */}}
{{- define "lsbert.hfHome" -}}
{{- if and .Values.cache.huggingfaceOnClaim (eq .Values.storage.type "pvc") -}}
{{ printf "%s/.huggingface" .Values.storage.mountPath }}
{{- else -}}
{{ printf "%s/huggingface" .Values.cache.mountPath }}
{{- end -}}
{{- end }}

{{/* The label training Jobs and their pods are selected by (set by the launcher from RELEASE_NAME). */}}
{{- define "lsbert.trainerSelector" -}}
{{- printf "lsbert.io/release=%s" (include "lsbert.fullname" .) }}
{{- end }}

{{- define "lsbert.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "lsbert.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "lsbert.trainerServiceAccountName" -}}
{{- if .Values.trainer.serviceAccount.create }}
{{- default (printf "%s-trainer" (include "lsbert.fullname" .)) .Values.trainer.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.trainer.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "lsbert.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "lsbert.trainerImage" -}}
{{- printf "%s:%s" .Values.trainer.image.repository (default .Chart.AppVersion .Values.trainer.image.tag) }}
{{- end }}

{{- define "lsbert.volumePermissionsImage" -}}
{{- printf "%s:%s" (default .Values.image.repository .Values.volumePermissions.image.repository) (default (default .Chart.AppVersion .Values.image.tag) .Values.volumePermissions.image.tag) }}
{{- end }}

{{- define "lsbert.testImage" -}}
{{- printf "%s:%s" (default .Values.image.repository .Values.tests.image.repository) (default (default .Chart.AppVersion .Values.image.tag) .Values.tests.image.tag) }}
{{- end }}

{{/* Where Label Studio reaches the predictor, in-cluster. */}}
{{- define "lsbert.serviceHost" -}}
{{- if include "lsbert.kserveEnabled" . -}}
{{- printf "%s-predictor.%s.svc.cluster.local" (include "lsbert.fullname" .) .Release.Namespace }}
{{- else -}}
{{- printf "%s.%s.svc.cluster.local" (include "lsbert.fullname" .) .Release.Namespace }}
{{- end -}}
{{- end }}

{{- define "lsbert.servicePort" -}}
{{- if include "lsbert.kserveEnabled" . -}}80{{- else -}}{{ .Values.service.port }}{{- end -}}
{{- end }}

{{- define "lsbert.serviceUrl" -}}
{{- printf "http://%s:%s" (include "lsbert.serviceHost" .) (include "lsbert.servicePort" .) }}
{{- end }}

{{/*
Secrets: each helper returns the Secret name to reference, or "" when the value is not configured.
*/}}

{{- define "lsbert.labelStudioSecret" -}}
{{- if .Values.labelStudio.existingSecret -}}
{{ .Values.labelStudio.existingSecret }}
{{- else if .Values.labelStudio.apiKey -}}
{{ include "lsbert.fullname" . }}-label-studio
{{- end -}}
{{- end }}

{{- define "lsbert.basicAuthSecret" -}}
{{- if .Values.basicAuth.enabled -}}
{{- default (printf "%s-basic-auth" (include "lsbert.fullname" .)) .Values.basicAuth.existingSecret -}}
{{- end -}}
{{- end }}

{{/*
basicAuth of the ServiceMonitor / PodMonitor endpoint: the Prometheus Operator reads the user and password
from the Secret that holds the predictor's credentials (the chart's, or basicAuth.existingSecret: both use
basicAuth.userKey / passwordKey), in the monitor's namespace. Nothing when basic auth is off or /metrics is
served without it (metrics.withoutAuth).
*/}}
{{- define "lsbert.monitorBasicAuth" -}}
{{- $secret := include "lsbert.basicAuthSecret" . -}}
{{- if and $secret (not .Values.metrics.withoutAuth) -}}
basicAuth:
  username:
    name: {{ $secret }}
    key: {{ .Values.basicAuth.userKey }}
  password:
    name: {{ $secret }}
    key: {{ .Values.basicAuth.passwordKey }}
{{- end -}}
{{- end }}

{{- define "lsbert.hfSecret" -}}
{{- if .Values.huggingface.existingSecret -}}
{{ .Values.huggingface.existingSecret }}
{{- else if .Values.huggingface.token -}}
{{ include "lsbert.fullname" . }}-huggingface
{{- end -}}
{{- end }}

{{- define "lsbert.s3Secret" -}}
{{- if eq .Values.storage.type "s3" -}}
{{- if .Values.storage.s3.existingSecret -}}
{{ .Values.storage.s3.existingSecret }}
{{- else if or .Values.storage.s3.accessKeyId .Values.storage.s3.secretAccessKey -}}
{{ include "lsbert.fullname" . }}-s3
{{- end -}}
{{- end -}}
{{- end }}

{{- define "lsbert.claimName" -}}
{{- default (printf "%s-checkpoints" (include "lsbert.fullname" .)) .Values.storage.pvc.existingClaim }}
{{- end }}

{{- define "lsbert.modelDir" -}}
{{- if eq .Values.storage.type "s3" -}}
{{ .Values.storage.s3.uri }}
{{- else -}}
{{ .Values.storage.mountPath }}
{{- end -}}
{{- end }}

{{/*
Validation of value combinations the schema cannot express. Included by every workload template.
*/}}
{{- define "lsbert.validate" -}}
{{- if and (eq .Values.rollout.strategy "restart") (not (include "lsbert.kserveEnabled" .)) }}
{{- fail "rollout.strategy=restart patches the InferenceService: it needs kserve.enabled=true (or auto on a cluster with KServe). Use rollout.strategy=hot with the plain Deployment." }}
{{- end }}
{{- if and (eq .Values.storage.type "s3") (not (hasPrefix "s3://" .Values.storage.s3.uri)) }}
{{- fail "storage.type=s3 needs storage.s3.uri=s3://bucket/prefix" }}
{{- end }}
{{- if and .Values.storage.s3.existingSecret (or .Values.storage.s3.accessKeyId .Values.storage.s3.secretAccessKey) }}
{{- fail "set either storage.s3.existingSecret or storage.s3.accessKeyId/secretAccessKey, not both" }}
{{- end }}
{{- if and (eq .Values.storage.type "s3") (not .Values.storage.s3.existingSecret) (ne (empty .Values.storage.s3.accessKeyId) (empty .Values.storage.s3.secretAccessKey)) }}
{{- fail "storage.s3.accessKeyId and storage.s3.secretAccessKey must be set together" }}
{{- end }}
{{- if and .Values.basicAuth.enabled (not .Values.basicAuth.existingSecret) (not .Values.basicAuth.user) }}
{{- fail "basicAuth.enabled needs basicAuth.user (or basicAuth.existingSecret)" }}
{{- end }}
{{- if and .Values.rbac.create (include "lsbert.needsApi" .) (eq (include "lsbert.serviceAccountName" .) "default") }}
{{- fail "refusing to grant the launcher Role to the namespace's \"default\" ServiceAccount (every pod without its own would get it): set serviceAccount.create=true or serviceAccount.name" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" }}
{{- end }}
{{- include "lsbert.validateStorage" . }}
{{- include "lsbert.validateOptional" . }}
{{- include "lsbert.validateServingSwitch" . }}
{{- end }}

{{/* Storage combinations that can never work: refused at install, not discovered as a Pending pod. */}}
{{- define "lsbert.validateStorage" -}}
{{- if eq .Values.storage.type "pvc" }}
{{- $modes := .Values.storage.pvc.accessModes }}
{{- if has "ReadWriteOncePod" $modes }}
{{- fail "storage.pvc.accessModes: ReadWriteOncePod lets one pod mount the claim, but predictor pods and training Jobs must share it. Use ReadWriteMany (an RWX storage class: NFS, CephFS, EFS, Filestore, Azure Files), ReadWriteOnce with everything on one node, or storage.type=s3." }}
{{- end }}
{{- if not (or (has "ReadWriteMany" $modes) (has "ReadWriteOnce" $modes)) }}
{{- fail "storage.pvc.accessModes: training writes checkpoints, so the claim needs ReadWriteMany (or ReadWriteOnce with everything on one node)" }}
{{- end }}
{{- if and (include "lsbert.claimSingleNode" .) .Values.trainer.gpu.enabled (eq .Values.trainer.launcher "kubernetes") (not (include "lsbert.colocateTrainer" .)) }}
{{- fail "storage.pvc.accessModes is ReadWriteOnce and trainer.gpu.enabled: a GPU trainer on another node than the predictor could never mount the claim (Multi-Attach) and would wait in ContainerCreating until activeDeadlineSeconds. Use a ReadWriteMany claim or storage.type=s3, or keep training on the predictor's node with storage.pvc.colocateTrainer=auto (the predictor then needs a GPU node too)." }}
{{- end }}
{{- else }}
{{- if .Values.volumePermissions.enabled }}
{{- fail "volumePermissions.enabled prepares the checkpoint claim: it needs storage.type=pvc" }}
{{- end }}
{{- if .Values.cache.huggingfaceOnClaim }}
{{- fail "cache.huggingfaceOnClaim puts HF_HOME on the checkpoint claim: it needs storage.type=pvc" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Optional objects that need their inputs. */}}
{{- define "lsbert.validateOptional" -}}
{{- if and .Values.networkPolicy.enabled (not .Values.networkPolicy.labelStudioNamespace) (not .Values.networkPolicy.labelStudioPodLabels) }}
{{- fail "networkPolicy.enabled needs networkPolicy.labelStudioNamespace and/or networkPolicy.labelStudioPodLabels (who may reach the predictor)" }}
{{- end }}
{{- if and .Values.ingress.enabled (not .Values.ingress.hosts) }}
{{- fail "ingress.enabled needs at least one host in ingress.hosts" }}
{{- end }}
{{- if and .Values.httpRoute.enabled (not .Values.httpRoute.parentRefs) }}
{{- fail "httpRoute.enabled needs httpRoute.parentRefs (the Gateway to attach to)" }}
{{- end }}
{{- if .Values.admissionPolicy.enabled }}
{{- if ne .Values.trainer.launcher "kubernetes" }}
{{- fail "admissionPolicy.enabled pins the Jobs the launcher creates: it needs trainer.launcher=kubernetes" }}
{{- end }}
{{- if semverCompare "<1.30.0-0" .Capabilities.KubeVersion.Version }}
{{- fail (printf "admissionPolicy.enabled needs admissionregistration.k8s.io/v1 ValidatingAdmissionPolicy (Kubernetes >= 1.30); this cluster is %s" .Capabilities.KubeVersion.Version) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
kserve.enabled=auto decides from the API server. An upgrade after KServe was installed would silently swap
the release's Deployment + Service for an InferenceService whose Service has another name and port, and the
URL Label Studio uses would stop answering. Refuse; the user chooses. What the release serves as now comes
from kserve.liveServing when set (renders that cannot see the cluster: helm template, Argo CD), else from
the cluster (this release's Deployment, looked up by helm install/upgrade and Flux).
*/}}
{{- define "lsbert.validateServingSwitch" -}}
{{- if eq (toString .Values.kserve.enabled | lower) "auto" }}
{{- $deploymentUrl := printf "http://%s.%s.svc.cluster.local:%v" (include "lsbert.fullname" .) .Release.Namespace .Values.service.port }}
{{- $isvcUrl := printf "http://%s-predictor.%s.svc.cluster.local:80" (include "lsbert.fullname" .) .Release.Namespace }}
{{- $live := .Values.kserve.liveServing | default "" }}
{{- if and (not $live) (include "lsbert.kserveEnabled" .) }}
{{- $deployment := lookup "apps/v1" "Deployment" .Release.Namespace (include "lsbert.fullname" .) }}
{{- if and $deployment $deployment.metadata (eq (index ($deployment.metadata.labels | default dict) "app.kubernetes.io/instance" | default "") .Release.Name) }}
{{- $live = "Deployment" }}
{{- end }}
{{- end }}
{{- if and (eq $live "Deployment") (include "lsbert.kserveEnabled" .) }}
{{- fail (printf "kserve.enabled=auto: this release serves as a plain Deployment (Label Studio uses %s) and KServe is now installed, so this upgrade would replace it with an InferenceService at %s and the URL Label Studio uses would stop answering. Set kserve.enabled=false to keep the Deployment, or kserve.enabled=true to switch and then change the URL in Label Studio." $deploymentUrl $isvcUrl) }}
{{- end }}
{{- if and (eq $live "InferenceService") (not (include "lsbert.kserveEnabled" .)) }}
{{- fail (printf "kserve.enabled=auto: this release serves as an InferenceService (Label Studio uses %s) and this render sees no serving.kserve.io/v1beta1 API, so it would replace it with a plain Deployment at %s and the URL Label Studio uses would stop answering. Set kserve.enabled=true to keep the InferenceService (helm template needs --api-versions serving.kserve.io/v1beta1), or kserve.enabled=false to switch and then change the URL in Label Studio." $isvcUrl $deploymentUrl) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Environment shared by predictor pods and training Jobs. Secrets only as secretKeyRef.
*/}}
{{- define "lsbert.commonEnv" -}}
- name: MODEL_NAME
  value: {{ .Values.model.name | quote }}
- name: BASELINE_MODEL_NAME
  value: {{ .Values.model.baseline | quote }}
- name: FINETUNED_MODEL_NAME
  value: {{ .Values.model.finetunedName | quote }}
- name: MODEL_DIR
  value: {{ include "lsbert.modelDir" . | quote }}
- name: CACHE_DIR
  value: {{ .Values.cache.mountPath | quote }}
- name: HF_HOME
  value: {{ include "lsbert.hfHome" . | quote }}
- name: XDG_CACHE_HOME
  value: {{ .Values.cache.mountPath | quote }}
{{- with .Values.labelStudio.url }}
- name: LABEL_STUDIO_URL
  value: {{ . | quote }}
{{- end }}
{{- with include "lsbert.labelStudioSecret" . }}
- name: LABEL_STUDIO_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.labelStudio.existingSecretKey }}
{{- end }}
{{- with include "lsbert.hfSecret" . }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.huggingface.existingSecretKey }}
{{- end }}
{{- if eq .Values.storage.type "s3" }}
{{- with include "lsbert.s3Secret" . }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.storage.s3.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.storage.s3.secretAccessKeyKey }}
{{- end }}
{{- with .Values.storage.s3.endpoint }}
- name: AWS_ENDPOINT_URL_S3
  value: {{ . | quote }}
{{- end }}
{{- with .Values.storage.s3.region }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
{{- end }}
{{- with .Values.storage.s3.addressingStyle }}
- name: S3_ADDRESSING_STYLE
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* Volumes shared by predictor pods and training Jobs. */}}
{{- define "lsbert.commonVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.cache.tmpSizeLimit }}
- name: cache
  emptyDir:
    sizeLimit: {{ .Values.cache.sizeLimit }}
{{- if eq .Values.storage.type "pvc" }}
- name: checkpoints
  persistentVolumeClaim:
    claimName: {{ include "lsbert.claimName" . }}
{{- end }}
{{- end }}

{{- define "lsbert.commonVolumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: {{ .Values.cache.mountPath }}
{{- if eq .Values.storage.type "pvc" }}
- name: checkpoints
  mountPath: {{ .Values.storage.mountPath }}
  {{- with .Values.storage.pvc.subPath }}
  subPath: {{ . }}
  {{- end }}
{{- end }}
{{- end }}

{{/*
TORCH_THREADS from the container's CPU request (rounded up; 0 when none is set = every core), unless the
settings map sets it. REQUIRE_CUDA when the container was given a GPU. (dict "ctx" $ "gpu" <gpu values>)
*/}}
{{- define "lsbert.computeEnv" -}}
{{- $ := .ctx -}}
{{- if not (hasKey ($.Values.settings | default dict) "TORCH_THREADS") }}
- name: TORCH_THREADS
  valueFrom:
    resourceFieldRef:
      resource: requests.cpu
      divisor: "1"
{{- end }}
{{- if .gpu.enabled }}
- name: REQUIRE_CUDA
  value: {{ ternary "true" "false" (.gpu.requireCuda | default false) | quote }}
{{- end }}
{{- end }}

{{/*
Predictor pod: resources, scheduling, strategy.
*/}}
{{- define "lsbert.predictorResources" -}}
{{- $res := deepCopy (.Values.resources | default dict) -}}
{{- if .Values.gpu.enabled -}}
{{- $limits := dict -}}
{{- if hasKey $res "limits" }}{{ $limits = $res.limits | default dict }}{{ end -}}
{{- $_ := set $limits .Values.gpu.resourceName (toString .Values.gpu.count) -}}
{{- $_ := set $res "limits" $limits -}}
{{- end -}}
{{- if $res }}{{ toYaml $res }}{{ end -}}
{{- end }}

{{- define "lsbert.predictorNodeSelector" -}}
{{- $ns := deepCopy (.Values.nodeSelector | default dict) -}}
{{- if .Values.gpu.enabled }}{{ $ns = merge (deepCopy (.Values.gpu.nodeSelector | default dict)) $ns }}{{ end -}}
{{- if $ns }}{{ toYaml $ns }}{{ end -}}
{{- end }}

{{- define "lsbert.predictorTolerations" -}}
{{- $t := .Values.tolerations | default list -}}
{{- if .Values.gpu.enabled }}{{ $t = concat $t (.Values.gpu.tolerations | default list) }}{{ end -}}
{{- if $t }}{{ toYaml $t }}{{ end -}}
{{- end }}

{{- define "lsbert.deploymentStrategy" -}}
{{- if .Values.deploymentStrategy -}}
{{ toYaml .Values.deploymentStrategy }}
{{- else if include "lsbert.claimSingleNode" . -}}
type: Recreate
{{- else if .Values.gpu.enabled -}}
type: RollingUpdate
rollingUpdate:
  maxSurge: 0
  maxUnavailable: 1
{{- else -}}
type: RollingUpdate
rollingUpdate:
  maxSurge: 1
  maxUnavailable: 0
{{- end -}}
{{- end }}

{{- define "lsbert.podAnnotations" -}}
checksum/settings: {{ include (print $.Template.BasePath "/configmap-settings.yaml") . | sha256sum }}
{{- if eq .Values.trainer.launcher "kubernetes" }}
checksum/job-values: {{ include (print $.Template.BasePath "/configmap-job-values.yaml") . | sha256sum }}
{{- end }}
{{- if .Values.metrics.enabled }}
prometheus.io/scrape: "true"
prometheus.io/port: "8080"
prometheus.io/path: /metrics
prometheus.kserve.io/port: "8080"
prometheus.kserve.io/path: /metrics
{{- end }}
{{- with .Values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The predictor container (name passed as .name). */}}
{{- define "lsbert.predictorContainer" -}}
{{- $ := .ctx -}}
- name: {{ .name }}
  image: {{ include "lsbert.image" $ | quote }}
  imagePullPolicy: {{ $.Values.image.pullPolicy }}
  ports:
    - name: {{ .portName }}
      containerPort: 8080
      protocol: TCP
  env:
    {{- include "lsbert.commonEnv" $ | nindent 4 }}
    {{- with include "lsbert.basicAuthSecret" $ }}
    - name: BASIC_AUTH_USER
      valueFrom:
        secretKeyRef:
          name: {{ . }}
          key: {{ $.Values.basicAuth.userKey }}
    - name: BASIC_AUTH_PASS
      valueFrom:
        secretKeyRef:
          name: {{ . }}
          key: {{ $.Values.basicAuth.passwordKey }}
    {{- end }}
    {{- if $.Values.metrics.withoutAuth }}
    - name: METRICS_WITHOUT_AUTH
      value: "true"
    {{- end }}
    - name: TRAINING_LAUNCHER
      value: {{ $.Values.trainer.launcher | quote }}
    - name: ROLLOUT_STRATEGY
      value: {{ $.Values.rollout.strategy | quote }}
    - name: ROLLOUT_POLL_SECONDS
      value: {{ $.Values.rollout.pollSeconds | quote }}
    - name: RELEASE_NAME
      value: {{ include "lsbert.fullname" $ | quote }}
    - name: POD_NAMESPACE
      valueFrom:
        fieldRef:
          fieldPath: metadata.namespace
    {{- if eq $.Values.trainer.launcher "kubernetes" }}
    - name: JOB_VALUES
      value: /etc/lsbert/job/values.yaml
    # Training Jobs are owned by this ConfigMap: `helm uninstall` deletes it, and the garbage collector
    # then deletes every Job (and its pods) the release started.
    - name: JOB_OWNER_CONFIGMAP
      value: {{ printf "%s-job-values" (include "lsbert.fullname" $) | quote }}
    - name: TRAINING_PENDING_TIMEOUT
      value: {{ $.Values.trainer.pendingTimeoutSeconds | quote }}
    {{- end }}
    {{- with include "lsbert.computeEnv" (dict "ctx" $ "gpu" $.Values.gpu) | trim }}
    {{- . | nindent 4 }}
    {{- end }}
    {{- if include "lsbert.kserveEnabled" $ }}
    - name: ISVC_NAME
      value: {{ include "lsbert.fullname" $ | quote }}
    {{- end }}
    {{- with $.Values.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  envFrom:
    - configMapRef:
        name: {{ include "lsbert.fullname" $ }}-settings
  {{- with include "lsbert.predictorResources" $ }}
  resources:
    {{- . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $.Values.securityContext | nindent 4 }}
  startupProbe:
    httpGet:
      path: /v1/models/{{ $.Values.model.name }}
      port: {{ .portName }}
    periodSeconds: {{ $.Values.probes.startup.periodSeconds }}
    timeoutSeconds: {{ $.Values.probes.startup.timeoutSeconds }}
    failureThreshold: {{ $.Values.probes.startup.failureThreshold }}
  readinessProbe:
    httpGet:
      path: /v1/models/{{ $.Values.model.name }}
      port: {{ .portName }}
    periodSeconds: {{ $.Values.probes.readiness.periodSeconds }}
    timeoutSeconds: {{ $.Values.probes.readiness.timeoutSeconds }}
    failureThreshold: {{ $.Values.probes.readiness.failureThreshold }}
  livenessProbe:
    httpGet:
      path: /
      port: {{ .portName }}
    periodSeconds: {{ $.Values.probes.liveness.periodSeconds }}
    timeoutSeconds: {{ $.Values.probes.liveness.timeoutSeconds }}
    failureThreshold: {{ $.Values.probes.liveness.failureThreshold }}
  {{- with $.Values.preStopSleepSeconds }}
  # Keeps serving while the endpoint is removed from the Service (kube-proxy, ingress controllers): the
  # server closes its listener on SIGTERM, so without the wait a rolling update refuses some new connections.
  lifecycle:
    preStop:
      exec:
        command: ["sleep", {{ . | quote }}]
  {{- end }}
  volumeMounts:
    {{- include "lsbert.commonVolumeMounts" $ | nindent 4 }}
    {{- if eq $.Values.trainer.launcher "kubernetes" }}
    - name: job-values
      mountPath: /etc/lsbert/job
      readOnly: true
    {{- end }}
    {{- with $.Values.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}

{{- define "lsbert.predictorVolumes" -}}
{{ include "lsbert.commonVolumes" . }}
{{- if eq .Values.trainer.launcher "kubernetes" }}
- name: job-values
  configMap:
    name: {{ include "lsbert.fullname" . }}-job-values
{{- end }}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Pod-level fields shared by the InferenceService predictor and the plain Deployment's pod spec. */}}
{{- define "lsbert.predictorPodFields" -}}
serviceAccountName: {{ include "lsbert.serviceAccountName" . }}
automountServiceAccountToken: {{ include "lsbert.needsApi" . | eq "true" }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with include "lsbert.predictorNodeSelector" . }}
nodeSelector:
  {{- . | nindent 2 }}
{{- end }}
{{- with include "lsbert.predictorTolerations" . }}
tolerations:
  {{- . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .Values.topologySpreadConstraints }}
{{- $selector := dict "matchLabels" (include "lsbert.componentSelectorLabels" (dict "ctx" $ "component" "predictor") | fromYaml) }}
{{- $constraints := list }}
{{- range . }}
{{- if hasKey . "labelSelector" }}
{{- $constraints = append $constraints . }}
{{- else }}
{{- $constraints = append $constraints (merge (dict "labelSelector" (deepCopy $selector)) .) }}
{{- end }}
{{- end }}
topologySpreadConstraints:
  {{- toYaml $constraints | nindent 2 }}
{{- end }}
{{- if and .Values.volumePermissions.enabled (eq .Values.storage.type "pvc") }}
initContainers:
  {{- include "lsbert.volumePermissionsContainer" . | trim | nindent 2 }}
{{- end }}
terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
volumes:
  {{- include "lsbert.predictorVolumes" . | nindent 2 }}
{{- end }}

{{/*
volumePermissions: make the checkpoint directory (and its subPath, and the Hugging Face cache on the claim)
exist and belong to the pods' uid/gid. Root with only CHOWN/FOWNER/DAC_OVERRIDE; not recursive (the files
lsbert writes already belong to that uid).
*/}}
{{- define "lsbert.volumePermissionsContainer" -}}
{{- $uid := int (.Values.podSecurityContext.runAsUser | default 10001) }}
{{- $gid := int (.Values.podSecurityContext.runAsGroup | default $uid) }}
{{- $dir := trimSuffix "/" (printf "/volume/%s" (.Values.storage.pvc.subPath | default "")) }}
- name: volume-permissions
  image: {{ include "lsbert.volumePermissionsImage" . | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command:
    - sh
    - -ec
    - |
      for dir in "$@"; do
        mkdir -p "$dir"
        chown {{ $uid }}:{{ $gid }} "$dir"
        chmod u+rwx,g+rwx "$dir"
        echo "prepared $dir for uid {{ $uid }} gid {{ $gid }}"
      done
    - volume-permissions
    - {{ $dir | quote }}
    {{- if .Values.cache.huggingfaceOnClaim }}
    - {{ printf "%s/.huggingface" $dir | quote }}
    {{- end }}
  {{- with .Values.volumePermissions.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    runAsUser: 0
    runAsGroup: 0
    runAsNonRoot: false
    allowPrivilegeEscalation: false
    readOnlyRootFilesystem: true
    privileged: false
    capabilities:
      drop:
        - ALL
      add:
        - CHOWN
        - FOWNER
        - DAC_OVERRIDE
    seccompProfile:
      type: RuntimeDefault
  volumeMounts:
    - name: checkpoints
      mountPath: /volume
{{- end }}
