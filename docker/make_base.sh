#!/usr/bin/env bash
# Make a local base image for machines that cannot reach Docker Hub: a minimal Debian
# bookworm root filesystem (debootstrap, from the Debian mirror) with Python 3.11 and
# venv, imported into podman or docker as localhost/debian-python:bookworm.
#
#   docker/make_base.sh                      # podman, tag localhost/debian-python:bookworm
#   ENGINE=docker TAG=my/base:1 docker/make_base.sh
#   make image BASE_IMAGE=localhost/debian-python:bookworm
#
# Needs root (debootstrap) and the `debootstrap` package. The machine's CA certificates
# are copied in, so that pip in the image build trusts the same registries (and any
# TLS-inspecting proxy) as the machine itself.
set -euo pipefail

ENGINE=${ENGINE:-podman}
TAG=${TAG:-localhost/debian-python:bookworm}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

command -v debootstrap >/dev/null || { echo "make_base: debootstrap is not installed (apt-get install -y debootstrap)" >&2; exit 2; }
command -v "$ENGINE" >/dev/null || { echo "make_base: $ENGINE is not installed" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "make_base: debootstrap needs root" >&2; exit 2; }

rootfs=$(mktemp -d /var/tmp/debian-python.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT

debootstrap --variant=minbase "$SUITE" "$rootfs" "$MIRROR"
# Python through apt inside the new root: debootstrap's --include does not follow every
# dependency (python3.11-venv needs python3.11-distutils).
chroot "$rootfs" apt-get update -q
chroot "$rootfs" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    python3.11 python3.11-venv ca-certificates
# The registries' TLS chain as this machine sees it, then one bundle as Debian builds it.
if [ -d /usr/local/share/ca-certificates ]; then
    cp -r /usr/local/share/ca-certificates/. "$rootfs/usr/local/share/ca-certificates/"
fi
chroot "$rootfs" update-ca-certificates >/dev/null
chroot "$rootfs" apt-get clean
# An image needs no package lists, caches or docs.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/usr/share/doc/* \
       "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*

tar -C "$rootfs" -c . | "$ENGINE" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' - "$TAG"
echo "make_base: $TAG ($("$ENGINE" image inspect --format '{{.Size}}' "$TAG" | numfmt --to=iec))"
