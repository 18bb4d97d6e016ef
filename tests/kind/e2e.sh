#!/usr/bin/env bash
# End-to-end on a throwaway kind cluster, for machines with Docker (`make kind-e2e`; not run by pytest).
#
#   1. creates a kind cluster (or reuses $KIND_CLUSTER if it exists),
#   2. builds the predictor and trainer images (CPU torch) and loads them into the cluster,
#   3. installs the chart with kserve.enabled=false (plain Deployment + Service, PVC checkpoints),
#   4. checks /health and the model readiness route through `kubectl port-forward`, then `helm test`,
#   5. runs one training Job on CPU, created from the chart's JOB_VALUES with the predictor's own
#      ServiceAccount token (from inside the predictor pod), and checks that it stored a version.
#
# Needs: docker (engine running), kind, kubectl, helm, curl, and internet access from the cluster (the
# baseline model is downloaded from the Hugging Face hub). Knobs (environment):
#   KIND_CLUSTER=lsbert-e2e   NAMESPACE=lsbert-e2e   TAG=e2e   LOCAL_PORT=18080
#   BASELINE_MODEL_NAME=sentence-transformers/all-MiniLM-L6-v2
#   SKIP_BUILD=1      reuse lsbert-predictor:$TAG and lsbert-trainer:$TAG already built
#   KEEP_CLUSTER=1    leave the cluster (and release) for inspection; default: delete a cluster we created
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CLUSTER=${KIND_CLUSTER:-lsbert-e2e}
NAMESPACE=${NAMESPACE:-lsbert-e2e}
RELEASE=${RELEASE:-e2e}
FULLNAME=lsbert-e2e
TAG=${TAG:-e2e}
LOCAL_PORT=${LOCAL_PORT:-18080}
BASELINE=${BASELINE_MODEL_NAME:-sentence-transformers/all-MiniLM-L6-v2}
PREDICTOR_IMAGE=lsbert-predictor:${TAG}
TRAINER_IMAGE=lsbert-trainer:${TAG}

die() {
  echo "e2e: ERROR: $*" >&2
  exit 2
}
log() { printf '\n==> %s\n' "$*"; }

# ------------------------------------------------------------------------------------------- preflight
# helm/kubectl: from PATH, else the binaries tests/k8s/build.sh caches.
k8s_version=$(sed -n 's/^K8S_VERSION=//p' "$ROOT/tests/k8s/versions.env" 2>/dev/null || true)
cached_bin="${LSBERT_CACHE:-$HOME/.cache/lsbert}/k8s/${k8s_version}/bin"
HELM=${HELM:-$(command -v helm || echo "$cached_bin/helm")}
KUBECTL=${KUBECTL:-$(command -v kubectl || echo "$cached_bin/kubectl")}

missing=()
for tool in docker kind curl; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
[[ -x "$HELM" ]] || missing+=("helm")
[[ -x "$KUBECTL" ]] || missing+=("kubectl")
if ((${#missing[@]})); then
  die "missing: ${missing[*]}. This end-to-end test needs Docker, kind, kubectl, helm and curl; it cannot run here. The chart is tested without Docker by: pytest tests/chart"
fi
docker info >/dev/null 2>&1 || die "the Docker engine is not reachable ('docker info' failed): start Docker, or run this on a machine where it runs"

PF_PID=""
CREATED=0
cleanup() {
  local rc=$?
  if [[ -n "$PF_PID" ]]; then kill "$PF_PID" 2>/dev/null || true; fi
  if ((rc != 0)) && "$KUBECTL" get namespace "$NAMESPACE" >/dev/null 2>&1; then
    echo "---- diagnostics ($NAMESPACE) ----" >&2
    "$KUBECTL" -n "$NAMESPACE" get all,pvc,jobs -o wide >&2 || true
    "$KUBECTL" -n "$NAMESPACE" logs "deploy/$FULLNAME" --tail=50 >&2 || true
  fi
  if ((CREATED)) && [[ "${KEEP_CLUSTER:-0}" != 1 ]]; then
    kind delete cluster --name "$CLUSTER" || true
  elif ((CREATED)); then
    echo "e2e: cluster kept: kind delete cluster --name $CLUSTER" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT

# ------------------------------------------------------------------------------------------- cluster
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  log "reusing kind cluster $CLUSTER"
else
  log "creating kind cluster $CLUSTER"
  kind create cluster --name "$CLUSTER" --wait 180s
  CREATED=1
fi
export KUBECONFIG="${KUBECONFIG:-$HOME/.kube/config}"
"$KUBECTL" config use-context "kind-$CLUSTER" >/dev/null

# -------------------------------------------------------------------------------------------- images
if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
  log "building $PREDICTOR_IMAGE and $TRAINER_IMAGE (CPU torch)"
  docker build -f "$ROOT/images/predictor/Dockerfile" --build-arg TORCH_INDEX=cpu -t "$PREDICTOR_IMAGE" "$ROOT"
  docker build -f "$ROOT/images/trainer/Dockerfile" --build-arg TORCH_INDEX=cpu -t "$TRAINER_IMAGE" "$ROOT"
fi
log "loading images into $CLUSTER"
kind load docker-image --name "$CLUSTER" "$PREDICTOR_IMAGE" "$TRAINER_IMAGE"

# ------------------------------------------------------------------------------------------- install
# kind's default storage class (local-path) is ReadWriteOnce; one node, so predictor and trainer share it.
log "installing the chart (kserve.enabled=false) into $NAMESPACE"
"$HELM" upgrade --install "$RELEASE" "$ROOT/chart" \
  --namespace "$NAMESPACE" --create-namespace \
  --set fullnameOverride="$FULLNAME" \
  --set kserve.enabled=false \
  --set image.repository=lsbert-predictor,image.tag="$TAG",image.pullPolicy=Never \
  --set trainer.image.repository=lsbert-trainer,trainer.image.tag="$TAG",trainer.image.pullPolicy=Never \
  --set model.baseline="$BASELINE" \
  --set 'storage.pvc.accessModes={ReadWriteOnce}',storage.pvc.size=2Gi \
  --set resources.requests.cpu=500m,resources.requests.memory=1Gi,resources.limits.memory=3Gi \
  --set trainer.resources.requests.cpu=500m,trainer.resources.requests.memory=1Gi,trainer.resources.limits.memory=4Gi \
  --set cache.sizeLimit=4Gi \
  --wait --timeout 20m

# ---------------------------------------------------------------------------------------- health
log "port-forward svc/$FULLNAME -> 127.0.0.1:$LOCAL_PORT"
"$KUBECTL" -n "$NAMESPACE" port-forward "svc/$FULLNAME" "$LOCAL_PORT:8080" >/dev/null 2>&1 &
PF_PID=$!
health=""
for _ in $(seq 1 60); do
  if health=$(curl -fsS "http://127.0.0.1:$LOCAL_PORT/health" 2>/dev/null); then break; fi
  sleep 1
done
echo "GET /health -> $health"
[[ "$health" == *'"status":"UP"'* ]] || die "/health did not answer {\"status\":\"UP\",...}"
curl -fsS "http://127.0.0.1:$LOCAL_PORT/v1/models/lsbert" >/dev/null || die "the model is not ready (/v1/models/lsbert)"
echo "GET /v1/models/lsbert -> 200"

log "helm test"
"$HELM" test "$RELEASE" --namespace "$NAMESPACE" --timeout 5m --logs

# -------------------------------------------------------------------------------------- training
log "one training Job on CPU"
export_file=$(mktemp)
texts=("I love it" "Great product, works perfectly" "Absolutely wonderful" "Best purchase this year"
  "Fast delivery and friendly support" "Terrible quality" "I hate it" "Broken on arrival"
  "Worst purchase ever" "Slow and unhelpful support")
{
  printf '['
  for i in "${!texts[@]}"; do
    id=$((i + 1))
    label=Positive
    if ((i >= 5)); then label=Negative; fi
    if ((i > 0)); then printf ','; fi
    printf '{"id":%d,"project":1,"data":{"text":"%s"},"predictions":[],"annotations":[{"id":%d,"task":%d,"project":1,"completed_by":1,"was_cancelled":false,"ground_truth":false,"created_at":"2026-01-01T00:00:%02dZ","updated_at":"2026-01-01T00:00:%02dZ","result":[{"from_name":"sentiment","to_name":"text","type":"choices","value":{"choices":["%s"]}}]}]}' \
      "$id" "${texts[$i]}" "$id" "$id" "$id" "$id" "$label"
  done
  printf ']\n'
} >"$export_file"
config='<View><Text name="text" value="$text"/><Choices name="sentiment" toName="text" choice="single"><Choice value="Positive"/><Choice value="Negative"/></Choices></View>'
"$KUBECTL" -n "$NAMESPACE" create configmap e2e-training-data \
  --from-file=export.json="$export_file" --from-literal=config.xml="$config" \
  --dry-run=client -o yaml | "$KUBECTL" apply -f -
rm -f "$export_file"

job="$FULLNAME-e2e-train-$(date +%s)"
# Inside the predictor pod: its ServiceAccount token (the chart's Role) and JOB_VALUES (the chart's ConfigMap).
"$KUBECTL" -n "$NAMESPACE" exec -i "deploy/$FULLNAME" -- env JOB_NAME="$job" python - <<'PY'
import os

import yaml
from kubernetes import client, config

config.load_incluster_config()
v = yaml.safe_load(open(os.environ["JOB_VALUES"]))
labels = dict(v["podLabels"])
container = {
    "name": "trainer", "image": v["image"], "imagePullPolicy": v["imagePullPolicy"],
    "args": ["--project", "1", "--export-file", "/data/export.json", "--label-config", "@/data/config.xml",
             "--epochs", "1"],
    "env": v["env"], "envFrom": v["envFrom"], "resources": v["resources"],
    "securityContext": v["securityContext"],
    "volumeMounts": v["volumeMounts"] + [{"name": "data", "mountPath": "/data", "readOnly": True}],
}
job = {
    "apiVersion": "batch/v1", "kind": "Job",
    "metadata": {"name": os.environ["JOB_NAME"], "labels": labels},
    "spec": {
        "backoffLimit": v["backoffLimit"], "activeDeadlineSeconds": v["activeDeadlineSeconds"],
        "ttlSecondsAfterFinished": v["ttlSecondsAfterFinished"],
        "template": {
            "metadata": {"labels": labels, "annotations": v["podAnnotations"]},
            "spec": {
                "restartPolicy": "Never", "serviceAccountName": v["serviceAccountName"],
                "imagePullSecrets": v["imagePullSecrets"], "securityContext": v["podSecurityContext"],
                "nodeSelector": v["nodeSelector"], "tolerations": v["tolerations"], "affinity": v["affinity"],
                "volumes": v["volumes"] + [{"name": "data", "configMap": {"name": "e2e-training-data"}}],
                "containers": [container],
            },
        },
    },
}
created = client.BatchV1Api().create_namespaced_job(os.environ["POD_NAMESPACE"], job)
print("created Job", created.metadata.name)
PY

if ! "$KUBECTL" -n "$NAMESPACE" wait --for=condition=complete "job/$job" --timeout=30m; then
  "$KUBECTL" -n "$NAMESPACE" logs "job/$job" --tail=100 >&2 || true
  die "training Job $job did not complete"
fi
"$KUBECTL" -n "$NAMESPACE" logs "job/$job" --tail=20
stored=$("$KUBECTL" -n "$NAMESPACE" exec "deploy/$FULLNAME" -- ls /var/lib/lsbert/models/1)
echo "versions of project 1: $stored"
[[ -n "$stored" ]] || die "the training Job stored no version under /var/lib/lsbert/models/1"

log "e2e passed"
