#!/usr/bin/env bash
# Build the fip-sidecar image here: make the stand-in base if it is missing, then build
# docker/Dockerfile from the repository root with the classic builder.
#
# Why --network host: the build's pip reaches PyPI through this machine's network and trust
# store; Docker's default bridge network is not used for anything in this project.
#
# Usage: docker/build-image.sh [IMAGE]          (default IMAGE: fip-sidecar:local)
#   BASE_IMAGE   base to build on (default local/python-base:bookworm, built if missing;
#                set python:3.12-slim where a registry is reachable)
#   EXTRAS       the package's extras to install too (default none: the production image);
#                compose's emulator runs EXTRAS=emulator docker/build-image.sh fip-sidecar-emulator:local
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
image="${1:-fip-sidecar:local}"
base_image="${BASE_IMAGE:-local/python-base:bookworm}"
extras="${EXTRAS:-}"

log() { printf 'build-image: %s\n' "$*" >&2; }

if [ "$base_image" = "local/python-base:bookworm" ]; then
    "$here/build-base.sh" "$base_image"
fi

version="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root/pyproject.toml" | head -n 1)"
revision="$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
started=$SECONDS
log "building $image on $base_image${extras:+ with extras [$extras]}"
DOCKER_BUILDKIT=0 docker build --network host \
    --build-arg "BASE_IMAGE=$base_image" \
    --build-arg "EXTRAS=$extras" \
    --label "org.opencontainers.image.version=${version:-0.0.0}" \
    --label "org.opencontainers.image.revision=$revision" \
    --label "org.opencontainers.image.created=$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    --label "org.opencontainers.image.base.name=$base_image" \
    -f "$root/docker/Dockerfile" -t "$image" "$root" </dev/null
log "built $image in $((SECONDS - started))s ($(docker image inspect --format '{{.Size}}' "$image") bytes)"
