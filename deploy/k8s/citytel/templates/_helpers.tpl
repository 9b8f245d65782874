{{- define "citytel.labels" -}}
app.kubernetes.io/name: citytel
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "citytel.selector" -}}
app.kubernetes.io/name: citytel
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The pod spec every citytel role shares: same image, config, secrets, security and probes. */}}
{{- define "citytel.pod" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: 10001
  runAsGroup: 10001
  fsGroup: 10001
  seccompProfile: {type: RuntimeDefault}
containers:
  - name: {{ .component }}
    image: "{{ .root.Values.image.repository }}:{{ .root.Values.image.tag }}"
    imagePullPolicy: {{ .root.Values.image.pullPolicy }}
    args: {{ toJson .args }}
    {{- with .env }}
    env: {{ toYaml . | nindent 6 }}
    {{- end }}
    ports:
      - {name: metrics, containerPort: {{ .values.metricsPort }}}
    livenessProbe:
      httpGet: {path: /healthz, port: metrics}
      periodSeconds: 10
      failureThreshold: 6
    readinessProbe:
      httpGet: {path: {{ .readiness | default "/readyz" }}, port: metrics}
      periodSeconds: 5
      failureThreshold: 3
    resources: {{ toYaml .values.resources | nindent 6 }}
    securityContext:
      allowPrivilegeEscalation: false
      readOnlyRootFilesystem: true
      capabilities: {drop: [ALL]}
    volumeMounts:
      - {name: config, mountPath: /etc/citytel, readOnly: true}
      - {name: secrets, mountPath: /run/secrets/citytel, readOnly: true}
      - {name: tmp, mountPath: /tmp}
volumes:
  - name: config
    configMap: {name: {{ .root.Release.Name }}-config}
  - name: secrets
    secret: {secretName: {{ .root.Values.secretName }}, defaultMode: 0400}
  - name: tmp
    emptyDir: {}
{{- end -}}
