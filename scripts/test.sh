#!/usr/bin/env bash
# Runs the whole test suite on a Debian machine with Rust: provisions what the tests need
# (PostgreSQL, Redis, nginx, PgBouncer, Chromium, the SDK tests' Python venv, the Node
# tests' packages), then the format check, clippy with warnings denied, the Node tests and
# every Rust test.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/lib.sh
. scripts/lib.sh

# The UI tests (tests/it/ui.rs) drive Debian's headless Chromium through chromedriver.
ensure_chromium() {
    if [ ! -x /usr/bin/chromedriver ] || [ ! -x /usr/bin/chromium ]; then
        log "installing Chromium and chromedriver"
        apt_install chromium chromium-driver
    fi
}

ensure_postgres
ensure_redis
ensure_nginx
ensure_pgbouncer
ensure_chromium
ensure_sdk_venv
ensure_node_packages

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy --all-targets --workspace -- -D warnings"
cargo clippy --all-targets --workspace --quiet -- -D warnings

# A failure here fails the run after the Rust tests, so one run reports both.
log "node --test ($NODE_TESTS)"
mkdir -p target
node_out=$PWD/target/test-output-node.txt
node_status=0
(cd "$NODE_TESTS" && node --test --test-reporter=tap) 2>&1 | tee "$node_out" || node_status=$?

log "cargo test --workspace"
out=target/test-output.txt
# Here every service is provisioned above: a test that finds one missing fails, not skips.
SLUICE_TEST_REQUIRE_ALL=1 cargo test --workspace --quiet 2>&1 | tee "$out"
passed=$(grep -Eo '[0-9]+ passed' "$out" | awk '{s += $1} END {print s + 0}')
failed=$(grep -Eo '[0-9]+ failed' "$out" | awk '{s += $1} END {print s + 0}')
passed=$((passed + $(awk '/^# pass /{s += $3} END {print s + 0}' "$node_out")))
failed=$((failed + $(awk '/^# fail /{s += $3} END {print s + 0}' "$node_out")))
echo
echo "tests: $passed passed, $failed failed"
if [ "$node_status" != 0 ]; then
    echo "the Node tests failed: see $node_out" >&2
    exit 1
fi
