#!/usr/bin/env bash
# Build (once) and cache the KServe controller manager used by tests/kserve/, for every version pinned
# in tests/k8s/versions.env (KSERVE_VERSIONS, comma-separated), plus what it needs to start: its five
# CRDs (config/crd/full/) and its `inferenceservice-config` ConfigMap (config/configmap/), copied from
# the same module version.
#
# Output, one folder per version:
#   ${LSBERT_CACHE:-$HOME/.cache/lsbert}/k8s/<K8S_VERSION>/kserve/<KSERVE_VERSION>/
#     kserve-controller              the manager (github.com/kserve/kserve/cmd/manager)
#     crds/*.yaml                    the five CRDs
#     inferenceservice-config.yaml   the shipped ConfigMap (the test harness edits a copy)
#     webhooks.yaml                  the shipped webhook configurations (config/webhook/manifests.yaml;
#                                    the harness points them at its own URL and CA)
#     .stamp                         recipe + version; when it matches, that version is skipped
#
# `go install github.com/kserve/kserve/cmd/manager@vX` does not work: kserve's go.mod carries replace
# directives (controller-runtime and k8s.io/* held back, grpc, expr, ...) and an exclude that a plain
# install ignores, and the build then fails in its dependencies. So each version is built from a
# throwaway consumer module whose replace and exclude lines are copied from kserve's published go.mod.
#
# Environment knobs (same as build.sh):
#   LSBERT_CACHE   cache root (default ~/.cache/lsbert)
#   GO             go binary (default: `go` on PATH, else /usr/local/go/bin/go)
#   PYTHON         python3 used to read JSON (default: python3)
#   GO_BUILD_P     go build -p value (default 2)
#   FORCE=1        rebuild every version
#   KSERVE_VERSIONS  override the pinned list (comma-separated), e.g. to try another release
# GOMODCACHE / GOCACHE are left at Go's defaults (~/go/pkg/mod, ~/.cache/go-build) so reruns are warm.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
_OVERRIDE_VERSIONS="${KSERVE_VERSIONS:-}"
# shellcheck source=versions.env
source "${HERE}/versions.env"
[[ -n "${_OVERRIDE_VERSIONS}" ]] && KSERVE_VERSIONS="${_OVERRIDE_VERSIONS}"
[[ -n "${KSERVE_VERSIONS:-}" ]] || { echo "KSERVE_VERSIONS is not set in ${HERE}/versions.env" >&2; exit 1; }

# Bump when the recipe changes in a way that must invalidate cached builds.
RECIPE_REV=1

CACHE_ROOT="${LSBERT_CACHE:-${HOME}/.cache/lsbert}"
ROOT="${CACHE_ROOT}/k8s/${K8S_VERSION}/kserve"
GO_BUILD_P="${GO_BUILD_P:-2}"
PYTHON="${PYTHON:-python3}"
IFS=',' read -r -a VERSIONS <<< "${KSERVE_VERSIONS}"

# The five CRDs the manager needs (with fewer it waits for the missing informers and exits).
CRDS=(
  serving.kserve.io_inferenceservices.yaml
  serving.kserve.io_servingruntimes.yaml
  serving.kserve.io_clusterservingruntimes.yaml
  serving.kserve.io_trainedmodels.yaml
  serving.kserve.io_inferencegraphs.yaml
)

log() { printf '[kserve-build %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

stamp_content() { # version
  echo "recipe=${RECIPE_REV} kserve=$1 k8s=${K8S_VERSION}"
}

version_ok() { # version
  local d="${ROOT}/$1" f
  [[ "${FORCE:-0}" != 1 ]] || return 1
  [[ -x "${d}/kserve-controller" && -f "${d}/inferenceservice-config.yaml" && -f "${d}/webhooks.yaml" ]] || return 1
  for f in "${CRDS[@]}"; do [[ -f "${d}/crds/${f}" ]] || return 1; done
  [[ -f "${d}/.stamp" ]] && [[ "$(cat "${d}/.stamp")" == "$(stamp_content "$1")" ]]
}

# Fast path: nothing to do, and no Go toolchain needed.
todo=()
for v in "${VERSIONS[@]}"; do
  v="${v// /}"
  [[ -n "${v}" ]] || continue
  if version_ok "${v}"; then log "${v}: up to date (${ROOT}/${v})"; else todo+=("${v}"); fi
done
[[ ${#todo[@]} -gt 0 ]] || exit 0

mkdir -p "${ROOT}"
if command -v flock >/dev/null 2>&1; then
  exec 9>"${ROOT}/.lock"
  flock 9
fi

if [[ -z "${GO:-}" ]]; then
  if command -v go >/dev/null 2>&1; then GO="$(command -v go)"; else GO=/usr/local/go/bin/go; fi
fi
[[ -x "${GO}" ]] || command -v "${GO}" >/dev/null 2>&1 || die "go not found (set GO=/path/to/go)"
log "go: ${GO} ($("${GO}" env GOVERSION)); GOMODCACHE=$("${GO}" env GOMODCACHE) GOCACHE=$("${GO}" env GOCACHE)"
export CGO_ENABLED=0

declare -A TIMES=()
T_ALL=${SECONDS}

binary_ok() { # version
  local d="${ROOT}/$1"
  [[ "${FORCE:-0}" != 1 && -x "${d}/kserve-controller" && -f "${d}/.kserve-controller.version" ]] &&
    [[ "$(cat "${d}/.kserve-controller.version")" == "$(stamp_content "$1")" ]]
}

build_version() { # version
  local v="$1" t=${SECONDS} d="${ROOT}/$1" src="${ROOT}/src/$1"
  local module="github.com/kserve/kserve"
  mkdir -p "${src}" "${d}/crds"
  log "${v}: fetching ${module}@${v} (module zip + go.mod)"
  "${GO}" mod download -json "${module}@${v}" > "${src}/kserve.download.json"
  local moddir
  moddir="$("${PYTHON}" -c 'import json,sys; print(json.load(open(sys.argv[1]))["Dir"])' "${src}/kserve.download.json")"
  if binary_ok "${v}"; then
    log "${v}: kserve-controller cached"
  else
    rm -f "${d}/.kserve-controller.version"
    (
      cd "${src}"
      rm -f go.mod go.sum
      local gomod
      gomod="$("${PYTHON}" -c 'import json,sys; print(json.load(open(sys.argv[1]))["GoMod"])' kserve.download.json)"
      "${GO}" mod edit -json "${gomod}" > kserve.go.mod.json
      # Consumer module: kserve's go directive, kserve itself, and kserve's replace/exclude lines.
      "${PYTHON}" - kserve.go.mod.json "${module}" "${v}" > go.mod <<'PY'
import json, sys
src, module, version = sys.argv[1:]
m = json.load(open(src))
print("module lsbert.local/kserve-build\n")
print(f"go {m['Go']}\n")
for g in m.get("Godebug") or []:
    print(f"godebug {g['Key']}={g['Value']}")
print(f"require {module} {version}\n")
def mv(x):
    return x["Path"] + (" " + x["Version"] if x.get("Version") else "")
reps = m.get("Replace") or []
for r in reps:
    if r["New"]["Path"].startswith((".", "/")):
        sys.exit(f"kserve's go.mod has a local replace ({r}); a consumer module cannot copy it")
if reps:
    print("replace (")
    for r in reps:
        print(f"\t{mv(r['Old'])} => {mv(r['New'])}")
    print(")\n")
ex = m.get("Exclude") or []
if ex:
    print("exclude (")
    for e in ex:
        print(f"\t{e['Path']} {e['Version']}")
    print(")")
print(f"consumer go.mod: {len(reps)} replaces, {len(ex)} excludes copied from kserve's", file=sys.stderr)
PY
      log "${v}: go get (module downloads; the long part when cold)"
      "${GO}" get "${module}/cmd/manager@${v}"
      log "${v}: go build -p ${GO_BUILD_P}"
      "${GO}" build -p "${GO_BUILD_P}" -trimpath -ldflags "-s -w" -o "${d}/kserve-controller.tmp" \
        "${module}/cmd/manager"
    )
    mv -f "${d}/kserve-controller.tmp" "${d}/kserve-controller"
    stamp_content "${v}" > "${d}/.kserve-controller.version"
  fi
  local f
  for f in "${CRDS[@]}"; do
    [[ -f "${moddir}/config/crd/full/${f}" ]] || die "${v}: ${f} not in ${moddir}/config/crd/full/"
    install -m 0644 "${moddir}/config/crd/full/${f}" "${d}/crds/${f}"
  done
  [[ -f "${moddir}/config/configmap/inferenceservice.yaml" ]] || die "${v}: no config/configmap/inferenceservice.yaml"
  install -m 0644 "${moddir}/config/configmap/inferenceservice.yaml" "${d}/inferenceservice-config.yaml"
  [[ -f "${moddir}/config/webhook/manifests.yaml" ]] || die "${v}: no config/webhook/manifests.yaml"
  install -m 0644 "${moddir}/config/webhook/manifests.yaml" "${d}/webhooks.yaml"
  stamp_content "${v}" > "${d}/.stamp"
  TIMES[${v}]=$((SECONDS - t))
  log "${v}: done in ${TIMES[${v}]}s ($(du -h "${d}/kserve-controller" | cut -f1) binary)"
}

for v in "${todo[@]}"; do build_version "${v}"; done
log "timings (s): $(for k in "${!TIMES[@]}"; do printf '%s=%s ' "$k" "${TIMES[$k]}"; done)total=$((SECONDS - T_ALL))"
ls -l "${ROOT}"/*/kserve-controller >&2
