# Shared by scripts/test.sh and scripts/cluster.sh (sourced, not run): provisioning of
# what the tests and a local cluster need on a Debian machine, PostgreSQL, Redis, nginx
# and PgBouncer, started only when they are not already answering, the SDK tests' venv
# and the Node tests' packages.
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

# nginx for scripts/cluster.sh and the deployment tests (tests/it/deploy.rs). Only the
# binary is needed: the cluster runs its own nginx with its own configuration, so
# Debian's service is left as it is.
ensure_nginx() {
    if ! nginx_bin >/dev/null; then
        log "installing nginx"
        apt_install nginx
    fi
}

# The PgBouncer binary: Debian puts it in /usr/sbin, which is not on every user's PATH.
pgbouncer_bin() {
    if command -v pgbouncer 2>/dev/null; then return 0; fi
    if [ -x /usr/sbin/pgbouncer ]; then echo /usr/sbin/pgbouncer; return 0; fi
    return 1
}

# PgBouncer for the store tests through a transaction pooler (tests/it/common/pgbouncer.rs).
# Only the binary is needed: each test process runs its own PgBouncer with its own ini on a
# free port, so Debian's service is left as it is.
ensure_pgbouncer() {
    if ! pgbouncer_bin >/dev/null; then
        log "installing PgBouncer"
        apt_install pgbouncer
    fi
}

# The SDK tests (tests/it/sdk.rs) drive the official OpenAI and Anthropic Python SDKs from a
# venv of their own, pinned by tests/sdk/requirements.txt. The venv is rebuilt only when that
# file's hash differs from the one recorded at the last install (or its interpreter is
# gone), so a second run costs a hash.
SDK_VENV=target/sdk-venv
SDK_REQUIREMENTS=tests/sdk/requirements.txt

ensure_sdk_venv() {
    local stamp="$SDK_VENV/requirements.sha256" want python=python3
    want=$(sha256sum "$SDK_REQUIREMENTS" | cut -d' ' -f1)
    if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] &&
        "$SDK_VENV/bin/python" -c '' 2>/dev/null; then
        return 0
    fi
    # Debian's python3 makes venvs only with python3-venv (which brings ensurepip).
    if ! command -v python3 >/dev/null || ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
        log "installing python3-venv"
        apt_install python3 python3-venv
        python=/usr/bin/python3
    fi
    log "creating $SDK_VENV for the SDK tests"
    rm -f "$stamp"
    "$python" -m venv --clear "$SDK_VENV"
    "$SDK_VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
        -r "$SDK_REQUIREMENTS"
    echo "$want" >"$stamp"
}

# The Node tests (tests/node: the UI's Markdown renderer) run on Node 20 or newer with the
# packages pinned by tests/node/package-lock.json. `npm ci` runs only when the lock file's
# hash differs from the one recorded at the last install, so a second run costs a hash.
NODE_TESTS=tests/node

node_major() { node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0; }

ensure_node_packages() {
    if ! command -v npm >/dev/null || [ "$(node_major)" -lt 20 ]; then
        log "installing Node.js and npm"
        apt_install nodejs npm
    fi
    if [ "$(node_major)" -lt 20 ]; then
        echo "the Node tests need Node 20 or newer; this machine has $(node --version)" >&2
        return 1
    fi
    local stamp="$NODE_TESTS/node_modules/.package-lock.sha256" want
    want=$(sha256sum "$NODE_TESTS/package-lock.json" | cut -d' ' -f1)
    if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
        return 0
    fi
    log "npm ci in $NODE_TESTS"
    (cd "$NODE_TESTS" && npm ci --no-audit --no-fund --loglevel=error)
    echo "$want" >"$stamp"
}
