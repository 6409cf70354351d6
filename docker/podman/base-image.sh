#!/usr/bin/env bash
# Makes the base image locally, since no image registry is reachable here: Debian bookworm (minbase) with
# Python 3.11, from debootstrap, imported into podman. Prints the image name. A second run finds the image
# and returns at once; the tag carries a hash of this script, so a changed package list makes a new image.
#   docker/podman/base-image.sh            -> localhost/customllm-base:bookworm-<hash>
# Needs root, debootstrap and podman. DEBIAN_MIRROR overrides the mirror.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/env.sh"

packages=python3.11,python3.11-venv,python3-distutils,python3-pip-whl,python3-setuptools-whl,ca-certificates
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
image="localhost/customllm-base:bookworm-$(sha256sum "$0" | cut -c1-12)"

if podman image exists "$image"; then
    echo "$image"
    exit 0
fi
rootfs=$(mktemp -d /var/tmp/customllm-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
for attempt in 1 2 3; do
    if debootstrap --variant=minbase --include="$packages" bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1; then
        break
    fi
    if [ "$attempt" = 3 ]; then
        tail -20 "$rootfs.log" >&2
        rm -f "$rootfs.log"
        echo "debootstrap failed (see above)" >&2
        exit 1
    fi
    rm -rf "${rootfs:?}"/*
    sleep 10
done
rm -f "$rootfs.log"
# Downloaded packages and apt lists are not needed in the image (a build that installs more runs apt-get update).
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | podman import --quiet --change 'CMD ["/bin/bash"]' - "$image" >/dev/null
echo "$image"
