#!/usr/bin/env bash
# A sluice cluster on loopback, for local use and for the tests: PostgreSQL and Redis
# (started if they are not answering), N sluice instances on consecutive ports, and nginx
# in front running the shipped nginx/sluice.conf with this cluster's ports put in.
#
#   scripts/cluster.sh start                  start what is not running, wait until ready
#   scripts/cluster.sh stop                   stop everything this cluster started
#   scripts/cluster.sh restart                rolling restart of the running instances, one at a time
#   scripts/cluster.sh start-instance PORT    start one instance (if not running), wait ready
#   scripts/cluster.sh stop-instance PORT     drain and stop one instance
#   scripts/cluster.sh status                 what runs, whether it is ready, and whether every
#                                             instance shares one store and bus (exit 1 if not)
#   scripts/cluster.sh nginx-conf DIR         only render nginx.conf + sluice.conf into DIR
#
# Settings (environment):
#   CLUSTER_SIZE=3             instances, on ports CLUSTER_BASE_PORT, +1, ...
#   CLUSTER_BASE_PORT=8001
#   CLUSTER_PORTS="p1 p2"      explicit ports instead of the two above
#   CLUSTER_NGINX_PORT=8000    nginx listens on 127.0.0.1:<this>
#   CLUSTER_DIR=target/cluster pid files, logs, nginx configuration and temp files
#   CLUSTER_READY_SECS=60      how long start waits for every instance to be ready
#   SLUICE_BIN=target/release/sluice   built with `cargo build --release` if missing
#   REDIS_URL, DATABASE_URL    default to the local services (database CLUSTER_DB, created)
#   CLUSTER_DB=sluice          the local database used when DATABASE_URL is not set
# Everything else in the environment (OPENAI_BASE_URL, SLUICE_REDIS_PREFIX, ...) reaches
# the instances as it is. Processes run detached (setsid): start returns once the
# cluster is ready, and stop finds them again by the pid files in CLUSTER_DIR.
#
# What the instances were started with is kept: `start`, when no instance runs, writes
# REDIS_URL, DATABASE_URL and every SLUICE_*, OPENAI_*, ANTHROPIC_* and RUST_* variable to
# CLUSTER_DIR/cluster.env (mode 0600: it holds keys). While any instance runs, `start`,
# `restart` and `start-instance` give instances that file and nothing else of those
# names; the caller's differing values are ignored, with a warning. To change a setting,
# edit cluster.env and `restart`, or `stop` and `start` again.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/lib.sh
. "$root/scripts/lib.sh"

die() { echo "cluster.sh: $*" >&2; exit 1; }
say() { echo "cluster.sh: $*" >&2; }

# Paths given relative to where the script is run from.
absolute() { case $1 in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }

CLUSTER_DIR=$(absolute "${CLUSTER_DIR:-$root/target/cluster}")
CLUSTER_NGINX_PORT=${CLUSTER_NGINX_PORT:-8000}
CLUSTER_READY_SECS=${CLUSTER_READY_SECS:-60}
SLUICE_BIN=$(absolute "${SLUICE_BIN:-$root/target/release/sluice}")
# How long a stopping instance may drain: sluice's window, its 5 s grace, and slack.
stop_secs=$(( ${SLUICE_DRAIN_SECS:-30} + 10 ))

if [ -n "${CLUSTER_PORTS:-}" ]; then
    read -r -a ports <<<"$CLUSTER_PORTS"
else
    base=${CLUSTER_BASE_PORT:-8001}
    ports=()
    for ((i = 0; i < ${CLUSTER_SIZE:-3}; i++)); do ports+=($((base + i))); done
fi
[ "${#ports[@]}" -gt 0 ] || die "no instances: CLUSTER_SIZE or CLUSTER_PORTS is empty"

# --- processes ----------------------------------------------------------------------------

# Alive and not a zombie (an exited child nobody reaped yet still answers kill -0).
alive() {
    local pid=$1 state
    kill -0 "$pid" 2>/dev/null || return 1
    state=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -c1) || return 1
    [ -n "$state" ] && [ "$state" != Z ]
}

# The pid in a pid file, if that process is still alive.
pid_of() {
    local file=$1 pid
    [ -s "$file" ] || return 1
    pid=$(tr -dc '0-9' <"$file")
    [ -n "$pid" ] && alive "$pid" && echo "$pid"
}

# An instance is ours when it runs in its directory of this cluster: a reused pid of an
# unrelated process is never signalled.
instance_pid() {
    local port=$1 pid
    pid=$(pid_of "$CLUSTER_DIR/$port.pid") || return 1
    [ "$(readlink "/proc/$pid/cwd" 2>/dev/null)" = "$CLUSTER_DIR/$port" ] || return 1
    echo "$pid"
}

# Waits until `pid` has exited, at most `secs` seconds; 1 when it is still alive then.
wait_exit() {
    local pid=$1 secs=$2 deadline
    deadline=$(( $(date +%s) + secs ))
    while alive "$pid"; do
        [ "$(date +%s)" -lt "$deadline" ] || return 1
        sleep 0.1
    done
}

ready() { curl -fsS -o /dev/null --max-time 2 "http://127.0.0.1:$1/health/ready"; }

# Polls /health/ready of an instance until it answers 200, the process dies, or the
# deadline passes.
wait_ready() {
    local port=$1 pid=$2 deadline
    deadline=$(( $(date +%s) + CLUSTER_READY_SECS ))
    until ready "$port" 2>/dev/null; do
        if ! alive "$pid"; then
            tail -n 20 "$CLUSTER_DIR/$port.log" >&2 || true
            die "instance $port exited during start (log: $CLUSTER_DIR/$port.log)"
        fi
        if [ "$(date +%s)" -ge "$deadline" ]; then
            tail -n 20 "$CLUSTER_DIR/$port.log" >&2 || true
            die "instance $port not ready after ${CLUSTER_READY_SECS}s (log: $CLUSTER_DIR/$port.log)"
        fi
        sleep 0.1
    done
}

# --- services -----------------------------------------------------------------------------

# Redis and PostgreSQL on this machine, unless the caller points the instances elsewhere.
ensure_services() {
    if [ -z "${REDIS_URL:-}" ]; then
        ensure_redis
        export REDIS_URL=redis://127.0.0.1:6379
    fi
    if [ -z "${DATABASE_URL:-}" ]; then
        ensure_postgres
        local admin=postgres://postgres@127.0.0.1:5432/postgres db=${CLUSTER_DB:-sluice}
        case $db in *[!a-z0-9_]* | "") die "CLUSTER_DB must be lowercase letters, digits and _" ;; esac
        if ! psql "$admin" -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1; then
            psql "$admin" -qc "CREATE DATABASE $db" >/dev/null ||
                die "cannot create database $db; set DATABASE_URL"
        fi
        export DATABASE_URL=postgres://postgres@127.0.0.1:5432/$db
    fi
}

# --- what the instances are given ---------------------------------------------------------

cluster_env="$CLUSTER_DIR/cluster.env"

# Names of the variables an instance reads; SLUICE_BIN is which binary this script runs,
# not a setting of the instance, so a restart can bring a new build.
instance_vars() {
    compgen -e | grep -E '^(REDIS_URL|DATABASE_URL|SLUICE_[A-Z0-9_]*|OPENAI_[A-Z0-9_]*|ANTHROPIC_[A-Z0-9_]*|RUST_[A-Z0-9_]*)$' |
        grep -vx 'SLUICE_BIN' | sort
}

# Writes the environment the instances get, readable by this user only.
save_cluster_env() {
    local name tmp
    tmp=$(mktemp "$CLUSTER_DIR/cluster.env.XXXXXX")
    chmod 600 "$tmp"
    {
        echo "# Written by scripts/cluster.sh start: every instance of this cluster runs with"
        echo "# exactly these (restart and start-instance read them back). Edit, then restart."
        for name in $(instance_vars); do printf 'export %s=%q\n' "$name" "${!name}"; done
    } >"$tmp"
    mv -f "$tmp" "$cluster_env"
}

# Replaces the caller's instance variables with the recorded ones.
load_cluster_env() {
    [ -s "$cluster_env" ] || die "no $cluster_env: this cluster was not started by 'cluster.sh start' (stop it, then start)"
    local name before=() ignored=()
    for name in $(instance_vars); do before+=("$name=${!name}"); done
    for name in $(instance_vars); do unset "$name"; done
    # shellcheck disable=SC1090
    . "$cluster_env"
    local entry
    for entry in "${before[@]}"; do
        name=${entry%%=*}
        if [ "${!name-}" != "${entry#*=}" ] || [ -z "${!name+x}" ]; then ignored+=("$name"); fi
    done
    if [ "${#ignored[@]}" -gt 0 ]; then
        say "ignoring ${ignored[*]} from the environment: instances run with $cluster_env (edit it to change them)"
    fi
}

# Any instance of this cluster directory alive?
any_running() {
    local port
    for port in $( (printf '%s\n' "${ports[@]}"; started_ports) | sort -nu); do
        instance_pid "$port" >/dev/null && return 0
    done
    return 1
}

# The environment for new instances: recorded anew when nothing runs (and services set
# up), else the one the running instances have.
configure_instances() {
    if any_running; then
        load_cluster_env
    else
        ensure_services
        save_cluster_env
    fi
}

ensure_binary() {
    if [ ! -x "$SLUICE_BIN" ]; then
        [ "$SLUICE_BIN" = "$root/target/release/sluice" ] || die "SLUICE_BIN $SLUICE_BIN is not an executable"
        log "building $SLUICE_BIN"
        (cd "$root" && cargo build --release --bin sluice)
    fi
}

# --- instances ----------------------------------------------------------------------------

# Starts one instance detached, in a session of its own, and returns without waiting.
spawn_instance() {
    local port=$1 dir="$CLUSTER_DIR/$1"
    mkdir -p "$dir"
    # `setsid` execs in place (a background job of a script is no process group leader),
    # so $! is the instance itself. Its own directory is its working directory: the
    # embedded store, if ever used, and the identity check of instance_pid.
    (
        cd "$dir"
        export PORT="$port" SLUICE_ADDR="127.0.0.1:$port" SLUICE_SERVER_ID="sluice-$port"
        export SLUICE_TRUSTED_PROXIES="${SLUICE_TRUSTED_PROXIES:-127.0.0.1/32}"
        export SLUICE_DATA_DIR="$dir/data"
        exec setsid "$SLUICE_BIN" serve </dev/null >>"$CLUSTER_DIR/$port.log" 2>&1
    ) &
    echo $! >"$CLUSTER_DIR/$port.pid"
}

start_instance() {
    local port=$1 pid
    if pid=$(instance_pid "$port"); then
        say "instance $port already running (pid $pid)"
        return 0
    fi
    spawn_instance "$port"
    pid=$(cat "$CLUSTER_DIR/$port.pid")
    wait_ready "$port" "$pid"
    say "instance $port ready (pid $pid)"
}

stop_instance() {
    local port=$1 pid
    if ! pid=$(instance_pid "$port"); then
        rm -f "$CLUSTER_DIR/$port.pid"
        return 0
    fi
    # SIGTERM drains: readiness fails at once, running streams get SLUICE_DRAIN_SECS.
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_exit "$pid" "$stop_secs"; then
        say "instance $port still running after ${stop_secs}s: killing it"
        kill -KILL "$pid" 2>/dev/null || true
        wait_exit "$pid" 10 || die "instance $port (pid $pid) survived SIGKILL"
    fi
    rm -f "$CLUSTER_DIR/$port.pid"
    say "instance $port stopped"
}

# Ports of the instances this cluster directory has pid files for, in order.
started_ports() {
    local f
    for f in "$CLUSTER_DIR"/*.pid; do
        [ -e "$f" ] || continue
        f=$(basename "$f" .pid)
        case $f in *[!0-9]*) continue ;; esac
        echo "$f"
    done | sort -n
}

# --- nginx --------------------------------------------------------------------------------

# Whether this machine has IPv6 loopback (::1 on lo), for nginx's `listen [::1]:PORT`.
have_ipv6_loopback() {
    grep -qs '^00000000000000000000000000000001 .* lo$' /proc/net/if_inet6
}

# The shipped nginx/sluice.conf with this cluster's instances in both upstreams and
# nginx's own port in `listen`; nothing else changes, so what runs here is what ships.
render_sluice_conf() {
    local out=$1
    local listen6=""
    have_ipv6_loopback && listen6="[::1]:$CLUSTER_NGINX_PORT"
    awk -v ports="${ports[*]}" -v listen="127.0.0.1:$CLUSTER_NGINX_PORT" -v listen6="$listen6" '
        /^[[:space:]]*upstream[[:space:]]/ { in_upstream = 1; written = 0 }
        in_upstream && /^[[:space:]]*server[[:space:]]+127\.0\.0\.1:[0-9]+/ {
            if (!written) {
                match($0, /^[[:space:]]*/); indent = substr($0, 1, RLENGTH)
                rest = $0; sub(/^[[:space:]]*server[[:space:]]+[^[:space:];]+/, "", rest)
                n = split(ports, p, " ")
                for (i = 1; i <= n; i++) print indent "server 127.0.0.1:" p[i] rest
                written = 1
            }
            next
        }
        in_upstream && /^[[:space:]]*}/ { in_upstream = 0 }
        /^[[:space:]]*listen[[:space:]]+80;/ { sub(/80;/, listen ";") }
        /^[[:space:]]*listen[[:space:]]+\[::\]:80;/ {
            if (listen6 == "") next
            sub(/\[::\]:80;/, listen6 ";")
        }
        { print }
    ' "$root/nginx/sluice.conf" >"$out"
    # The shipped file changed shape: better to fail than to test something else.
    local servers listens listens6 want6=0
    servers=$(grep -c '^[[:space:]]*server[[:space:]]\+127\.0\.0\.1:' "$out" || true)
    listens=$(grep -c "listen 127.0.0.1:$CLUSTER_NGINX_PORT;" "$out" || true)
    listens6=$(grep -c "listen \[::1\]:$CLUSTER_NGINX_PORT;" "$out" || true)
    [ -n "$listen6" ] && want6=1
    if [ "$servers" != $(( 2 * ${#ports[@]} )) ] || [ "$listens" != 1 ] || [ "$listens6" != "$want6" ] ||
        grep -q '^[[:space:]]*listen[[:space:]]\+\(80\|\[::\]:80\);' "$out"; then
        die "nginx/sluice.conf: expected two upstreams of 127.0.0.1 servers, 'listen 80;' and 'listen [::]:80;'"
    fi
}

# A top-level nginx.conf around it, everything under `dir`, for nginx run by this user.
render_nginx_conf() {
    local dir=$1
    mkdir -p "$dir/temp"
    render_sluice_conf "$dir/sluice.conf"
    local user_line=""
    # As root, workers would drop to `nobody`, who cannot write the temp paths here.
    [ "$(id -u)" = 0 ] && user_line="user root;"
    cat >"$dir/nginx.conf" <<EOF
# Generated by scripts/cluster.sh: a local nginx around nginx/sluice.conf.
$user_line
worker_processes 2;
worker_rlimit_nofile 16384;
pid $dir/nginx.pid;
error_log $dir/nginx.error.log warn;

events {
    worker_connections 4096;
}

http {
    default_type application/octet-stream;
    # Which instance served each request, for debugging a cluster or a test.
    log_format sluice '\$remote_addr [\$time_local] "\$request" \$status \$body_bytes_sent '
                      '\$request_time upstream=\$upstream_addr session="\$sluice_session" '
                      'limit_key="\$sluice_rate_key"';
    access_log $dir/nginx.access.log sluice;
    client_body_temp_path $dir/temp/body;
    proxy_temp_path $dir/temp/proxy;
    fastcgi_temp_path $dir/temp/fastcgi;
    uwsgi_temp_path $dir/temp/uwsgi;
    scgi_temp_path $dir/temp/scgi;
    # As Debian's nginx.conf has it, so the streams' "gzip off" is what keeps them whole.
    gzip on;
    gzip_types application/json text/event-stream;

    include $dir/sluice.conf;
}
EOF
}

nginx_cmd() {
    local bin
    bin=$(nginx_bin) || die "nginx is not installed (apt-get install nginx)"
    "$bin" -p "$CLUSTER_DIR/" -e "$CLUSTER_DIR/nginx.error.log" -c "$CLUSTER_DIR/nginx.conf" "$@"
}

nginx_pid() {
    local pid
    pid=$(pid_of "$CLUSTER_DIR/nginx.pid") || return 1
    grep -qF "$CLUSTER_DIR/nginx.conf" "/proc/$pid/cmdline" 2>/dev/null || return 1
    echo "$pid"
}

# Workers of the running nginx that are not shutting down (after a reload, old workers
# finish their requests under the title "worker process is shutting down").
nginx_workers() {
    local master=$1 p
    for p in /proc/[0-9]*; do
        [ "$(awk '{print $4}' "$p/stat" 2>/dev/null)" = "$master" ] || continue
        tr -d '\0' <"$p/cmdline" 2>/dev/null | grep -q 'worker process$' && echo "${p#/proc/}"
    done
}

# Marks instance `port` `down` (or `up` again) in the running nginx's configuration and
# reloads it; returns once no worker of the previous configuration takes new requests.
nginx_mark() {
    local port=$1 state=$2 master old p deadline conf="$CLUSTER_DIR/sluice.conf"
    master=$(nginx_pid) || return 0
    old=$(nginx_workers "$master")
    if [ "$state" = down ]; then
        sed -i "s/^\([[:space:]]*server 127\.0\.0\.1:$port [^;]*\);/\1 down;/" "$conf"
    else
        sed -i "s/^\([[:space:]]*server 127\.0\.0\.1:$port [^;]*\) down;/\1;/" "$conf"
    fi
    nginx_cmd -t -q || die "nginx -t failed on $CLUSTER_DIR/nginx.conf"
    nginx_cmd -s reload
    deadline=$(( $(date +%s) + CLUSTER_READY_SECS ))
    for p in $old; do
        while tr -d '\0' <"/proc/$p/cmdline" 2>/dev/null | grep -q 'worker process$'; do
            [ "$(date +%s)" -lt "$deadline" ] || die "nginx did not reload (log: $CLUSTER_DIR/nginx.error.log)"
            sleep 0.05
        done
    done
}

start_nginx() {
    ensure_nginx
    render_nginx_conf "$CLUSTER_DIR"
    nginx_cmd -t -q || die "nginx -t failed on $CLUSTER_DIR/nginx.conf"
    if nginx_pid >/dev/null; then
        nginx_cmd -s reload
    else
        # nginx daemonizes itself (a session of its own) and writes nginx.pid.
        nginx_cmd </dev/null >>"$CLUSTER_DIR/nginx.error.log" 2>&1
    fi
    local deadline=$(( $(date +%s) + CLUSTER_READY_SECS ))
    until curl -fsS -o /dev/null --max-time 2 "http://127.0.0.1:$CLUSTER_NGINX_PORT/health/ready"; do
        [ "$(date +%s)" -lt "$deadline" ] || die "nginx on $CLUSTER_NGINX_PORT does not answer (log: $CLUSTER_DIR/nginx.error.log)"
        sleep 0.1
    done
}

# The session of a process: nginx's master leads a session of its own (it daemonizes
# with setsid), and its workers are in it.
session_of() {
    local rest state ppid pgrp sid
    rest=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null) || return 1
    # After the command: state ppid pgrp session ...
    read -r state ppid pgrp sid _ <<<"$rest"
    : "$state" "$ppid" "$pgrp"
    echo "$sid"
}

session_members() {
    local sid=$1 dir pid
    for dir in /proc/[0-9]*; do
        pid=${dir#/proc/}
        if [ "$(session_of "$pid" 2>/dev/null)" = "$sid" ]; then echo "$pid"; fi
    done
}

stop_nginx() {
    local pid sid p
    # The master's pid is also its session's id, which its workers keep after it dies.
    sid=$(tr -dc '0-9' <"$CLUSTER_DIR/nginx.pid" 2>/dev/null || true)
    if pid=$(nginx_pid); then
        # quit: finish the requests in flight; streams are ending anyway.
        nginx_cmd -s quit 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
        if ! wait_exit "$pid" 15; then
            kill -TERM "$pid" 2>/dev/null || true
            wait_exit "$pid" 5 || kill -KILL "$pid" 2>/dev/null || true
        fi
        say "nginx stopped"
    fi
    # Workers outlive a master killed without them (kill -9); none may stay behind.
    if [ -n "$sid" ]; then
        for p in $(session_members "$sid"); do
            if alive "$p" && [ "$(cat "/proc/$p/comm" 2>/dev/null)" = nginx ]; then
                kill -KILL "$p" 2>/dev/null || true
            fi
        done
    fi
    rm -f "$CLUSTER_DIR/nginx.pid"
}

# --- commands -----------------------------------------------------------------------------

cmd_start() {
    mkdir -p "$CLUSTER_DIR"
    configure_instances
    ensure_binary
    local port pid
    # All spawned first, then waited for: they migrate and connect in parallel.
    for port in "${ports[@]}"; do
        instance_pid "$port" >/dev/null || spawn_instance "$port"
    done
    for port in "${ports[@]}"; do
        pid=$(cat "$CLUSTER_DIR/$port.pid")
        wait_ready "$port" "$pid"
    done
    start_nginx
    echo "sluice cluster ready: http://127.0.0.1:$CLUSTER_NGINX_PORT (nginx) -> instances ${ports[*]}"
    for port in "${ports[@]}"; do
        echo "  instance $port: pid $(cat "$CLUSTER_DIR/$port.pid"), log $CLUSTER_DIR/$port.log"
    done
    echo "  nginx: pid $(nginx_pid), logs $CLUSTER_DIR/nginx.*.log"
}

cmd_stop() {
    local port pids=()
    # Instances first, while nginx still carries their streams: draining, they tell each
    # stream's client to reconnect and end it, so nginx then quits at once. nginx first
    # would wait on those streams and its clients would get a bare EOF.
    # Every instance drains at once: stopping them one after another would take up to
    # N drain windows.
    for port in $(started_ports); do
        stop_instance "$port" &
        pids+=($!)
    done
    local failed=0
    for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
    stop_nginx
    [ "$failed" = 0 ] || die "some instances did not stop"
}

# The rolling restart: one instance at a time, each ready again before the next goes
# down, with the same environment as `start` gave them. nginx stops sending to the
# instance (`down`, reload) before it drains: a request nginx had just written into an
# idle keep-alive connection that the draining instance closes is lost, and a POST is
# never resent (502). nginx marks no instance failed (max_fails=0), so the one just back
# takes requests at once and nginx always has N-1 instances.
cmd_restart() {
    local port pid list
    list=$(started_ports)
    [ -n "$list" ] || die "no instances running in $CLUSTER_DIR; use start"
    load_cluster_env
    ensure_binary
    for port in $list; do
        nginx_mark "$port" down
        stop_instance "$port"
        spawn_instance "$port"
        pid=$(cat "$CLUSTER_DIR/$port.pid")
        wait_ready "$port" "$pid"
        nginx_mark "$port" up
        say "instance $port restarted (pid $pid)"
    done
}

# Where an instance keeps its shared state, from its /health/ready.
shared_of() {
    curl -sS --max-time 3 "http://127.0.0.1:$1/health/ready" 2>/dev/null |
        grep -o '"shared":{[^}]*}' | sed 's/^"shared"://'
}

cmd_status() {
    local port pid state=0 shared
    declare -A where=()
    declare -A count=()
    # The configured instances, and any other this directory has started.
    for port in $( (printf '%s\n' "${ports[@]}"; started_ports) | sort -nu); do
        if pid=$(instance_pid "$port"); then
            if ready "$port" 2>/dev/null; then
                echo "instance $port: pid $pid, ready"
            else
                echo "instance $port: pid $pid, not ready"; state=1
            fi
            if shared=$(shared_of "$port") && [ -n "$shared" ]; then
                where[$port]=$shared
                count[$shared]=$(( ${count[$shared]:-0} + 1 ))
            fi
        else
            echo "instance $port: not running"; state=1
        fi
    done
    # Instances that do not share one store and bus are not one cluster: each serves its
    # own sessions and streams. The most common pair is taken as the cluster's.
    if [ "${#count[@]}" -gt 1 ]; then
        local best="" n=0 s
        for s in "${!count[@]}"; do
            if [ "${count[$s]}" -gt "$n" ]; then best=$s; n=${count[$s]}; fi
        done
        echo "shared by $n instance(s): $best"
        for port in $(printf '%s\n' "${!where[@]}" | sort -n); do
            [ "${where[$port]}" = "$best" ] && continue
            echo "instance $port: DIFFERS from its peers: ${where[$port]}"
        done
        state=1
    elif [ "${#count[@]}" = 1 ]; then
        echo "shared: ${!count[*]}"
    fi
    if pid=$(nginx_pid); then
        echo "nginx $CLUSTER_NGINX_PORT: pid $pid"
    else
        echo "nginx: not running"; state=1
    fi
    return "$state"
}

case ${1:-} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    restart) cmd_restart ;;
    status) cmd_status ;;
    start-instance)
        [ -n "${2:-}" ] || die "usage: $0 start-instance PORT"
        mkdir -p "$CLUSTER_DIR"
        load_cluster_env
        ensure_binary
        start_instance "$2"
        ;;
    stop-instance)
        [ -n "${2:-}" ] || die "usage: $0 stop-instance PORT"
        stop_instance "$2"
        ;;
    nginx-conf)
        [ -n "${2:-}" ] || die "usage: $0 nginx-conf DIR"
        dir=$(absolute "$2")
        render_nginx_conf "$dir"
        echo "$dir/nginx.conf"
        ;;
    *)
        sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
        exit 2
        ;;
esac
