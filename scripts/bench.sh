#!/usr/bin/env bash
# The load benchmark: sluice against the mock upstream, over loopback, on one machine.
#
# Every scenario runs twice, once straight to the mock upstream (`sluice-mock`) and once
# through sluice in front of it, so each figure is read against a baseline taken minutes
# apart in the same run. sluice is pinned to one core; the mock and the load client
# (`sluice-load`) share another, so sluice's core does nothing but relay.
#
#   scripts/bench.sh                      # every default scenario, about 3 minutes after the build
#   HOLD_STREAMS=2000 scripts/bench.sh    # settings below, from the environment
#   SCENARIOS=fanout-cluster scripts/bench.sh   # 3 instances sharing Redis and PostgreSQL
#   PROFILE=1 SCENARIOS=throughput scripts/bench.sh   # perf profiles of sluice as well
#   SLUICE_BIN=/tmp/sluice-old PERF_DOC=0 scripts/bench.sh   # another build of the server, same mock and client
#
# Results: a table on stdout, every raw report and target/bench/results.json, from which
# the results section of docs/performance.md is rewritten (PERF_DOC=0: left alone).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

SERVER_CPU=${SERVER_CPU:-0}              # core of sluice
LOAD_CPU=${LOAD_CPU:-1}                  # core of the mock and the load client
OVERHEAD_SECS=${OVERHEAD_SECS:-12}       # measured seconds, direct and sluice rounds together
THROUGHPUT_SECS=${THROUGHPUT_SECS:-8}
JSON_SECS=${JSON_SECS:-6}
ROUND_SECS=${ROUND_SECS:-1}              # length of one direct or sluice round
HOLD_STREAMS=${HOLD_STREAMS:-5000}
HOLD_H2_STREAMS=${HOLD_H2_STREAMS:-15000}
HOLD_SECS=${HOLD_SECS:-30}
HOLD_H2_SECS=${HOLD_H2_SECS:-15}
HOLD_TOKEN_MS=${HOLD_TOKEN_MS:-20}
HOLD_H2_TOKEN_MS=${HOLD_H2_TOKEN_MS:-500}   # 15,000 x 20 ms is 750k tokens/s: see docs/performance.md
RAMP_PER_SEC=${RAMP_PER_SEC:-3000}
QUIET_WAIT=${QUIET_WAIT:-0}              # seconds to wait, per scenario, for a quiet machine
QUIET_BUSY=${QUIET_BUSY:-10}             # ... where quiet is: no core busier than this (%)
FANOUT_SUBSCRIBERS=${FANOUT_SUBSCRIBERS:-1000}
FANOUT_TOKENS=${FANOUT_TOKENS:-100}      # tokens per reply (fan-out)
FANOUT_TOKEN_MS=${FANOUT_TOKEN_MS:-20}
FANOUT_GENERATIONS=${FANOUT_GENERATIONS:-5}
FANOUT_INSTANCES=${FANOUT_INSTANCES:-3}  # fanout-cluster: instances sharing Redis and PostgreSQL
REDIS_URL_BENCH=${REDIS_URL_BENCH:-redis://127.0.0.1:6379}
PG_URL_BENCH=${PG_URL_BENCH:-postgres://postgres@127.0.0.1:5432}
MICRO=${MICRO:-0}                        # 1: also run the criterion benches (a longer build)
PERF_DOC=${PERF_DOC:-1}                  # 1: write this run's results into docs/performance.md
PROFILE=${PROFILE:-0}                    # 1: perf record sluice in every scenario (see docs/performance.md)
PERF_RECORD=${PERF_RECORD:-"-F 1999 -g"}  # e.g. "-F 499 --call-graph dwarf,16384" for inclusive costs
# fanout-cluster (3 instances sharing Redis and a scratch PostgreSQL database) is not in the
# default list: SCENARIOS=fanout-cluster scripts/bench.sh runs it.
SCENARIOS=${SCENARIOS:-"overhead-c1 overhead-c10 throughput throughput-h2c json hold hold-h2c fanout"}

OUT=$ROOT/target/bench
RUN=$(mktemp -d "${TMPDIR:-/tmp}/sluice-bench.XXXXXX")
T0=$(date +%s)
PIDS=()
BENCH_DB=""                              # a scratch PostgreSQL database, dropped at exit
REDIS_PREFIX=""                          # keys under it are deleted at exit

log() { printf '==> [%3ds] %s\n' "$(($(date +%s) - T0))" "$*" >&2; }

# Stops only the processes this script started, by pid.
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [ -n "$BENCH_DB" ]; then
        psql -q "$PG_URL_BENCH/postgres" -c "DROP DATABASE IF EXISTS $BENCH_DB WITH (FORCE)" \
            >/dev/null 2>&1 || true
    fi
    if [ -n "$REDIS_PREFIX" ]; then
        redis-cli -u "$REDIS_URL_BENCH" --scan --pattern "$REDIS_PREFIX:*" 2>/dev/null |
            xargs -r -n 500 redis-cli -u "$REDIS_URL_BENCH" unlink >/dev/null 2>&1 || true
    fi
    rm -rf "$RUN"
}
trap cleanup EXIT

stop() {
    local pid=$1
    log "stopping $pid"
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# Waits (bounded) for a line matching $2 in file $1 and prints the port in it.
port_from() {
    local file=$1 pattern=$2
    for _ in $(seq 1 150); do
        if grep -qE "$pattern" "$file" 2>/dev/null; then
            grep -oE "$pattern" "$file" | head -n 1 | grep -oE '[0-9]+$'
            return 0
        fi
        sleep 0.1
    done
    echo "no '$pattern' in $file:" >&2
    cat "$file" >&2
    return 1
}

# Nothing from the caller's environment reaches sluice: no keys, no database, no .env (it
# runs in an empty directory, `env -C`).
UNSET=(-u OPENAI_API_KEY -u OPENAI_BASE_URL -u ANTHROPIC_API_KEY -u ANTHROPIC_BASE_URL
    -u DATABASE_URL -u REDIS_URL -u RUST_LOG -u PORT)
for v in $(env | grep -oE '^SLUICE_[A-Z0-9_]+' || true); do UNSET+=(-u "$v"); done

# start_mock NAME [MOCK ARGS...]
start_mock() {
    local out=$RUN/mock.$1.out name=$1
    shift
    taskset -c "$LOAD_CPU" "$MOCK_BIN" --addr 127.0.0.1:0 "$@" >"$out" 2>"$RUN/mock.$name.err" &
    MOCK_PID=$!
    PIDS+=("$MOCK_PID")
    MOCK_PORT=$(port_from "$out" 'listening on http://127\.0\.0\.1:[0-9]+')
    MOCK_URL=http://127.0.0.1:$MOCK_PORT/v1/chat/completions
}

# start_sluice NAME HTTP2 [VAR=VALUE...]: the extra settings go to sluice's environment.
start_sluice() {
    local name=$1 http2=$2 dir=$RUN/sluice.$1
    shift 2
    mkdir -p "$dir"
    cat >"$dir/sluice.toml" <<EOF
[[providers]]
name = "mock"
kind = "openai"
base_url = "http://127.0.0.1:$MOCK_PORT/v1"
http2 = $http2
EOF
    # The guards (rate limits, stream and provider concurrency caps) are opened wide: this
    # measures the relay, and one local client is all the load there is. env and taskset
    # exec, so `$!` is sluice's own pid.
    env "${UNSET[@]}" -C "$dir" SLUICE_CONFIG="$dir/sluice.toml" SLUICE_DATA_DIR="$dir/data" \
        SLUICE_ADDR=127.0.0.1:0 SLUICE_DRAIN_SECS=2 \
        SLUICE_RATE_CHAT_PER_MIN=0 SLUICE_RATE_API_PER_MIN=0 SLUICE_MAX_STREAMS=1000000 \
        SLUICE_MAX_STREAMS_PER_KEY=1000000 SLUICE_PROVIDER_CONCURRENCY=1000000 \
        SLUICE_RATE_ADMIN_PER_MIN=0 SLUICE_QUOTA_RPM=0 SLUICE_QUOTA_TPM=0 \
        SLUICE_DEFAULT_MODEL=mock "$@" \
        taskset -c "$SERVER_CPU" "$BIN" serve >"$dir/log" 2>&1 &
    SLUICE_PID=$!
    PIDS+=("$SLUICE_PID")
    SLUICE_PORT=$(port_from "$dir/log" 'listening on http://127\.0\.0\.1:[0-9]+')
    SLUICE_BASE=http://127.0.0.1:$SLUICE_PORT
    SLUICE_URL=$SLUICE_BASE/v1/chat/completions
    for _ in $(seq 1 50); do
        curl -fsS "http://127.0.0.1:$SLUICE_PORT/health" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "sluice did not become ready" >&2
    cat "$dir/log" >&2
    return 1
}

# Waits (at most QUIET_WAIT seconds) until no core is busier than QUIET_BUSY percent, then
# notes how busy the cores were: the figures are only as good as the machine was quiet.
core_busy() {
    python3 - <<'EOF'
import time
def read():
    out = []
    for l in open("/proc/stat"):
        if l.startswith("cpu") and l[3].isdigit():
            v = [int(x) for x in l.split()[1:9]]
            out.append((sum(v) - v[3] - v[4], sum(v)))
    return out
a = read(); time.sleep(1); b = read()
print(max(round(100 * (y[0] - x[0]) / max(1, y[1] - x[1])) for x, y in zip(a, b)),
      " ".join(f"{round(100 * (y[0] - x[0]) / max(1, y[1] - x[1]))}%" for x, y in zip(a, b)))
EOF
}

quiet() {
    local waited=0 busy
    NOISE=""
    [ "$QUIET_WAIT" -gt 0 ] || return 0
    while :; do
        busy=$(core_busy)
        if [ "$waited" -ge "$QUIET_WAIT" ] || [ "${busy%% *}" -le "$QUIET_BUSY" ]; then
            break
        fi
        waited=$((waited + 1))
    done
    NOISE="cores busy just before: ${busy#* }; rustc processes: $(pgrep -cx rustc || true)"
}

# With PROFILE=1, perf samples sluice (every pid in PROFILE_PIDS) while the load client
# runs: NAME.perf.data, and NAME.perf.txt with the hottest symbols (self time).
PROFILE_PIDS=""
perf_start() {
    PERF_PID=""
    [ "$PROFILE" = 1 ] && [ -n "$PROFILE_PIDS" ] || return 0
    # shellcheck disable=SC2086 # PERF_RECORD is a list of options
    taskset -c "$LOAD_CPU" perf record -q $PERF_RECORD -p "$PROFILE_PIDS" -o "$OUT/$1.perf.data" \
        >/dev/null 2>&1 &
    PERF_PID=$!
    PIDS+=("$PERF_PID")
}
perf_stop() {
    [ -n "$PERF_PID" ] || return 0
    kill -INT "$PERF_PID" 2>/dev/null || true
    wait "$PERF_PID" 2>/dev/null || true
    perf report -i "$OUT/$1.perf.data" --no-children --sort dso,symbol --stdio 2>/dev/null |
        grep -v '^$' | head -n 150 >"$OUT/$1.perf.txt" || true
}

# bench NAME ARGS...: one load-client run; its report is saved as NAME.json, or, when it
# alternated with a baseline, as NAME-direct.json and NAME-sluice.json.
bench() {
    local name=$1
    shift
    log "$name"
    perf_start "$name"
    taskset -c "$LOAD_CPU" "$LOAD_BIN" --label "$name" "$@" >"$OUT/$name.tmp"
    perf_stop "$name"
    python3 - "$OUT" "$name" "$NOISE" <<'EOF'
import json, os, sys
out, name, noise = sys.argv[1:4]
d = json.load(open(f"{out}/{name}.tmp"))
os.remove(f"{out}/{name}.tmp")
base = d.pop("baseline", None)
for side, rep in (("direct", base), ("sluice" if base else None, d)):
    if rep is None:
        continue
    rep["noise"] = noise
    rep["label"] = d.get("label")
    json.dump(rep, open(f"{out}/{name}{'-' + side if side else ''}.json", "w"), indent=1)
EOF
}

# pair NAME HTTP2 ARGS...: a fresh mock and a fresh sluice in front of it; the load client
# alternates between the two in short rounds, so both see the same machine.
pair() {
    local name=$1 http2=$2
    shift 2
    quiet
    start_mock "$name"
    start_sluice "$name" "$http2"
    PROFILE_PIDS=$SLUICE_PID
    bench "$name" --url "$SLUICE_URL" --baseline-url "$MOCK_URL" --round-secs "$ROUND_SECS" \
        --watch "sluice=$SLUICE_PID" --watch "mock=$MOCK_PID" "$@"
    stop "$SLUICE_PID"
    stop "$MOCK_PID"
}

# hold NAME HTTP2 ARGS...: long streams cannot alternate, so the baseline runs first, then
# the same load through a sluice that was idle until then.
hold() {
    local name=$1 http2=$2
    shift 2
    quiet
    start_mock "$name"
    start_sluice "$name" "$http2"
    PROFILE_PIDS=""
    bench "$name-direct" --url "$MOCK_URL" --watch "mock=$MOCK_PID" "$@"
    quiet
    PROFILE_PIDS=$SLUICE_PID
    bench "$name-sluice" --url "$SLUICE_URL" --watch "sluice=$SLUICE_PID" \
        --watch "mock=$MOCK_PID" "$@"
    stop "$SLUICE_PID"
    stop "$MOCK_PID"
}

# fanout NAME INSTANCES: a mock that stamps every token with the time it sent it, and
# INSTANCES sluice instances in front of it; FANOUT_SUBSCRIBERS clients follow one chat
# session, spread over the instances, while replies are started on the first. Several
# instances share Redis (the bus) and a scratch PostgreSQL database (the sessions), as in
# the cluster mode. The baseline is the same tokens read straight from the mock.
fanout() {
    local name=$1 count=$2 i bases="" watch=() pids=() extra=()
    quiet
    start_mock "$name" --stamp --tokens "$FANOUT_TOKENS" --token-ms "$FANOUT_TOKEN_MS"
    if [ "$count" -gt 1 ]; then
        BENCH_DB=sluice_bench_$$_$(date +%s)
        REDIS_PREFIX=sluice-bench-$$-$(date +%s)
        log "creating database $BENCH_DB"
        psql -q "$PG_URL_BENCH/postgres" -c "CREATE DATABASE $BENCH_DB" >/dev/null
        redis-cli -u "$REDIS_URL_BENCH" ping >/dev/null
        extra=(REDIS_URL="$REDIS_URL_BENCH" SLUICE_REDIS_PREFIX="$REDIS_PREFIX"
            DATABASE_URL="$PG_URL_BENCH/$BENCH_DB")
    fi
    # One after the other: the first applies the migrations to the fresh database.
    for i in $(seq 1 "$count"); do
        start_sluice "$name-$i" false "${extra[@]}"
        bases+="${bases:+,}$SLUICE_BASE"
        pids+=("$SLUICE_PID")
        if [ "$count" = 1 ]; then watch+=(--watch "sluice=$SLUICE_PID"); else watch+=(--watch "sluice$i=$SLUICE_PID"); fi
    done
    PROFILE_PIDS=$(IFS=,; echo "${pids[*]}")
    bench "$name" --scenario fanout --instances "$bases" --baseline-url "$MOCK_URL" \
        --subscribers "$FANOUT_SUBSCRIBERS" --generations "$FANOUT_GENERATIONS" \
        --tokens "$FANOUT_TOKENS" --token-ms "$FANOUT_TOKEN_MS" --ramp-per-sec "$RAMP_PER_SEC" \
        "${watch[@]}" --watch "mock=$MOCK_PID"
    for i in "${pids[@]}"; do stop "$i"; done
    stop "$MOCK_PID"
}

log "cargo build --release --workspace"
cargo build --release --workspace --quiet
# SLUICE_BIN: another build of the server, measured against the same mock and load client.
BIN=${SLUICE_BIN:-$ROOT/target/release/sluice}
MOCK_BIN=$ROOT/target/release/sluice-mock
LOAD_BIN=$ROOT/target/release/sluice-load
BUILD_SECS=$(($(date +%s) - T0))
rm -rf "$OUT"
mkdir -p "$OUT"

want() { [[ " $SCENARIOS " == *" $1 "* ]]; }

want overhead-c1 && pair overhead-c1 false --scenario stream --concurrency 1 --tokens 64 --stamp \
    --first-token-ms 50 --token-ms 5 --warmup-secs 1 --duration-secs "$OVERHEAD_SECS"
want overhead-c10 && pair overhead-c10 false --scenario stream --concurrency 10 --tokens 64 --stamp \
    --first-token-ms 50 --token-ms 5 --warmup-secs 1 --duration-secs "$OVERHEAD_SECS"
want throughput && pair throughput false --scenario stream --concurrency 50 --tokens 64 \
    --warmup-secs 1 --duration-secs "$THROUGHPUT_SECS"
want throughput-h2c && pair throughput-h2c true --scenario stream --concurrency 50 --tokens 64 \
    --warmup-secs 1 --duration-secs "$THROUGHPUT_SECS"
want json && pair json false --scenario json --concurrency 50 --tokens 64 \
    --warmup-secs 1 --duration-secs "$JSON_SECS"
want hold && hold hold false --scenario hold --streams "$HOLD_STREAMS" --token-ms "$HOLD_TOKEN_MS" \
    --hold-secs "$HOLD_SECS" --ramp-per-sec "$RAMP_PER_SEC"
want hold-h2c && hold hold-h2c true --scenario hold --streams "$HOLD_H2_STREAMS" --token-ms "$HOLD_H2_TOKEN_MS" \
    --hold-secs "$HOLD_H2_SECS" --ramp-per-sec "$RAMP_PER_SEC"

want fanout && fanout fanout 1
want fanout-cluster && fanout fanout-cluster "$FANOUT_INSTANCES"

if [ "$MICRO" = 1 ]; then
    log "cargo bench --bench relay --bench hub --bench alloc"
    cargo bench --quiet --bench relay --bench hub -- --warm-up-time 1 --measurement-time 3 \
        >"$OUT/micro.txt" 2>&1
    cargo bench --quiet --bench alloc >>"$OUT/micro.txt" 2>&1
fi

python3 - "$OUT" "$BUILD_SECS" "$(($(date +%s) - T0))" "$SERVER_CPU" "$LOAD_CPU" "$T0" <<'EOF'
import glob, json, os, platform, subprocess, sys, time

out, build_s, total_s, server_cpu, load_cpu = sys.argv[1:6]
R = {os.path.basename(p)[:-5]: json.load(open(p)) for p in glob.glob(f"{out}/*.json")
     if not p.endswith(("results.json", "alloc.json"))}

def get(name, *path):
    v = R.get(name)
    for k in path:
        if not isinstance(v, dict):
            return None
        v = v.get(k)
    return v

def num(v, fmt="{:.3f}"):
    return "n/a" if v is None else fmt.format(v)

rows, targets, noise_rows = [], [], []

def row(scenario, metric, direct, sluice, delta, target="", ok=None):
    verdict = "" if ok is None else ("met" if ok else "MISSED")
    rows.append((scenario, metric, direct, sluice, delta, target, verdict))
    if ok is not None:
        targets.append({"scenario": scenario, "metric": metric, "target": target, "met": ok,
                        "direct": direct, "sluice": sluice, "delta": delta})

def diff(a, b):
    return None if a is None or b is None else b - a

def check(v, limit):
    return None if v is None else v <= limit

# The mock releases tokens on its timer's millisecond ticks, so a time to first token
# measured from the request carries up to a millisecond of tick phase that differs between
# the two paths. The stamped rows time the same path exactly: request to the mock, plus
# the first token's way back (the mock's own 50 ms wait left out); the targets are judged
# on them.
for c in ("1", "10"):
    n = f"overhead-c{c}"
    if f"{n}-direct" not in R:
        continue
    for what, key in (("time to first token", "ttft_ms"),
                      ("time to first token without the mock's wait, stamped", "first_token_path_ms"),
                      ("  of which request to the mock", "to_mock_ms"),
                      ("token from the mock to the client, stamped", "from_mock_ms"),
                      ("gap between tokens", "gap_ms")):
        for q in ("p50", "p99"):
            d, s = get(f"{n}-direct", key, q), get(f"{n}-sluice", key, q)
            added = diff(d, s)
            target, ok = "", None
            if c == "10" and key == "first_token_path_ms":
                limit = 0.3 if q == "p50" else 1.0
                target, ok = f"added <= {limit} ms", check(added, limit)
            if c == "10" and key == "gap_ms" and q == "p99":
                target, ok = "added <= 0.5 ms", check(added, 0.5)
            row(f"overhead c={c}", f"{what} {q} (ms)", num(d), num(s),
                num(added, "{:+.3f}"), target, ok)
    for side in ("direct", "sluice"):
        f = get(f"{n}-{side}", "failed")
        if f:
            row(f"overhead c={c}", f"failed replies ({side})", "", num(f, "{}"), "")

for n, label in (("throughput", "throughput c=50"), ("throughput-h2c", "throughput c=50, h2c upstream")):
    if f"{n}-direct" not in R:
        continue
    d, s = get(f"{n}-direct", "replies_per_s"), get(f"{n}-sluice", "replies_per_s")
    ratio = None if not d or s is None else s / d
    row(label, "streams/s", num(d, "{:.0f}"), num(s, "{:.0f}"),
        num(ratio, "x{:.2f}"), ">= x0.80", None if ratio is None else ratio >= 0.8)
    d, s = get(f"{n}-direct", "tokens_per_s"), get(f"{n}-sluice", "tokens_per_s")
    row(label, "tokens/s", num(d, "{:.0f}"), num(s, "{:.0f}"),
        num(None if not d or s is None else s / d, "x{:.2f}"))
    row(label, "sluice CPU (% of its core)", "",
        num(get(f"{n}-sluice", "procs", "sluice", "cpu_pct"), "{:.0f}"), "")
    for side in ("direct", "sluice"):
        mock = get(f"{n}-{side}", "procs", "mock", "cpu_pct")
        client = get(f"{n}-{side}", "procs", "client", "cpu_pct")
        row(label, f"mock + client CPU, {side} (% of their core)", "",
            num(None if mock is None or client is None else mock + client, "{:.0f}"), "")
        f = get(f"{n}-{side}", "failed")
        if f:
            row(label, f"failed replies ({side})", "", num(f, "{}"), "")

for n, label in (("hold", "hold"), ("hold-h2c", "hold, h2c upstream")):
    if f"{n}-direct" not in R:
        continue
    streams = get(f"{n}-sluice", "streams")
    tms = get(f"{n}-sluice", "token_ms")
    scen = f"{label} {streams} x {tms} ms"
    dh, sh = get(f"{n}-direct", "healthy"), get(f"{n}-sluice", "healthy")
    row(scen, "healthy streams", num(dh, "{}"), num(sh, "{}"), "",
        f"all {streams}", None if sh is None else sh == streams)
    for key, metric in (("slow", "slow streams (a silence > 1 s)"), ("failed", "failed streams")):
        row(scen, metric, num(get(f"{n}-direct", key), "{}"), num(get(f"{n}-sluice", key), "{}"), "")
    d, s = get(f"{n}-direct", "gap_ms", "p99"), get(f"{n}-sluice", "gap_ms", "p99")
    limit = 1.5 * tms if tms else None
    row(scen, "gap p99 (ms)", num(d), num(s), num(diff(d, s), "{:+.3f}"),
        f"<= {limit:g} ms" if limit else "", check(s, limit) if limit else None)
    per = get(f"{n}-sluice", "procs", "sluice", "rss_per_stream_kib")
    row(scen, "sluice RSS per stream (KiB)", "", num(per, "{:.1f}"), "",
        "<= 24 KiB", check(per, 24.0))
    row(scen, "sluice CPU (% of its core)", "",
        num(get(f"{n}-sluice", "procs", "sluice", "cpu_pct"), "{:.0f}"), "")
    for side in ("direct", "sluice"):
        mock = get(f"{n}-{side}", "procs", "mock", "cpu_pct")
        client = get(f"{n}-{side}", "procs", "client", "cpu_pct")
        row(scen, f"mock + client CPU, {side} (%)", "",
            num(None if mock is None or client is None else mock + client, "{:.0f}"), "")
    row(scen, "seconds to open all streams", num(get(f"{n}-direct", "open_s"), "{:.1f}"),
        num(get(f"{n}-sluice", "open_s"), "{:.1f}"), "")

def sluice_cpu(name):
    procs = get(name, "procs") or {}
    vals = [v.get("cpu_pct") for k, v in procs.items() if k.startswith("sluice") and v]
    return None if not vals or None in vals else sum(vals)

for n in ("fanout", "fanout-cluster"):
    if f"{n}-sluice" not in R:
        continue
    k = len(get(f"{n}-sluice", "instances") or [])
    subs = get(f"{n}-sluice", "subscribers")
    scen = (f"fan-out {subs} subscribers, 1 instance" if k <= 1
            else f"fan-out {subs} subscribers, {k} instances via Redis")
    scen += f", {get(n + '-sluice', 'generations')} x {get(n + '-sluice', 'tokens_per_generation')} tokens every {get(n + '-sluice', 'token_ms')} ms"
    limit = 5.0 if k <= 1 else 10.0
    done = get(f"{n}-sluice", "complete_subscribers")
    row(scen, "subscribers that got every token of every reply", "", num(done, "{}"), "",
        f"all {subs}", None if done is None else done == subs)
    for q in ("p50", "p99"):
        d, s = get(f"{n}-direct", "delay_ms", q), get(f"{n}-sluice", "last_delay_ms", q)
        row(scen, f"delay from the mock to the last subscriber {q} (ms)", num(d), num(s),
            num(diff(d, s), "{:+.3f}"),
            f"<= {limit:g} ms" if q == "p99" else "",
            check(s, limit) if q == "p99" else None)
    for key, what in (("first_delay_ms", "the first subscriber"), ("delay_ms", "any subscriber")):
        for q in ("p50", "p99"):
            d, s = get(f"{n}-direct", "delay_ms", q), get(f"{n}-sluice", key, q)
            row(scen, f"delay from the mock to {what} {q} (ms)", num(d), num(s),
                num(diff(d, s), "{:+.3f}"))
    row(scen, "sluice CPU while replies ran (% of one core)", "",
        num(sluice_cpu(f"{n}-sluice"), "{:.0f}"), "")
    mock = get(f"{n}-sluice", "procs", "mock", "cpu_pct")
    client = get(f"{n}-sluice", "procs", "client", "cpu_pct")
    row(scen, "mock + client CPU while replies ran (% of their core)", "",
        num(None if mock is None or client is None else mock + client, "{:.0f}"), "")
    row(scen, "seconds to open all subscriptions", "", num(get(f"{n}-sluice", "open_s"), "{:.1f}"), "")

# What else ran on the cores: busy share of each core minus what the benchmark's own
# processes used. Large figures mean the run was noisy.
def foreign(name):
    r = R.get(name)
    if not r or "core_busy_pct" not in r:
        return None
    busy = r["core_busy_pct"]
    p = r.get("procs", {})
    use = lambda k: sum((v or {}).get("cpu_pct") or 0 for n, v in p.items()
                        if n == k or (k == "sluice" and n.startswith("sluice")))
    s_core, l_core = int(server_cpu), int(load_cpu)
    if max(s_core, l_core) >= len(busy):
        return None
    return (busy[s_core] - use("sluice"), busy[l_core] - use("mock") - use("client"))
for n in ("overhead-c1", "overhead-c10", "throughput", "throughput-h2c", "json", "hold", "hold-h2c", "fanout",
          "fanout-cluster"):
    d, s = foreign(f"{n}-direct"), foreign(f"{n}-sluice")
    if d or s:
        fmt = lambda v: "n/a" if v is None else f"{max(0, v[0]):.0f}% / {max(0, v[1]):.0f}%"
        noise_rows.append((n, fmt(d), fmt(s)))

n = "json"
if f"{n}-direct" in R:
    d, s = get(f"{n}-direct", "replies_per_s"), get(f"{n}-sluice", "replies_per_s")
    row("non-stream c=50", "completions/s", num(d, "{:.0f}"), num(s, "{:.0f}"),
        num(None if not d or s is None else s / d, "x{:.2f}"))
    for q in ("p50", "p99"):
        d, s = get(f"{n}-direct", "total_ms", q), get(f"{n}-sluice", "total_ms", q)
        row("non-stream c=50", f"latency {q} (ms)", num(d), num(s), num(diff(d, s), "{:+.3f}"))
    row("non-stream c=50", "sluice CPU (% of its core)", "",
        num(get(f"{n}-sluice", "procs", "sluice", "cpu_pct"), "{:.0f}"), "")

micro = {}
if os.path.exists(f"{out}/micro.txt"):
    for est in glob.glob("target/criterion/**/new/estimates.json", recursive=True):
        if os.path.getmtime(est) < float(sys.argv[6]):
            continue  # from an earlier run
        name = os.path.dirname(os.path.dirname(est))[len("target/criterion/"):]
        micro[name] = json.load(open(est))["mean"]["point_estimate"]
for k, ns in sorted(micro.items()):
    row("micro (criterion, mean)", k, "", f"{ns / 1000:.3f} us", "")
allocs = {}
if os.path.exists(f"{out}/alloc.json"):
    allocs = json.load(open(f"{out}/alloc.json"))
    for k, v in allocs.items():
        row("allocation bench", k, "", f"{v:.2f}", "")

noisy = [r[0] for r in noise_rows
         if any(x not in ("n/a",) and any(float(p.rstrip("%")) > 10 for p in x.split(" / "))
                for x in r[1:])]
meta = {
    "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                             if l.startswith("model name")), "?"),
                "pinning": f"sluice on core {server_cpu}; mock and load client on core {load_cpu}"},
    "build_s": int(build_s), "total_s": int(total_s),
    "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip(),
    "noisy": noisy,
}
meta["other_load"] = noise_rows
meta["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(float(sys.argv[6])))
json.dump({"meta": meta, "targets": targets, "micro_ns": micro, "allocs_per_token": allocs,
           "rows": rows, "runs": R},
          open(f"{out}/results.json", "w"), indent=1)

head = ("scenario", "metric", "direct", "sluice", "sluice vs direct", "target", "")
print()
print("| " + " | ".join(head) + " |")
print("|" + "---|" * len(head))
for r in rows:
    print("| " + " | ".join(str(x) for x in r) + " |")
if noise_rows:
    print()
    print("Other load while measuring (busy share of sluice's core / of the load core not used by the benchmark):")
    print()
    print("| scenario | direct run | sluice run |")
    print("|---|---|---|")
    for r in noise_rows:
        print("| " + " | ".join(r) + " |")
print()
print(f"{meta['machine']['cpus']} cores ({meta['machine']['cpu']}), {meta['machine']['pinning']}; "
      f"build {build_s} s, total {total_s} s")
if noisy:
    print(f"noisy: other work took over 10% of a core during: {', '.join(noisy)}")
met = sum(1 for t in targets if t["met"])
print(f"targets met: {met}/{len(targets)}; reports in {out}/")
EOF

if [ "$PERF_DOC" = 1 ]; then
    python3 scripts/perf-doc.py "$OUT/results.json" docs/performance.md
fi
