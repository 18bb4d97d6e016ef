#!/usr/bin/env bash
# Install Label Studio 1.23.2 (+ SDK 2.1.2) into a dedicated virtualenv OUTSIDE the repo,
# for the integration tests (tests/support/labelstudio.py).
#
#   tests/support/install-labelstudio.sh        # prints the venv's python path on stdout
#
# Idempotent: if the venv already holds the right versions and Label Studio's CLI works, it
# only prints the path.  Safe to run concurrently (flock).  Progress goes to stderr.
#
# Environment:
#   LSBERT_CACHE      cache root (default: $HOME/.cache/lsbert)
#   LSBERT_LS_PYTHON  interpreter used to create the venv (default: python3)
set -euo pipefail

LS_VERSION=1.23.2
SDK_VERSION=2.1.2
CACHE="${LSBERT_CACHE:-$HOME/.cache/lsbert}"
VENV="$CACHE/label-studio-$LS_VERSION"
PY="$VENV/bin/python"
MARKER="$VENV/.lsbert-installed"
BASE_PYTHON="${LSBERT_LS_PYTHON:-python3}"

log() { echo "[install-labelstudio] $*" >&2; }

# Verify the installation without touching ~/.local/share/label-studio (gotcha G9: any
# label-studio command creates it unless LABEL_STUDIO_BASE_DATA_DIR is set).
check() {
    [ -x "$PY" ] || return 1
    "$PY" - "$LS_VERSION" "$SDK_VERSION" <<'EOF' >/dev/null 2>&1 || return 1
import sys
from importlib.metadata import version
assert version("label-studio") == sys.argv[1], version("label-studio")
assert version("label-studio-sdk") == sys.argv[2], version("label-studio-sdk")
EOF
    local tmp rc=0
    tmp="$(mktemp -d)"
    env -u HOST -u PORT -u USERNAME -u PASSWORD -u USER_TOKEN \
        LABEL_STUDIO_BASE_DATA_DIR="$tmp" HOME="$tmp" \
        LATEST_VERSION_CHECK=false COLLECT_ANALYTICS=false \
        "$VENV/bin/label-studio" --help >/dev/null 2>&1 || rc=1
    rm -rf "$tmp"
    return $rc
}

mkdir -p "$CACHE"
exec 9>"$CACHE/label-studio-$LS_VERSION.lock"
flock 9

if [ -f "$MARKER" ] && check; then
    echo "$PY"
    exit 0
fi

if [ -d "$VENV" ]; then
    log "removing incomplete or broken venv $VENV"
    rm -rf "$VENV"
fi

start=$(date +%s)
log "creating venv $VENV with $("$BASE_PYTHON" --version 2>&1)"
"$BASE_PYTHON" -m venv "$VENV"
"$PY" -m pip install --quiet --upgrade pip >&2
log "installing label-studio==$LS_VERSION label-studio-sdk==$SDK_VERSION (a minute or two)"
"$PY" -m pip install --quiet "label-studio==$LS_VERSION" "label-studio-sdk==$SDK_VERSION" >&2

if ! check; then
    log "installed, but the check failed (versions / 'label-studio --help')"
    exit 1
fi
date -u +%Y-%m-%dT%H:%M:%SZ >"$MARKER"
log "done in $(( $(date +%s) - start )) s"
echo "$PY"
