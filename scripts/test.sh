#!/usr/bin/env bash
# Runs the whole test suite on a Debian machine with Rust: provisions what the tests need
# (PostgreSQL, Redis, nginx, Chromium, the SDK tests' Python venv), then the format check,
# clippy with warnings denied, and every test.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/lib.sh
. scripts/lib.sh

# The UI tests (tests/ui.rs) drive Debian's headless Chromium through chromedriver.
ensure_chromium() {
    if [ ! -x /usr/bin/chromedriver ] || [ ! -x /usr/bin/chromium ]; then
        log "installing Chromium and chromedriver"
        apt_install chromium chromium-driver
    fi
}

ensure_postgres
ensure_redis
ensure_nginx
ensure_chromium
ensure_sdk_venv

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
