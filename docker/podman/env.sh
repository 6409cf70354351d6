# Source this file to point podman at the project's own settings instead of the machine's:
#   . docker/podman/env.sh
# Storage: overlay, unless the disk under /var/lib is itself an overlay (overlayfs does not stack) or the kernel
# has no overlayfs; then vfs. CUSTOMLLM_PODMAN_STORAGE=overlay|vfs decides instead.
_customllm_podman_dir=$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")" && pwd)
export CONTAINERS_CONF="$_customllm_podman_dir/containers.conf"
_customllm_storage=${CUSTOMLLM_PODMAN_STORAGE:-}
if [ -z "$_customllm_storage" ]; then
    _customllm_storage=overlay
    if ! grep -qw overlay /proc/filesystems 2>/dev/null \
        || [ "$(stat -f -c %T /var/lib 2>/dev/null)" = overlayfs ]; then
        _customllm_storage=vfs
    fi
fi
if [ "$_customllm_storage" = vfs ]; then
    export CONTAINERS_STORAGE_CONF="$_customllm_podman_dir/storage-vfs.conf"
else
    export CONTAINERS_STORAGE_CONF="$_customllm_podman_dir/storage.conf"
fi
unset _customllm_podman_dir _customllm_storage
