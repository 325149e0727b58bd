#!/usr/bin/env bash
# Make the secret files the local compose cluster reads (compose.yaml's `secrets:`):
#
#   do_token       the "DigitalOcean" API token the emulator accepts and the sidecars send
#   cluster_key    the cluster's HMAC key (32 random bytes, base64, as `fip-sidecar keygen`)
#   emulator_ca    a private CA certificate; the sidecars trust only it for the API
#   emulator_cert  the emulator's https certificate, signed by that CA
#                  (names: emulator, localhost, 198.18.10.2, 127.0.0.1)
#   emulator_key   its private key
#
# Why files and not environment variables or the compose file: secrets in the compose file
# end up in git, and environment variables show up in `docker inspect`. Compose mounts each
# file read-only at /run/secrets/NAME. The CA's own key is thrown away after signing, so
# nothing can issue another certificate the sidecars would trust.
#
# Usage: compose/make-secrets.sh [--force] [DIR]
#   DIR      where to write (default: compose/secrets, git-ignored); compose.yaml reads
#            FIP_SECRETS_DIR, default ./secrets next to it
#   --force  replace existing files (else an existing complete set is kept as it is)
#
# Permissions: DIR is 0700, so other users of this machine cannot read the files. The
# containers run as uid 10001 and see each file directly (a bind mount), so as root the files
# are given to uid 10001 with mode 0400; as another user they are made 0444 (readable in the
# container; still unreachable on the host through the 0700 directory).
# Needs: openssl (1.1.1 or later).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
force=0
if [ "${1:-}" = "--force" ]; then
    force=1
    shift
fi
dir="${1:-$here/secrets}"
container_uid=10001
files=(do_token cluster_key emulator_ca emulator_cert emulator_key)

log() { printf 'make-secrets: %s\n' "$*" >&2; }

command -v openssl >/dev/null 2>&1 || {
    log "openssl is needed (apt-get install openssl)"
    exit 1
}

complete=1
for name in "${files[@]}"; do
    [ -s "$dir/$name" ] || complete=0
done
if [ "$complete" -eq 1 ] && [ "$force" -eq 0 ]; then
    log "$dir already holds every secret (use --force to make new ones)"
    exit 0
fi

umask 077
mkdir -p "$dir"
chmod 0700 "$dir"
work="$(mktemp -d "$dir/.work.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# A token shaped like DigitalOcean's personal access tokens; only the emulator accepts it.
printf 'dop_v1_%s\n' "$(openssl rand -hex 32)" >"$work/do_token"
openssl rand -base64 32 >"$work/cluster_key"

# A private CA and the emulator's certificate (EC P-256). Key identifiers and key usages are
# set explicitly: strict verifiers (Python >= 3.13's default context) require them.
openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
    -keyout "$work/ca.key" -out "$work/emulator_ca" -days 825 \
    -subj "/CN=fip-sidecar local compose CA" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" 2>/dev/null
openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
    -keyout "$work/emulator_key" -out "$work/emulator.csr" \
    -subj "/CN=emulator" 2>/dev/null
cat >"$work/emulator.ext" <<'EOF'
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:emulator, DNS:localhost, IP:198.18.10.2, IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EOF
openssl x509 -req -in "$work/emulator.csr" -CA "$work/emulator_ca" -CAkey "$work/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -out "$work/emulator_cert" -days 365 -extfile "$work/emulator.ext" \
    2>/dev/null
openssl verify -CAfile "$work/emulator_ca" "$work/emulator_cert" >/dev/null

for name in "${files[@]}"; do
    if [ "$(id -u)" -eq 0 ]; then
        chown "$container_uid:$container_uid" "$work/$name"
        chmod 0400 "$work/$name"
    else
        chmod 0444 "$work/$name"
    fi
    mv -f "$work/$name" "$dir/$name"
done
log "wrote ${files[*]} to $dir"
