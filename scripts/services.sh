#!/usr/bin/env bash
# scripts/services.sh — make sure the services that duet's tests talk to are
# installed and running on this (Debian) machine, without systemd:
#   PostgreSQL on 127.0.0.1:5432, trust auth, databases `test` and `postgres`
#   Redis      on 127.0.0.1:6379
# Idempotent: when both already answer it does nothing and exits 0 at once.
# Options:
#   --nginx      also make sure the nginx binary is installed (it is not started)
#   --chromium   also make sure chromium and chromium-driver are installed
# Used by scripts/test.sh (and so by .ci/run); safe to run by hand any time.
set -euo pipefail

PG_HOST=127.0.0.1
PG_PORT=5432
REDIS_HOST=127.0.0.1
REDIS_PORT=6379
WAIT_S=30

want_nginx=0
want_chromium=0
for arg in "$@"; do
    case "$arg" in
        --nginx) want_nginx=1 ;;
        --chromium) want_chromium=1 ;;
        -h | --help)
            sed -n '2,10s/^# \{0,1\}//p' "$0"
            exit 0
            ;;
        *)
            echo "services.sh: unknown option '$arg' (try --help)" >&2
            exit 2
            ;;
    esac
done

say() { echo "services.sh: $*"; }
die() {
    echo "services.sh: ERROR: $*" >&2
    exit 1
}

# Root runs commands as they are; anyone else goes through sudo.
if [ "$(id -u)" -eq 0 ]; then
    AS_ROOT=()
else
    command -v sudo >/dev/null 2>&1 || die "not root and sudo is missing: cannot install or start services"
    AS_ROOT=(sudo)
fi

# Run a command as the postgres OS user (for peer auth over the local socket).
# From / so that psql does not complain about a cwd it may not enter.
as_postgres() {
    (
        cd /
        if [ "$(id -u)" -eq 0 ]; then
            if command -v runuser >/dev/null 2>&1; then
                runuser -u postgres -- "$@"
            else
                su postgres -s /bin/sh -c "$(printf '%q ' "$@")"
            fi
        else
            sudo -u postgres -- "$@"
        fi
    )
}

pg_up() {
    command -v pg_isready >/dev/null 2>&1 && pg_isready -q -h "$PG_HOST" -p "$PG_PORT" >/dev/null 2>&1
}

redis_up() {
    command -v redis-cli >/dev/null 2>&1 &&
        [ "$(redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null)" = "PONG" ]
}

# ---------------------------------------------------------------- apt helpers
apt_updated=0
apt_install() {
    command -v apt-get >/dev/null 2>&1 ||
        die "apt-get not found: install $* by hand (this script knows Debian/Ubuntu only)"
    if [ "$apt_updated" -eq 0 ]; then
        say "apt-get update"
        "${AS_ROOT[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq ||
            die "apt-get update failed"
        apt_updated=1
    fi
    say "installing: $*"
    local log
    log="$(mktemp)"
    if ! "${AS_ROOT[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "$@" >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        rm -f "$log"
        die "apt-get install $* failed (last lines above)"
    fi
    rm -f "$log"
}

# Install packages while keeping their maintainer scripts from starting the
# service (the standard policy-rc.d trick), for things we only want on disk.
apt_install_no_start() {
    local policy=/usr/sbin/policy-rc.d made=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | "${AS_ROOT[@]}" tee "$policy" >/dev/null
        "${AS_ROOT[@]}" chmod 755 "$policy"
        made=1
        trap '"${AS_ROOT[@]}" rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt_install "$@"
    if [ "$made" -eq 1 ]; then
        "${AS_ROOT[@]}" rm -f "$policy"
        trap - EXIT
    fi
}

# ------------------------------------------------------------------ optional
ensure_optional() {
    if [ "$want_nginx" -eq 1 ]; then
        if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then
            :
        else
            apt_install_no_start nginx
        fi
    fi
    if [ "$want_chromium" -eq 1 ]; then
        local missing=()
        { command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; } || missing+=(chromium)
        { command -v chromedriver >/dev/null 2>&1 || [ -x /usr/bin/chromedriver ]; } || missing+=(chromium-driver)
        if [ "${#missing[@]}" -gt 0 ]; then
            apt_install "${missing[@]}"
        fi
    fi
}

# ---------------------------------------------------------------- PostgreSQL
pg_sql() { # pg_sql SQL — run as superuser: TCP trust first, else local socket as postgres
    if psql -X -q -v ON_ERROR_STOP=1 -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres -Atc "$1" 2>/dev/null; then
        return 0
    fi
    as_postgres psql -X -q -v ON_ERROR_STOP=1 -p "$PG_PORT" -d postgres -Atc "$1"
}

ensure_databases() {
    local db exists
    for db in postgres test; do
        exists="$(pg_sql "SELECT 1 FROM pg_database WHERE datname = '$db'" 2>/dev/null || true)"
        if [ "$exists" != "1" ]; then
            say "creating database '$db'"
            pg_sql "CREATE DATABASE \"$db\"" || die "could not create database '$db'"
        fi
    done
}

pg_version() { # newest PostgreSQL major with a server binary, e.g. 15
    local d best=""
    for d in /usr/lib/postgresql/*/bin/postgres; do
        [ -x "$d" ] || continue
        d="${d#/usr/lib/postgresql/}"
        d="${d%%/*}"
        if [ -z "$best" ] || [ "$d" -gt "$best" ] 2>/dev/null; then best="$d"; fi
    done
    printf '%s' "$best"
}

hba_has_trust() { # pg_hba.conf is readable by postgres/root only
    "${AS_ROOT[@]}" grep -qE '^[[:space:]]*host[[:space:]]+all[[:space:]]+all[[:space:]]+127\.0\.0\.1/32[[:space:]]+trust' "$1"
}

# Put trust rules for local connections at the top of pg_hba.conf (first match
# wins). Only done for a cluster this script installed or created: an existing
# cluster's authentication is the owner's business.
pg_trust_local() {
    local hba="$1" tmp
    if hba_has_trust "$hba"; then return 0; fi
    say "allowing trust connections from 127.0.0.1 and ::1 in $hba"
    tmp="$(mktemp)"
    {
        echo "# added by duet scripts/services.sh: local test server, trust on loopback"
        echo "local   all   all                 trust"
        echo "host    all   all   127.0.0.1/32  trust"
        echo "host    all   all   ::1/128       trust"
        "${AS_ROOT[@]}" cat "$hba"
    } >"$tmp"
    # Writing through tee keeps the file's owner and mode.
    "${AS_ROOT[@]}" tee "$hba" <"$tmp" >/dev/null
    rm -f "$tmp"
}

ensure_postgres() {
    local fresh=0 ver hba
    if ! compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || ! command -v pg_isready >/dev/null 2>&1; then
        apt_install postgresql postgresql-client
        fresh=1
    fi
    # The package may have started it already (on a machine with an init system).
    if pg_up; then
        [ "$fresh" -eq 0 ] || pg_fresh_setup
        return 0
    fi

    if command -v pg_ctlcluster >/dev/null 2>&1; then
        ver="$(pg_version)"
        [ -n "$ver" ] || die "no PostgreSQL server binary under /usr/lib/postgresql"
        if [ ! -f "/etc/postgresql/$ver/main/postgresql.conf" ]; then
            say "creating cluster $ver/main"
            "${AS_ROOT[@]}" pg_createcluster --port "$PG_PORT" "$ver" main >/dev/null ||
                die "pg_createcluster $ver main failed"
            fresh=1
        fi
        hba="/etc/postgresql/$ver/main/pg_hba.conf"
        if [ "$fresh" -eq 1 ]; then
            pg_trust_local "$hba"
        elif ! hba_has_trust "$hba"; then
            say "note: $hba has no trust rule for 127.0.0.1; tests may need a password in DUET_TEST_DATABASE_URL"
        fi
        # /var/run is often a fresh tmpfs: the socket directory may be gone.
        "${AS_ROOT[@]}" install -d -o postgres -g postgres -m 2775 /var/run/postgresql
        say "starting PostgreSQL $ver/main"
        "${AS_ROOT[@]}" pg_ctlcluster --skip-systemctl-redirect "$ver" main start ||
            say "pg_ctlcluster start returned non-zero (checking whether it answers anyway)"
    elif command -v pg_ctl >/dev/null 2>&1 && [ -n "${PGDATA:-}" ]; then
        say "starting PostgreSQL with pg_ctl -D $PGDATA"
        pg_ctl -D "$PGDATA" -l "$PGDATA/server.log" -o "-p $PG_PORT -h $PG_HOST" start ||
            say "pg_ctl start returned non-zero (checking whether it answers anyway)"
    else
        die "PostgreSQL is not running and neither pg_ctlcluster nor pg_ctl with \$PGDATA is available to start it"
    fi

    wait_for "PostgreSQL on $PG_HOST:$PG_PORT" pg_up || {
        ls /var/log/postgresql/*.log >/dev/null 2>&1 &&
            "${AS_ROOT[@]}" sh -c 'tail -n 20 /var/log/postgresql/*.log' >&2
        die "PostgreSQL did not answer on $PG_HOST:$PG_PORT within ${WAIT_S}s (see the log above)"
    }
    [ "$fresh" -eq 0 ] || pg_fresh_setup
}

# A freshly installed server whose package started it with the stock
# pg_hba.conf: add trust and reload.
pg_fresh_setup() {
    local ver hba
    ver="$(pg_version)"
    hba="/etc/postgresql/$ver/main/pg_hba.conf"
    if [ -f "$hba" ] && ! hba_has_trust "$hba"; then
        pg_trust_local "$hba"
        as_postgres psql -X -q -p "$PG_PORT" -d postgres -c 'SELECT pg_reload_conf()' >/dev/null ||
            die "could not reload PostgreSQL after editing $hba"
    fi
}

# --------------------------------------------------------------------- Redis
start_redis() {
    "${AS_ROOT[@]}" redis-server --daemonize yes --bind "$@" --port "$REDIS_PORT" \
        --save "" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
}

ensure_redis() {
    if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
        apt_install redis-server redis-tools
        # The package may have started its own server (on a machine with an init system).
        if redis_up; then return 0; fi
    fi
    "${AS_ROOT[@]}" install -d /var/lib/redis /var/log/redis
    say "starting Redis on $REDIS_HOST:$REDIS_PORT"
    # "-::1" binds IPv6 loopback only if it exists (Redis >= 7); older Redis
    # does not know the "-" prefix, so retry with IPv4 alone.
    start_redis 127.0.0.1 -::1 || start_redis 127.0.0.1 ||
        say "redis-server returned non-zero (checking whether it answers anyway)"
    wait_for "Redis on $REDIS_HOST:$REDIS_PORT" redis_up || {
        [ -f /var/log/redis/ci.log ] && "${AS_ROOT[@]}" tail -n 20 /var/log/redis/ci.log >&2
        die "Redis did not answer PONG on $REDIS_HOST:$REDIS_PORT within ${WAIT_S}s (see the log above)"
    }
}

wait_for() { # wait_for WHAT CHECK-COMMAND...
    local what="$1" i
    shift
    for ((i = 0; i < WAIT_S * 2; i++)); do
        if "$@"; then
            say "$what is up"
            return 0
        fi
        sleep 0.5
    done
    return 1
}

# ---------------------------------------------------------------------- main
if pg_up && redis_up; then
    # Fast path: both answer. Only make sure the test database exists (one
    # quick query; silent when it does).
    # A server we cannot log into this way is left alone.
    if command -v psql >/dev/null 2>&1 &&
        exists="$(psql -X -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres -Atc \
            "SELECT 1 FROM pg_database WHERE datname = 'test'" 2>/dev/null)" &&
        [ "$exists" != "1" ]; then
        ensure_databases
    fi
    ensure_optional
    exit 0
fi

pg_up || ensure_postgres
ensure_databases
redis_up || ensure_redis
ensure_optional
say "PostgreSQL on $PG_HOST:$PG_PORT and Redis on $REDIS_HOST:$REDIS_PORT are ready"
