#!/usr/bin/env bash
# scripts/bench.sh — duet's own benchmark with duet-loadgen (BENCHMARKS.md).
#
#   scripts/bench.sh [sqlite|postgres ...]      default: sqlite postgres
#
# For each backend: a fresh duet (release build) in a scratch folder with a
# fresh database, DUET_RATE_LIMITS=off, loopback only. Runs:
#   idle   N=${IDLE_N:-10000} waiting customers: server RSS per customer (0: skip)
#   relay  ${PAIRS:-200} pairs x 10 msg/s for ${SECS:-30} s: latency, CPU per message
#   probe  ${PAIRS:-200} pairs x 50 msg/s (10,000 msg/s offered)
# RATES (default "10 50") picks the relay rates per pair, e.g. RATES=10 for A/B runs.
# and appends one JSON line per run to ${OUT:-bench-results.jsonl}.
# Stops exactly the processes it started.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
BACKENDS=("${@:-sqlite postgres}")
[ $# -eq 0 ] && BACKENDS=(sqlite postgres)
IDLE_N=${IDLE_N:-10000}
PAIRS=${PAIRS:-200}
SECS=${SECS:-30}
OUT=${OUT:-$ROOT/bench-results.jsonl}
PG_SERVER=${PG_SERVER:-postgres://postgres@127.0.0.1:5432}
PORT=${PORT:-18180}
read -r -a RATES <<<"${RATES:-10 50}"

cargo build --release -p duet -p duet-loadgen >/dev/null
# DUET_BIN: another duet build to measure (e.g. a baseline), same load generator.
DUET=${DUET_BIN:-$ROOT/target/release/duet}
LG=$ROOT/target/release/duet-loadgen
LABEL=${LABEL:-duet}
STARTED=()
SCRATCH=()
cleanup() {
    for pid in "${STARTED[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${STARTED[@]}"; do wait "$pid" 2>/dev/null || true; done
    for d in "${SCRATCH[@]}"; do rm -rf "$d"; done
}
trap cleanup EXIT

start_duet() { # backend -> sets DUET_PID, DB_URL, DIR
    DIR=$(mktemp -d /tmp/duet-bench.XXXXXX)
    SCRATCH+=("$DIR")
    if [ "$1" = postgres ]; then
        local name="duet_bench_$$_$RANDOM"
        psql "$PG_SERVER/postgres" -qc "CREATE DATABASE $name" >/dev/null
        DB_URL="$PG_SERVER/$name"
        PG_DBS+=("$name")
    else
        DB_URL="$DIR/duet.db"
    fi
    (cd "$DIR" && exec env -i PATH="$PATH" DUET_BIND=127.0.0.1:$PORT DATABASE_URL="$DB_URL" DUET_RATE_LIMITS=off \
        "$DUET" >"$DIR/out.log" 2>"$DIR/err.log") &
    DUET_PID=$!
    STARTED+=("$DUET_PID")
    for _ in $(seq 1 100); do curl -fsS "http://127.0.0.1:$PORT/health" >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "duet did not start: $(cat "$DIR/err.log")" >&2
    exit 1
}
stop_duet() {
    kill -TERM "$DUET_PID" 2>/dev/null || true
    wait "$DUET_PID" 2>/dev/null || true
}
tokens() { # n -> file
    local f="$DIR/tokens.txt"
    for i in $(seq 1 "$1"); do
        env -i PATH="$PATH" DATABASE_URL="$DB_URL" "$DUET" admin add "lg-$i" --name "loadgen $i" >/dev/null 2>&1
        env -i PATH="$PATH" DATABASE_URL="$DB_URL" "$DUET" admin token "lg-$i"
    done >"$f"
    echo "$f"
}
db_pids() { if [ "$1" = postgres ]; then echo "--db-pids auto-postgres"; fi; }

PG_DBS=()
for backend in "${BACKENDS[@]}"; do
    if [ "$IDLE_N" -gt 0 ]; then
        echo "== $backend: idle $IDLE_N"
        start_duet "$backend"
        "$LG" idle --url "http://127.0.0.1:$PORT" --n "$IDLE_N" --hold 10 --pids "$DUET_PID" --label "$LABEL-$backend" --out "$OUT" >/dev/null
        stop_duet
    fi
    for rate in "${RATES[@]}"; do
        echo "== $backend: relay $PAIRS pairs x $rate msg/s"
        start_duet "$backend"
        tf=$(tokens "$PAIRS")
        # shellcheck disable=SC2046
        "$LG" relay --url "http://127.0.0.1:$PORT" --tokens-file "$tf" --pairs "$PAIRS" --rate "$rate" --seconds "$SECS" \
            --pids "$DUET_PID" $(db_pids "$backend") --label "$LABEL-$backend-$rate" --out "$OUT" >/dev/null
        stop_duet
    done
done
for name in "${PG_DBS[@]}"; do psql "$PG_SERVER/postgres" -qc "DROP DATABASE IF EXISTS $name" >/dev/null 2>&1 || true; done
echo "results appended to $OUT"
