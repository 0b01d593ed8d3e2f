{{/* Names, labels, images and the security settings shared by every template. */}}

{{- define "somaflow.fullname" -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "somaflow.labels" -}}
app.kubernetes.io/name: somaflow
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* selector labels of one component: include with (list $ "component") */}}
{{- define "somaflow.selectorLabels" -}}
app.kubernetes.io/name: somaflow
app.kubernetes.io/instance: {{ (index . 0).Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "somaflow.tag" -}}
{{- .Values.images.tag | default .Chart.AppVersion -}}
{{- end -}}

{{/* image reference of one of our images: include with (list $ "worker") */}}
{{- define "somaflow.image" -}}
{{- $ := index . 0 -}}
{{- printf "%s/%s:%s" $.Values.images.registry (index $.Values.images (index . 1)) (include "somaflow.tag" $) -}}
{{- end -}}

{{- define "somaflow.pullSecrets" -}}
{{- with .Values.images.pullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "somaflow.objectStoreSecret" -}}
{{- .Values.dask.env_from_secret | default .Values.objectStore.secretName -}}
{{- end -}}

{{/* the ConfigMap with params.yaml and cluster.yaml */}}
{{- define "somaflow.configName" -}}
{{- printf "%s-config" (include "somaflow.fullname" .) -}}
{{- end -}}

{{/* the in-cluster URL of the inference service */}}
{{- define "somaflow.inferenceUrl" -}}
{{- printf "http://%s-inference:%v" (include "somaflow.fullname" .) .Values.inference.ports.http -}}
{{- end -}}

{{/*
The Dask cluster description the runs read (--cluster-spec /etc/somaflow/cluster.yaml):
the dask values completed as somaflow.kube.from_chart_values completes them.
*/}}
{{- define "somaflow.clusterSpec" -}}
{{- $spec := deepCopy .Values.dask -}}
{{- $_ := set $spec "image" (.Values.dask.image | default (include "somaflow.image" (list . "worker"))) -}}
{{- $_ := set $spec "env_from_secret" (include "somaflow.objectStoreSecret" .) -}}
{{- $_ := set $spec "namespace" (.Values.dask.namespace | default .Release.Namespace) -}}
{{- with .Values.inference.tokenSecret -}}
{{- $_ := set $spec "secret_env" (merge (dict "SOMAFLOW_INFERENCE_TOKEN" (printf "%s/token" .)) ($spec.secret_env | default dict)) -}}
{{- end -}}
{{- toYaml $spec -}}
{{- end -}}

{{/* writable scratch of a read-only container: /tmp and the home directory */}}
{{- define "somaflow.scratchMounts" -}}
- name: scratch
  mountPath: /tmp
  subPath: tmp
- name: scratch
  mountPath: /home/somaflow
  subPath: home
{{- end -}}
