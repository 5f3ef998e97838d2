#!/usr/bin/env bash
# Runs the whole test suite on a Debian machine with Rust: provisions what the tests need
# (PostgreSQL, Redis), then the format check, clippy with warnings denied, and every test.
set -euo pipefail
cd "$(dirname "$0")/.."

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
        version=$(ls /etc/postgresql | sort -V | tail -n 1)
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

# The UI tests (tests/ui.rs) drive Debian's headless Chromium through chromedriver.
ensure_chromium() {
    if [ ! -x /usr/bin/chromedriver ] || [ ! -x /usr/bin/chromium ]; then
        log "installing Chromium and chromedriver"
        apt_install chromium chromium-driver
    fi
}

ensure_postgres
ensure_redis
ensure_chromium

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --quiet -- -D warnings

log "cargo test"
out=target/test-output.txt
cargo test --quiet 2>&1 | tee "$out"
passed=$(grep -Eo '[0-9]+ passed' "$out" | awk '{s += $1} END {print s + 0}')
failed=$(grep -Eo '[0-9]+ failed' "$out" | awk '{s += $1} END {print s + 0}')
echo
echo "tests: $passed passed, $failed failed"
