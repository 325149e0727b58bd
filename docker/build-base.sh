#!/usr/bin/env bash
# Build the local stand-in for `python:3.12-slim`: a minimal Debian bookworm with python3.
#
# Why: machines here reach package registries but no container registry, so no base image can
# be pulled. debootstrap builds an equivalent root filesystem from Debian's packages, and
# `docker import` turns it into an image the Dockerfile can start FROM (passed in as the
# BASE_IMAGE build argument). The real Dockerfile stays standard; only this base differs
# (Debian's python3 3.11 in /usr/bin instead of 3.12 in /usr/local/bin).
#
# Usage: docker/build-base.sh [--force] [IMAGE]   (default IMAGE: local/python-base:bookworm)
#   --force            rebuild even if the image already exists
#   DEBIAN_MIRROR      Debian mirror for debootstrap (default http://deb.debian.org/debian)
set -euo pipefail

force=0
if [ "${1:-}" = "--force" ]; then
    force=1
    shift
fi
image="${1:-local/python-base:bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
host_ca_bundle="/etc/ssl/certs/ca-certificates.crt"

log() { printf 'build-base: %s\n' "$*" >&2; }

if [ "$force" -eq 0 ] && docker image inspect "$image" >/dev/null 2>&1; then
    log "$image already exists (use --force to rebuild)"
    exit 0
fi
command -v debootstrap >/dev/null 2>&1 || {
    log "debootstrap is missing: run docker/ensure-docker.sh first"
    exit 1
}

rootfs="$(mktemp -d /var/tmp/fip-python-base.XXXXXX)"
cleanup() { rm -rf --one-file-system "$rootfs"; }
trap cleanup EXIT

started=$SECONDS
log "debootstrap bookworm into $rootfs"
timeout 900 debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$rootfs" "$mirror" </dev/null >"$rootfs.log" 2>&1 || {
    log "debootstrap failed; last lines of $rootfs.log:"
    tail -n 20 "$rootfs.log" >&2
    exit 1
}
rm -f "$rootfs.log"

# pip inside `docker build` reaches PyPI only through this machine's trust store (which may
# hold a TLS-inspecting proxy's CA), so the stand-in trusts exactly what the host trusts.
if [ -s "$host_ca_bundle" ]; then
    cp "$host_ca_bundle" "$rootfs/etc/ssl/certs/ca-certificates.crt"
fi
# Leave no package caches, lists, manuals or translations in the base, like the slim images.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/tmp/* \
    "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/*
# mktemp made the directory 0700, and tar records "." with that mode: the image's / would then
# be closed to every non-root user (exec of anything fails with "not found in $PATH").
chmod 0755 "$rootfs"

log "importing as $image"
tar --numeric-owner -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --change 'LABEL org.opencontainers.image.description="Local stand-in for python:3.12-slim (debootstrap bookworm minbase + python3)"' \
    - "$image" >/dev/null
log "built $image in $((SECONDS - started))s"
