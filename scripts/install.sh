#!/usr/bin/env bash
# Installs a sluice cluster on a Debian host: the binary, the systemd units (one instance
# per port, see systemd/), the settings file and the nginx configuration, then starts it.
# Safe to run again: unchanged files are left alone and the settings file is never
# overwritten.
#
#   scripts/install.sh              install and start (as root)
#   scripts/install.sh --dry-run    print what it would do, change nothing
#   scripts/install.sh --no-start   install the files only: no nginx -t, no systemctl
#
#   DESTDIR=/tmp/root scripts/install.sh   install under another root (packaging, tests);
#                                          implies --no-start, the live system is not touched
#   SLUICE_BIN=path                        the binary (default target/release/sluice, built
#                                          with `cargo build --release` if missing)
#
# What goes where:
#   /usr/local/bin/sluice
#   /etc/systemd/system/sluice@.service, sluice.target
#   /etc/sluice/sluice.env                from .env.example, once; set DATABASE_URL and
#                                         REDIS_URL there for a cluster
#   /etc/nginx/conf.d/sluice.conf         from nginx/sluice.conf; an edited copy is kept
#                                         and the new one written beside it as .dist
#   /usr/local/share/doc/sluice/README.md, operations.md
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)

dry_run=0
start=1
for arg in "$@"; do
    case $arg in
        --dry-run) dry_run=1 ;;
        --no-start) start=0 ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *) echo "install.sh: unknown argument $arg (see --help)" >&2; exit 2 ;;
    esac
done

DESTDIR=${DESTDIR:-}
DESTDIR=${DESTDIR%/}
if [ -n "$DESTDIR" ]; then start=0; fi
SLUICE_BIN=${SLUICE_BIN:-$root/target/release/sluice}

say() { echo "install.sh: $*"; }

# Runs a command, or only prints it in a dry run.
run() {
    if [ "$dry_run" = 1 ]; then
        echo "would run: $*"
    else
        "$@"
    fi
}

if [ "$dry_run" = 0 ] && [ -z "$DESTDIR" ] && [ "$(id -u)" != 0 ]; then
    echo "install.sh: run as root (or with --dry-run, or DESTDIR=...)" >&2
    exit 1
fi

# Copies `src` to `$DESTDIR$dest` with `mode`, unless the same content is already there.
put() {
    local src=$1 dest=$DESTDIR$2 mode=$3
    if [ -f "$dest" ] && cmp -s "$src" "$dest"; then
        say "unchanged $dest"
        return 0
    fi
    if [ "$dry_run" = 1 ]; then
        echo "would install: $src -> $dest (mode $mode)"
        return 0
    fi
    install -D -m "$mode" "$src" "$dest"
    say "installed $dest"
}

# --- binary ---------------------------------------------------------------------------------
if [ ! -x "$SLUICE_BIN" ]; then
    if [ "$SLUICE_BIN" != "$root/target/release/sluice" ]; then
        echo "install.sh: SLUICE_BIN $SLUICE_BIN is not an executable" >&2
        exit 1
    fi
    run sh -c "cd '$root' && cargo build --release --bin sluice"
fi
bin_before=$({ cksum <"$DESTDIR/usr/local/bin/sluice"; } 2>/dev/null || true)
put "$SLUICE_BIN" /usr/local/bin/sluice 0755
bin_after=$({ cksum <"$DESTDIR/usr/local/bin/sluice"; } 2>/dev/null || true)

# --- systemd units --------------------------------------------------------------------------
put "$root/systemd/sluice@.service" /etc/systemd/system/sluice@.service 0644
put "$root/systemd/sluice.target" /etc/systemd/system/sluice.target 0644
put "$root/README.md" /usr/local/share/doc/sluice/README.md 0644
put "$root/docs/operations.md" /usr/local/share/doc/sluice/operations.md 0644

# --- settings -------------------------------------------------------------------------------
# Created once from .env.example, with what differs behind nginx: keys required (every
# request reaches sluice from loopback, which `auto` would let in without one), nginx as
# the trusted proxy, one WebSocket token secret shared by all instances, JSON logs for the
# journal. Readable by root only: it will hold provider keys and database passwords.
env_file=$DESTDIR/etc/sluice/sluice.env
if [ -e "$env_file" ]; then
    say "kept $env_file"
    # The unit requires keys; a kept file may still turn them off for every request
    # through nginx (all of which come from loopback, the local admin under `auto`).
    auth=$(sed -n 's/^[[:space:]]*\(export[[:space:]]\+\)\?SLUICE_AUTH=["'"'"']\?\([A-Za-z]*\).*/\2/p' "$env_file" | tail -n 1)
    case ${auth,,} in
        off | auto)
            say "WARNING: $env_file sets SLUICE_AUTH=$auth: behind nginx every request comes from"
            say "WARNING: loopback and is let in without a key (as the local admin). Remove the line"
            say "WARNING: (the unit sets SLUICE_AUTH=required) unless that is what you want."
            ;;
    esac
elif [ "$dry_run" = 1 ]; then
    echo "would create: $env_file from .env.example (SLUICE_AUTH=required, a new SLUICE_WS_TOKEN_SECRET)"
else
    secret=$(od -An -tx1 -N24 /dev/urandom | tr -d ' \n')
    tmp=$(mktemp)
    sed -e 's/^SLUICE_AUTH=.*/SLUICE_AUTH=required/' \
        -e 's/^SLUICE_LOG_FORMAT=.*/SLUICE_LOG_FORMAT=json/' \
        -e 's|^# SLUICE_TRUSTED_PROXIES=.*|SLUICE_TRUSTED_PROXIES=127.0.0.1/32|' \
        -e "s/^# SLUICE_WS_TOKEN_SECRET=.*/SLUICE_WS_TOKEN_SECRET=$secret/" \
        "$root/.env.example" >"$tmp"
    cat >>"$tmp" <<'EOF'

# --- Cluster (scripts/install.sh) ------------------------------------------------------
# Every instance of sluice.target reads this file. Without these two, each instance keeps
# an embedded store of its own and the instances cannot share sessions or streams:
# DATABASE_URL=postgres://sluice:secret@127.0.0.1:5432/sluice
# REDIS_URL=redis://127.0.0.1:6379
EOF
    install -D -m 0600 "$tmp" "$env_file"
    rm -f "$tmp"
    say "created $env_file"
fi

# --- nginx ----------------------------------------------------------------------------------
nginx_conf=$DESTDIR/etc/nginx/conf.d/sluice.conf
if [ -f "$nginx_conf" ] && ! cmp -s "$root/nginx/sluice.conf" "$nginx_conf"; then
    # Edited here (instances added, TLS): the operator's copy stays in force.
    put "$root/nginx/sluice.conf" /etc/nginx/conf.d/sluice.conf.dist 0644
    say "kept the edited $nginx_conf; the shipped version is beside it as sluice.conf.dist"
else
    put "$root/nginx/sluice.conf" /etc/nginx/conf.d/sluice.conf 0644
fi
# Debian's stock site also serves port 80 as the default server and would shadow
# sluice's; the site file stays in sites-available (re-enable with a symlink).
default_site=$DESTDIR/etc/nginx/sites-enabled/default
if [ -L "$default_site" ]; then
    run rm -f "$default_site"
    [ "$dry_run" = 1 ] || say "disabled Debian's default nginx site ($default_site)"
fi

# --- start ----------------------------------------------------------------------------------
if [ "$start" = 0 ]; then
    if [ "$dry_run" = 1 ]; then
        say "dry run: nothing was changed"
    else
        say "files installed${DESTDIR:+ under $DESTDIR}; not starting anything (--no-start or DESTDIR)"
    fi
    exit 0
fi
if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
    run apt-get update -qq
    run env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx
fi
run nginx -t
run systemctl daemon-reload
run systemctl enable --now sluice.target
run systemctl enable --now nginx
run systemctl reload nginx
if [ "$bin_before" != "$bin_after" ] && [ -n "$bin_before" ]; then
    say "the binary changed: running instances keep the old one until restarted;"
    say "restart them one at a time, each out of nginx meanwhile: docs/operations.md, \"Rolling restarts\""
fi
if [ "$dry_run" = 1 ]; then
    say "dry run: nothing was changed"
    exit 0
fi
if ! grep -qs '^DATABASE_URL=' "$env_file" || ! grep -qs '^REDIS_URL=' "$env_file"; then
    say "note: set DATABASE_URL and REDIS_URL in $env_file for a cluster, then: systemctl restart sluice.target"
fi
say "done: sluice behind nginx on port 80"
