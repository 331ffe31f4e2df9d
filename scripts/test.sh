#!/usr/bin/env bash
# Run the test suite twice, on SQLite and on a throwaway PostgreSQL, the way CI does.
#
#   scripts/test.sh [pytest args...]     e.g. scripts/test.sh -x tests/test_models.py
#   DB=sqlite scripts/test.sh            only SQLite
#   DB=postgres scripts/test.sh          only PostgreSQL
#
# Needs python3.11 (or python3) and PostgreSQL's server binaries; as root on Debian it
# installs PostgreSQL with apt-get when they are missing. The server lives in a temp dir,
# listens on 127.0.0.1 only, runs as an unprivileged user and is removed on exit. Run as root, the
# server runs as `nobody` (postgres refuses root): no user is created, so several runs at once are
# safe and nothing is left behind. (Earlier versions created a system user `spntest` and left it;
# remove it with `userdel spntest` once no older test.sh, bench or soak run is using it.)
#
# Packages come from requirements-dev.lock, every file checked against its hash (scripts/lock.sh).
set -euo pipefail

cd "$(dirname "$0")/.."

DB=${DB:-all}
DB_NAME=spn_test
PG_OS_USER=nobody

die() {
    echo "test.sh: $*" >&2
    exit 1
}

apt_install() {
    echo "test.sh: installing $* with apt-get" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

make_venv() {
    local python
    python=$(command -v python3.11 || command -v python3) || die "python3.11 (or python3) is required"
    "$python" -m venv .venv && return
    rm -rf .venv
    # Debian ships the venv module separately
    [[ $EUID -eq 0 ]] || die "could not create .venv; install python3-venv"
    apt_install python3-venv
    "$python" -m venv .venv
}

find_pg_bin() {
    local dir
    if command -v pg_ctl >/dev/null && command -v initdb >/dev/null && command -v postgres >/dev/null; then
        dirname "$(readlink -f "$(command -v pg_ctl)")"
        return
    fi
    for dir in $(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V -r); do
        if [[ -x $dir/pg_ctl && -x $dir/initdb && -x $dir/postgres ]]; then
            echo "$dir"
            return
        fi
    done
    return 1
}

# Run a PostgreSQL server command as the unprivileged owner of the data dir.
as_pg() {
    if [[ $EUID -eq 0 ]]; then
        (cd "$PG_DIR" && runuser -u "$PG_OS_USER" -- "$@")
    else
        "$@"
    fi
}

# shellcheck disable=SC2317  # called from the EXIT trap
stop_postgres() {
    [[ -n ${PG_DIR:-} && -d $PG_DIR ]] || return 0
    if [[ -f $PG_DIR/data/postmaster.pid ]]; then
        local pid
        pid=$(head -n 1 "$PG_DIR/data/postmaster.pid")
        as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m immediate -w stop >/dev/null 2>&1 || true
        # pg_ctl can fail on a half-started server; never leave a postgres behind
        if kill -0 "$pid" 2>/dev/null; then
            kill -9 "$pid" 2>/dev/null || true
        fi
    fi
    rm -rf "$PG_DIR"
}

start_postgres() {
    if ! PG_BIN=$(find_pg_bin); then
        [[ $EUID -eq 0 ]] || die "PostgreSQL server binaries (pg_ctl, initdb, postgres) not found;" \
            "install postgresql-15 (apt-get install postgresql-15), or run DB=sqlite $0"
        apt_install postgresql-15 || apt_install postgresql
        PG_BIN=$(find_pg_bin) || die "PostgreSQL is still missing after apt-get install"
    fi

    PG_DIR=$(mktemp -d /tmp/spn-test-pg.XXXXXX)
    if [[ $EUID -eq 0 ]]; then
        chown "$PG_OS_USER" "$PG_DIR"  # postgres refuses to run as root
    fi
    chmod 700 "$PG_DIR"

    PG_PORT=$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    as_pg "$PG_BIN/initdb" -D "$PG_DIR/data" -A trust -U postgres -E UTF8 --no-locale --no-sync \
        >"$PG_DIR/initdb.log" 2>&1 || { cat "$PG_DIR/initdb.log" >&2; die "initdb failed"; }
    # fsync and friends off: the data is thrown away, durability only costs time
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -c unix_socket_directories=$PG_DIR -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
        start >/dev/null || { cat "$PG_DIR/server.log" >&2; die "PostgreSQL did not start"; }
    "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U postgres "$DB_NAME"
    echo "test.sh: PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PG_PORT as $(stat -c %U "$PG_DIR/data")"
}

# PgBouncer in transaction mode in front of the test server, as Neon's pooled endpoint is: the
# several-process tests run through it too (TEST_PGBOUNCER_URL). It runs as the server's owner.
# shellcheck disable=SC2317  # called from the EXIT trap
stop_pgbouncer() {
    [[ -n ${PGB_DIR:-} && -f $PGB_DIR/pgbouncer.pid ]] || return 0
    kill "$(cat "$PGB_DIR/pgbouncer.pid")" 2>/dev/null || true
}

start_pgbouncer() {
    if ! command -v pgbouncer >/dev/null; then
        if [[ $EUID -ne 0 ]]; then
            echo "test.sh: pgbouncer not found; the tests through it are skipped (apt-get install pgbouncer)" >&2
            return 0
        fi
        apt_install pgbouncer
    fi
    PGB_DIR=$PG_DIR/pgbouncer
    mkdir -p "$PGB_DIR"
    PGB_PORT=$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    echo '"postgres" ""' >"$PGB_DIR/users.txt"
    printf '%s\n' "[databases]" "$DB_NAME = host=127.0.0.1 port=$PG_PORT dbname=$DB_NAME" "[pgbouncer]" \
        "listen_addr = 127.0.0.1" "listen_port = $PGB_PORT" "unix_socket_dir =" "auth_type = trust" \
        "auth_file = $PGB_DIR/users.txt" "pool_mode = transaction" "max_client_conn = 1000" \
        "default_pool_size = 20" "logfile = $PGB_DIR/pgbouncer.log" "pidfile = $PGB_DIR/pgbouncer.pid" \
        >"$PGB_DIR/pgbouncer.ini"
    if [[ $EUID -eq 0 ]]; then
        chown -R "$(stat -c %U "$PG_DIR/data")" "$PGB_DIR"
    fi
    as_pg pgbouncer -d -q "$PGB_DIR/pgbouncer.ini" || { cat "$PGB_DIR/pgbouncer.log" >&2; die "PgBouncer did not start"; }
    PGBOUNCER_URL="postgresql://postgres@127.0.0.1:$PGB_PORT/$DB_NAME"
    echo "test.sh: PgBouncer (transaction mode) on 127.0.0.1:$PGB_PORT"
}

# The subscription page is tested in a real browser; its QR code is read back with zbar.
install_browser() {
    command -v chromium >/dev/null && command -v chromedriver >/dev/null && command -v zbarimg >/dev/null && return
    [[ $EUID -eq 0 ]] || die "Chromium, chromedriver and zbarimg are needed: apt-get install chromium chromium-driver zbar-tools"
    apt_install chromium chromium-driver zbar-tools
}

case $DB in
    all | sqlite | postgres) ;;
    *) die "DB must be sqlite or postgres (or unset for both), not '$DB'" ;;
esac

trap 'stop_pgbouncer; stop_postgres' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

[[ -x .venv/bin/python ]] || make_venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check --require-hashes -r requirements-dev.lock
install_browser

PGBOUNCER_URL=
if [[ $DB != sqlite ]]; then
    start_postgres
    start_pgbouncer
fi

summary=()
failed=0

run_suite() {
    local name=$1
    shift
    echo "== tests on $name =="
    if "$@"; then
        summary+=("$name: passed")
    else
        summary+=("$name: FAILED (pytest exit $?)")
        failed=1
    fi
}

if [[ $DB != postgres ]]; then
    run_suite SQLite env -u TEST_DATABASE_URL .venv/bin/python -m pytest "$@"
fi
if [[ $DB != sqlite ]]; then
    run_suite PostgreSQL env TEST_DATABASE_URL="postgresql://postgres@127.0.0.1:$PG_PORT/$DB_NAME" \
        TEST_PGBOUNCER_URL="$PGBOUNCER_URL" \
        .venv/bin/python -m pytest "$@"
fi

echo "== summary =="
printf '%s\n' "${summary[@]}"
exit $failed
