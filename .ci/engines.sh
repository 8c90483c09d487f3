#!/usr/bin/env bash
# Brings up the real engines the integration tests use, on a fresh Debian machine:
#
#   apt packages  docker.io, docker-registry, debootstrap,  (installed when missing)
#                 wrk (the load generator profile's is checked against)
#   dockerd       overlay2, falling back to vfs              (started when not answering)
#   registry      127.0.0.1:5000, own config, no auth        (started when /v2/ does not answer)
#   base image    python:3.11-slim, a debootstrap stand-in   (built when not in the engine)
#
# Idempotent: each part is checked first and left alone when it already works, so a
# second run takes well under a second. Needs root. Exits non-zero with a line
# "engines: FAILED: <reason>" on stderr when something cannot be brought up.
#
# NOTE: no image can be pulled on this kind of machine (no Docker Hub), so the default
# base image of the product is replaced by a local stand-in with the same tag; the
# tests then exercise the product's real default instead of a test-only code path.
#
# Environment (all optional):
#   MLBUILD_CI_DIR            state folder (registry storage, rootfs scratch)  [/var/lib/mlbuild-ci]
#   MLBUILD_CI_LOGDIR         where the daemons log                           [/var/log]
#   MLBUILD_DEBOOTSTRAP_MIRROR  Debian mirror for debootstrap      [from /etc/apt/sources.list*]
#   MLBUILD_BASE_IMAGE        tag of the stand-in                             [python:3.11-slim]
#   MLBUILD_REGISTRY_ADDR     registry listen address                         [127.0.0.1:5000]
set -euo pipefail

CI_DIR=${MLBUILD_CI_DIR:-/var/lib/mlbuild-ci}
LOG_DIR=${MLBUILD_CI_LOGDIR:-/var/log}
BASE_IMAGE=${MLBUILD_BASE_IMAGE:-python:3.11-slim}
REGISTRY_ADDR=${MLBUILD_REGISTRY_ADDR:-127.0.0.1:5000}
SUITE=bookworm
DOCKERD_LOG=$LOG_DIR/mlbuild-dockerd.log
REGISTRY_LOG=$LOG_DIR/mlbuild-registry.log
HOST_CA=/etc/ssl/certs/ca-certificates.crt

T0=$(date +%s.%N)
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1fs", b - a }'; }
say() { echo "engines: $*"; }
die() { echo "engines: FAILED: $*" >&2; exit 1; }

[ "$(uname -s)" = Linux ] || die "needs Linux (this is $(uname -s))"
[ "$(id -u)" = 0 ] || die "needs root to install packages and start dockerd (uid $(id -u))"
mkdir -p "$CI_DIR" "$LOG_DIR"

# ---------------------------------------------------------------------------------
# 1. packages
# ---------------------------------------------------------------------------------
need=()
command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
command -v docker-registry >/dev/null 2>&1 || need+=(docker-registry)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
if [ ${#need[@]} -gt 0 ]; then
    t=$(now)
    # NOTE: the packages' maintainer scripts would start the daemons with their
    # default configs (the registry's wants htpasswd and takes port 5000). A
    # policy-rc.d that says "no" keeps them from starting; ours is removed after.
    own_policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        own_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt_install() {
        apt-get install -y -qq --no-install-recommends \
            -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
            "${need[@]}" >"$CI_DIR/apt.log" 2>&1
    }
    # Package lists may be stale (a mirror drops superseded versions): update only
    # when the install fails, so the common case costs no index download.
    ok=1
    apt_install || { apt-get update -qq >>"$CI_DIR/apt.log" 2>&1 && apt_install; } || ok=
    [ -n "$own_policy" ] && rm -f /usr/sbin/policy-rc.d
    [ -n "$ok" ] || die "apt-get install ${need[*]} failed: $(tail -n 3 "$CI_DIR/apt.log" | tr '\n' ' ') (full log: $CI_DIR/apt.log)"
    say "installed ${need[*]} ($(since "$t"))"
else
    say "packages present (docker.io, docker-registry, debootstrap, wrk)"
fi

# ---------------------------------------------------------------------------------
# 2. dockerd
# ---------------------------------------------------------------------------------
docker_up() { timeout 5 docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

start_dockerd() {  # $1 = storage driver; returns 0 once the engine answers
    local driver=$1 pid i
    echo "--- $(date -Is) mlbuild .ci/engines.sh: dockerd --storage-driver=$driver" >>"$DOCKERD_LOG"
    setsid nohup dockerd --storage-driver="$driver" >>"$DOCKERD_LOG" 2>&1 </dev/null &
    pid=$!
    for i in $(seq 1 120); do  # up to 60 s
        docker_up && { echo "$pid" >"$CI_DIR/dockerd.pid"; return 0; }
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.5
    done
    kill "$pid" 2>/dev/null || true
    return 1
}

if docker_up; then
    say "dockerd already running ($(docker info --format '{{.Driver}}' 2>/dev/null) storage)"
else
    t=$(now)
    # A socket or pid file left by a daemon that died would make dockerd refuse to start.
    if [ -e /var/run/docker.pid ] && ! kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; then
        rm -f /var/run/docker.pid
    fi
    if start_dockerd overlay2; then
        driver=overlay2
    else
        reason=$(grep -iE 'level=(error|fatal)|failed to start' "$DOCKERD_LOG" | tail -n 1 || true)
        say "dockerd with overlay2 did not start (${reason:-see $DOCKERD_LOG}); trying vfs"
        rm -f /var/run/docker.pid
        start_dockerd vfs || die "dockerd did not start with overlay2 nor vfs: $(tail -n 2 "$DOCKERD_LOG" | tr '\n' ' ') (log: $DOCKERD_LOG)"
        driver=vfs
    fi
    say "dockerd started, $driver storage, version $(docker version --format '{{.Server.Version}}') ($(since "$t"), log: $DOCKERD_LOG)"
fi

# ---------------------------------------------------------------------------------
# 3. registry
# ---------------------------------------------------------------------------------
registry_status() { curl -s -o /dev/null -w '%{http_code}' --max-time 3 "http://$REGISTRY_ADDR/v2/" || true; }

code=$(registry_status)
if [ "$code" = 200 ]; then
    say "registry already answering on $REGISTRY_ADDR"
else
    case $code in
        000) ;;  # nothing listens: ours to start
        401) die "$REGISTRY_ADDR is taken by a registry that wants auth; stop it or set MLBUILD_REGISTRY_ADDR" ;;
        *) die "$REGISTRY_ADDR is taken by something that answers /v2/ with HTTP $code, not a registry; stop it or set MLBUILD_REGISTRY_ADDR" ;;
    esac
    t=$(now)
    mkdir -p "$CI_DIR/registry/data"
    cat >"$CI_DIR/registry/config.yml" <<EOF
# Written by mlbuild .ci/engines.sh: a throw-away registry for the integration tests.
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $CI_DIR/registry/data
  delete:
    enabled: true
http:
  addr: $REGISTRY_ADDR
EOF
    echo "--- $(date -Is) mlbuild .ci/engines.sh: docker-registry serve $CI_DIR/registry/config.yml" >>"$REGISTRY_LOG"
    setsid nohup docker-registry serve "$CI_DIR/registry/config.yml" >>"$REGISTRY_LOG" 2>&1 </dev/null &
    pid=$!
    for i in $(seq 1 60); do  # up to 15 s
        [ "$(registry_status)" = 200 ] && break
        kill -0 "$pid" 2>/dev/null || die "docker-registry exited: $(tail -n 2 "$REGISTRY_LOG" | tr '\n' ' ') (log: $REGISTRY_LOG)"
        sleep 0.25
    done
    [ "$(registry_status)" = 200 ] || die "registry on $REGISTRY_ADDR does not answer /v2/ after 15 s (log: $REGISTRY_LOG)"
    echo "$pid" >"$CI_DIR/registry.pid"
    say "registry started on $REGISTRY_ADDR, storage $CI_DIR/registry/data ($(since "$t"), log: $REGISTRY_LOG)"
fi

# ---------------------------------------------------------------------------------
# 4. the stand-in base image
# ---------------------------------------------------------------------------------
debian_mirror() {  # the first non-security mirror apt uses for $SUITE
    local m
    m=$(awk -v suite="$SUITE" '
        # one-line format: deb [opts] URI SUITE COMPONENTS
        FILENAME ~ /\.list$/ && $1 == "deb" {
            for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $i !~ /\]$/) break
            if ($(i + 1) == suite) { print $i; exit }
        }
        # deb822 format: paragraphs with URIs: and Suites:
        FILENAME ~ /\.sources$/ {
            if ($0 ~ /^[ \t]*$/) { uris = ""; suites = ""; next }
            if ($1 == "URIs:") uris = $2
            if ($1 == "Suites:") suites = " " substr($0, index($0, ":") + 1) " "
            if (uris != "" && suites ~ (" " suite " ")) { print uris; exit }
        }' /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    echo "${m:-http://deb.debian.org/debian}"
}

if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    say "base image $BASE_IMAGE present ($(docker image inspect --format '{{.Size}}' "$BASE_IMAGE" | awk '{ printf "%.0f MB", $1 / 1e6 }'))"
else
    t=$(now)
    mirror=${MLBUILD_DEBOOTSTRAP_MIRROR:-$(debian_mirror)}
    rootfs=$(mktemp -d "$CI_DIR/rootfs.XXXXXX")
    cleanup_rootfs() {
        # debootstrap mounts /proc and /sys inside; never rm -rf through a mount.
        awk -v r="$rootfs" '$2 == r || index($2, r "/") == 1 { print $2 }' /proc/mounts | sort -r |
            while read -r m; do umount -l "$m" 2>/dev/null || true; done
        rm -rf --one-file-system "$rootfs"
    }
    trap cleanup_rootfs EXIT
    keyring=()
    [ -r /usr/share/keyrings/debian-archive-keyring.gpg ] && keyring=(--keyring=/usr/share/keyrings/debian-archive-keyring.gpg)
    debootstrap --variant=minbase "${keyring[@]}" \
        --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
        "$SUITE" "$rootfs" "$mirror" >"$CI_DIR/debootstrap.log" 2>&1 ||
        die "debootstrap $SUITE from $mirror failed: $(tail -n 3 "$CI_DIR/debootstrap.log" | tr '\n' ' ') (log: $CI_DIR/debootstrap.log)"
    say "debootstrap $SUITE from $mirror ($(since "$t"))"
    # pip installs into the system Python, as in the official image.
    rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
    # Outbound HTTPS here passes a TLS proxy: the image trusts what the host trusts.
    # The local CAs go in too, so an update-ca-certificates inside a build keeps them.
    cp "$HOST_CA" "$rootfs/etc/ssl/certs/ca-certificates.crt"
    if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
    fi
    # Trimmed like a slim image: no apt lists, docs, man pages or translations
    # (about 55 MB of the 190 MB debootstrap leaves).
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
        "$rootfs"/var/log/* "$rootfs"/tmp/* "$rootfs"/root/.cache \
        "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/*
    t2=$(now)
    ca=/etc/ssl/certs/ca-certificates.crt
    id=$(tar --numeric-owner -C "$rootfs" -c . | docker import \
        --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        --change "ENV LANG=C.UTF-8" \
        --change "ENV PIP_CERT=$ca" \
        --change "ENV SSL_CERT_FILE=$ca" \
        --change "ENV REQUESTS_CA_BUNDLE=$ca" \
        --change "LABEL dev.mlbuild.standin=\"debootstrap $SUITE minbase, made by .ci/engines.sh\"" \
        --change 'CMD ["python3"]' \
        --message "mlbuild stand-in for $BASE_IMAGE (debootstrap $SUITE)" \
        - "$BASE_IMAGE") || die "docker import of the stand-in failed"
    cleanup_rootfs
    trap - EXIT
    size=$(docker image inspect --format '{{.Size}}' "$BASE_IMAGE" | awk '{ printf "%.0f MB", $1 / 1e6 }')
    say "base image $BASE_IMAGE imported, $size, ${id#sha256:} (import $(since "$t2"), total $(since "$t"))"
fi

say "ready in $(since "$T0")"
