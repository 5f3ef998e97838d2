# Shared by scripts/test.sh and scripts/cluster.sh (sourced, not run): provisioning of
# what the tests and a local cluster need on a Debian machine, PostgreSQL, Redis and
# nginx, started only when they are not already answering.
# shellcheck shell=bash

log() { printf '\n==> %s\n' "$*"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_updated=0
apt_install() {
    if [ "$apt_updated" = 0 ]; then
        as_root apt-get update -qq
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}

# Waits for a readiness probe instead of sleeping a fixed time.
wait_for() {
    local what=$1; shift
    for _ in $(seq 1 100); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    echo "$what did not become ready" >&2
    return 1
}

ensure_postgres() {
    if ! command -v pg_ctlcluster >/dev/null; then
        log "installing PostgreSQL"
        apt_install postgresql
    fi
    if ! pg_isready -q -h 127.0.0.1 -p 5432; then
        log "starting PostgreSQL"
        local version
        version=$(find /etc/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n 1)
        as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
        wait_for PostgreSQL pg_isready -q -h 127.0.0.1 -p 5432
    fi
}

ensure_redis() {
    if ! command -v redis-server >/dev/null; then
        log "installing Redis"
        apt_install redis-server
    fi
    if ! redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; then
        log "starting Redis"
        redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
        wait_for Redis sh -c 'redis-cli -h 127.0.0.1 -p 6379 ping | grep -q PONG'
    fi
}

# The nginx binary: Debian puts it in /usr/sbin, which is not on every user's PATH.
nginx_bin() {
    if command -v nginx 2>/dev/null; then return 0; fi
    if [ -x /usr/sbin/nginx ]; then echo /usr/sbin/nginx; return 0; fi
    return 1
}

# nginx for scripts/cluster.sh and the deployment tests (tests/deploy.rs). Only the
# binary is needed: the cluster runs its own nginx with its own configuration, so
# Debian's service is left as it is.
ensure_nginx() {
    if ! nginx_bin >/dev/null; then
        log "installing nginx"
        apt_install nginx
    fi
}
