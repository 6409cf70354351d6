#!/usr/bin/env bash
# Builds an image with podman on a machine that reaches only the package registries:
#   docker/podman/build.sh TAG [CONTEXT [podman build options...]]     (CONTEXT defaults to the repository)
#   docker/podman/build.sh localhost/customllm-server:latest
# - the base image comes from base-image.sh (debootstrap) and is passed as BASE_IMAGE;
# - the host's pip configuration (its files and PIP_* variables, resolved by `pip config list`) is written
#   to one pip.conf and mounted into the build, together with every local path it names (CA bundle, wheel
#   directories, local indexes, constraints), so that pip inside the build trusts the host's CA bundle and
#   takes the CPU torch wheel from the host's disk instead of PyPI's multi-GB CUDA build;
# - --format docker, since the OCI format has no HEALTHCHECK.
# PIP names the pip whose configuration counts (default: pip, else python3 -m pip).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/env.sh"
tag=${1:?usage: build.sh TAG [CONTEXT [podman build options...]]}
context=${2:-$(cd "$here/../.." && pwd)}
shift $(($# < 2 ? $# : 2))

base=$("$here/base-image.sh")
if [ -z "${PIP:-}" ]; then
    if command -v pip >/dev/null 2>&1; then PIP=pip; else PIP="python3 -m pip"; fi
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# `pip config list` prints scope.key='value', files first, then :env: (PIP_* variables), which win.
{ $PIP config list 2>/dev/null | grep -v '^:env:' || true; $PIP config list 2>/dev/null | grep '^:env:' || true; } \
    | sed -E "s/^[^.]*\.([a-z-]+)='(.*)'$/\1 \2/" | awk '{ key = $1; $1 = ""; value[key] = substr($0, 2) }
        END { print "[global]"; for (k in value) print k " = " value[k] }' >"$work/pip.conf"

mounts=(-v "$work/pip.conf:/etc/pip.conf:ro")
find_links=""
for word in $(sed -n 's/^[a-z-]* = //p' "$work/pip.conf"); do
    path=${word#file://}
    # A local index (.../simple) links to files beside it: mount its parent.
    if [ "$(basename "$path")" = simple ]; then path=$(dirname "$path"); fi
    case $path in
        /*) [ -e "$path" ] && mounts+=(-v "$path:$path:ro") ;;
    esac
done
for dir in $(sed -n 's/^find-links = //p' "$work/pip.conf"); do find_links="$find_links ${dir#file://}"; done

build_args=(--build-arg "BASE_IMAGE=$base")
# A local CPU torch wheel: take it (through the host's find-links) rather than the Dockerfile's default index.
if [ -z "${TORCH_INDEX+set}" ]; then
    for dir in $find_links; do
        if compgen -G "$dir/torch-*+cpu-*.whl" >/dev/null; then TORCH_INDEX=""; fi
    done
fi
if [ -n "${TORCH_INDEX+set}" ]; then build_args+=(--build-arg "TORCH_INDEX=$TORCH_INDEX"); fi

podman build --format docker --network host "${mounts[@]}" "${build_args[@]}" -t "$tag" "$@" "$context"
