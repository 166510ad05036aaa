#!/usr/bin/env bash
# A throw-away PostgreSQL cluster for the server's PostgreSQL tests (and bench/), on 127.0.0.1 only.
#
#   tests/pg_cluster.sh start DIR   # prints the URL to export as JOBSYNCD_TEST_PG_URL
#   tests/pg_cluster.sh stop DIR    # stops it; DIR can then be removed
#
# initdb refuses to run as root, so as root the cluster runs as the `postgres` system user (made
# with useradd when missing). The binaries come from /usr/lib/postgresql/*/bin (the newest), or
# PG_BINDIR; `apt-get install postgresql` provides them. DIR's parents must be enterable by that
# user (e.g. a directory under /tmp, not under a 0700 one). The cluster is for tests: fsync is off.
set -euo pipefail

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
action=$1
dir=$2

bindir=${PG_BINDIR:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)}
if [ -z "$bindir" ] || [ ! -x "$bindir/initdb" ]; then
    echo "$0: no PostgreSQL binaries (apt-get install postgresql, or set PG_BINDIR)" >&2
    exit 1
fi

as_owner() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

case "$action" in
start)
    if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
        useradd --system --no-create-home --shell /usr/sbin/nologin postgres
    fi
    mkdir -p "$dir"
    [ "$(id -u)" = 0 ] && chown postgres "$dir"
    chmod 700 "$dir"
    if ! as_owner test -x "$dir"; then
        echo "$0: the cluster's user cannot reach $dir: pick a DIR whose parents it can enter" >&2
        exit 1
    fi
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    as_owner "$bindir/initdb" -D "$dir/data" -U jobsyncd --auth=trust -E UTF8 --no-locale \
        >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; exit 1; }
    as_owner "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off -c max_connections=400 -c dynamic_shared_memory_type=mmap" \
        start >/dev/null || { cat "$dir/server.log" >&2; exit 1; }
    as_owner "$bindir/createdb" -h 127.0.0.1 -p "$port" -U jobsyncd jobsyncd
    echo "$port" >"$dir/port"
    echo "postgresql://jobsyncd@127.0.0.1:$port/jobsyncd"
    ;;
stop)
    if [ -d "$dir/data" ]; then
        as_owner "$bindir/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    ;;
*)
    usage
    ;;
esac
