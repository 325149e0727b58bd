#!/usr/bin/env bash
# Make sure a Docker engine answers on this machine, installing and starting it if needed.
#
# Why this exists: development and CI machines come with only the Docker *client*; the engine,
# docker-compose and debootstrap (for the stand-in base image) must come from Debian's packages,
# and the engine must be started by hand with the options this sandbox supports (vfs storage,
# no iptables). The script is idempotent and safe to run concurrently, as root, with no stdin
# (CI): a lock serialises callers, nothing is installed or started twice, every wait is bounded.
#
# Environment knobs:
#   FIP_DOCKER_WAIT_SECONDS   how long to wait for `docker info` to answer (default 90)
#   FIP_DOCKERD_LOG           where dockerd's output goes (default /var/log/dockerd.log)
set -euo pipefail

wait_seconds="${FIP_DOCKER_WAIT_SECONDS:-90}"
dockerd_log="${FIP_DOCKERD_LOG:-/var/log/dockerd.log}"
lock_file="/var/lock/fip-sidecar-ensure-docker.lock"

log() { printf 'ensure-docker: %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    if docker info >/dev/null 2>&1; then
        exit 0
    fi
    log "not root and no Docker engine answers; run this script as root"
    exit 1
fi

engine_answers() { timeout 10 docker info >/dev/null 2>&1; }

packages_present() {
    command -v dockerd >/dev/null 2>&1 && command -v docker-compose >/dev/null 2>&1 &&
        command -v debootstrap >/dev/null 2>&1
}

# Fast path: nothing to do, no lock needed.
if packages_present && engine_answers; then
    exit 0
fi

# Serialise concurrent callers (several test sessions may start at once).
exec 9>"$lock_file"
if ! flock -w "$wait_seconds" 9; then
    log "timed out waiting for $lock_file"
    exit 1
fi

missing_packages() {
    local missing=()
    command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
    command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
    command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
    printf '%s\n' "${missing[@]}"
}

install_packages() {
    local packages
    mapfile -t packages < <(missing_packages | sed '/^$/d')
    if [ "${#packages[@]}" -eq 0 ]; then
        return 0
    fi
    log "installing ${packages[*]}"
    # Keep package scripts from starting an engine with default options (overlay2, iptables):
    # this script starts it itself below. Only add the policy file if none is there already.
    local added_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        added_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    local status=0
    {
        timeout 300 apt-get update -qq &&
            timeout 600 apt-get install -y -qq docker.io docker-compose debootstrap
    } </dev/null >/dev/null || status=$?
    if [ "$added_policy" -eq 1 ]; then
        rm -f /usr/sbin/policy-rc.d
    fi
    if [ "$status" -ne 0 ]; then
        log "apt-get failed (exit $status)"
        exit 1
    fi
}

dockerd_running() {
    local pid
    [ -s /var/run/docker.pid ] || return 1
    pid="$(cat /var/run/docker.pid)"
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

start_engine() {
    if dockerd_running; then
        log "dockerd is running (pid $(cat /var/run/docker.pid)); waiting for it to answer"
        return 0
    fi
    log "starting dockerd (vfs storage, no iptables); log in $dockerd_log"
    # Addresses: Docker's defaults (172.17.0.0/16 for the default bridge, 172.x/192.168.x pools
    # for new networks) are ranges this project never uses. Keep every address Docker picks by
    # itself inside 198.19.0.0/16 (benchmark range, RFC 2544); networks with a fixed subnet
    # (compose, tests) use 198.18.x and cannot collide with these.
    setsid dockerd --storage-driver=vfs --iptables=false \
        --bip=198.19.255.1/24 \
        --default-address-pool base=198.19.0.0/17,size=24 \
        </dev/null >>"$dockerd_log" 2>&1 9>&- &
}

wait_for_engine() {
    local deadline=$((SECONDS + wait_seconds))
    while [ "$SECONDS" -lt "$deadline" ]; do
        if engine_answers; then
            return 0
        fi
        sleep 1
    done
    log "dockerd did not answer within ${wait_seconds}s; last log lines:"
    tail -n 20 "$dockerd_log" >&2 || true
    return 1
}

install_packages
if engine_answers; then
    exit 0
fi
start_engine
wait_for_engine
log "Docker engine ready"
