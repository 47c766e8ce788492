#!/usr/bin/env bash
# Build the psrt image (deploy/Dockerfile) on this machine, also without registry access:
#
#   deploy/build-image.sh [TAG]            default TAG: psrt:local
#   BASE=python:3.11-slim deploy/build-image.sh   another base (default: psrt-base:local,
#                                                 built first by deploy/build-base-image.sh)
#
# pip's settings of this machine (PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_TRUSTED_HOST from the
# environment or `pip config`) go in as build arguments, and its CA bundle (PIP_CERT or pip's
# `cert`) as .pip-ca.pem in the build context of the first stage only. Docker's layer cache
# makes a second build with unchanged sources take a second or two.
set -euo pipefail
cd "$(dirname "$0")/.."
tag="${1:-psrt:local}"
base="${BASE:-psrt-base:local}"
[[ "$base" != "psrt-base:local" ]] || deploy/build-base-image.sh "$base"

pip_setting() {  # $1: environment variable, $2: pip config name
    local value="${!1:-}"
    [[ -n "$value" ]] || value="$(python3 -m pip config get "global.$2" 2>/dev/null || true)"
    printf '%s' "$value"
}
args=(--build-arg "BASE=$base")
for pair in PIP_INDEX_URL:index-url PIP_EXTRA_INDEX_URL:extra-index-url \
    PIP_TRUSTED_HOST:trusted-host PIP_DEFAULT_TIMEOUT:timeout; do
    value="$(pip_setting "${pair%%:*}" "${pair#*:}")"
    [[ -z "$value" ]] || args+=(--build-arg "${pair%%:*}=$value")
done

extra="$(mktemp -d)"
trap 'rm -rf "$extra"' EXIT
cert="$(pip_setting PIP_CERT cert)"
extra_files=()
if [[ -n "$cert" && -f "$cert" ]]; then
    cp "$cert" "$extra/.pip-ca.pem"
    extra_files=(-C "$extra" .pip-ca.pem)
fi
# The context: only what the Dockerfile copies (and the CA), as a tar stream.
tar -c --exclude=__pycache__ --exclude='*.pyc' pyproject.toml README.md proto ckpt pserver \
    trainer deploy/Dockerfile "${extra_files[@]}" |
    docker build -q -f deploy/Dockerfile -t "$tag" "${args[@]}" - >/dev/null
echo "build-image: built $tag ($(docker image inspect -f '{{.Size}}' "$tag") bytes, base $base)"
