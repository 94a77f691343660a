#!/usr/bin/env bash
# Builds the stand-in for the nvidia/cuda base image where no image registry is reachable: a minimal
# Debian bookworm root filesystem (mmdebstrap, Debian package) loaded with `docker import`. It carries
# this machine's local CA certificates (the folder update-ca-certificates reads) so that HTTPS from
# inside the build verifies against the same roots as the host. Skips the build when the tag exists.
# Usage: tests/docker/standin-base.sh [TAG]   (default mnist8k-standin:bookworm)
set -euo pipefail
tag=${1:-mnist8k-standin:bookworm}
if docker image inspect "$tag" >/dev/null 2>&1; then
    echo "stand-in base $tag: present"
    exit 0
fi
mmdebstrap --quiet --variant=minbase --include=ca-certificates \
    --customize-hook='copy-in /usr/local/share/ca-certificates /usr/local/share' \
    --customize-hook='chroot "$1" update-ca-certificates' \
    bookworm - | docker import --change 'CMD ["bash"]' - "$tag"
echo "stand-in base $tag: built"
