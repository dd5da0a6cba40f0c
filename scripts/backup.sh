#!/usr/bin/env bash
# scripts/backup.sh — back up duet's database and keep the newest N backups.
#   DATABASE_URL       postgres://… (pg_dump --format=custom) or a SQLite file
#                      path (online backup API); default ./data/duet.db, as duet
#   DUET_BACKUP_DIR    where backups go (default ./backups)
#   DUET_BACKUP_KEEP   how many backups to keep (default 14); older are deleted
# Writes duet-YYYYmmddTHHMMSSZ.dump (PostgreSQL) or .sqlite3 (SQLite).
# Restore: docs/runbook.md ("Backups and restore"). Safe while duet runs.
set -euo pipefail
umask 077 # backups hold user data: readable by the owner only

url="${DATABASE_URL:-./data/duet.db}"
dir="${DUET_BACKUP_DIR:-./backups}"
keep="${DUET_BACKUP_KEEP:-14}"

say() { echo "backup.sh: $*"; }
die() {
    echo "backup.sh: ERROR: $*" >&2
    exit 1
}

case "$keep" in
    '' | *[!0-9]*) die "DUET_BACKUP_KEEP must be a whole number >= 1 (got '$keep')" ;;
esac
[ "$keep" -ge 1 ] || die "DUET_BACKUP_KEEP must be at least 1 (got '$keep')"

# The URL without its password, for messages.
redact() { sed -E 's#^([a-z]+://[^:/@]*):[^@]*@#\1:***@#' <<<"$1"; }

case "$url" in
    postgres://* | postgresql://*)
        kind=postgres
        ext=dump
        command -v pg_dump >/dev/null 2>&1 ||
            die "pg_dump not found (Debian: apt-get install postgresql-client; its major version must be >= the server's)"
        ;;
    *)
        kind=sqlite
        ext=sqlite3
        path="${url#sqlite://}"
        path="${path#sqlite:}"
        path="${path#file:}"
        [ -f "$path" ] || die "SQLite database '$path' not found (DATABASE_URL)"
        ;;
esac

mkdir -p "$dir"
stamp="$(date -u +%Y%m%dT%H%M%SZ)"
out="$dir/duet-$stamp.$ext"
# Two runs within one second: wait for the next name rather than overwrite.
while [ -e "$out" ]; do
    sleep 1
    stamp="$(date -u +%Y%m%dT%H%M%SZ)"
    out="$dir/duet-$stamp.$ext"
done
# Written under a temporary name and renamed when complete, so that a failed
# run never leaves a half backup that retention would count.
tmp="$dir/.duet-$stamp.$ext.partial"
trap 'rm -f "$tmp"' EXIT

if [ "$kind" = postgres ]; then
    say "pg_dump $(redact "$url") -> $out"
    pg_dump --format=custom --file="$tmp" --dbname="$url" ||
        die "pg_dump failed; no backup written"
else
    say "SQLite online backup $path -> $out"
    if command -v sqlite3 >/dev/null 2>&1; then
        # .backup takes a quoted file name that cannot escape a quote: run it
        # in the backup dir with the (quote-free) bare name instead.
        abs="$(cd "$(dirname "$path")" && pwd)/$(basename "$path")"
        (cd "$dir" && sqlite3 "$abs" ".backup '$(basename "$tmp")'") ||
            die "sqlite3 .backup failed; no backup written"
    elif command -v python3 >/dev/null 2>&1; then
        python3 - "$path" "$tmp" <<'PY' || die "python3 sqlite3 backup failed; no backup written"
import sqlite3, sys
src = sqlite3.connect(sys.argv[1], timeout=30)
dst = sqlite3.connect(sys.argv[2])
with dst:
    src.backup(dst)
dst.close()
src.close()
PY
    else
        die "neither sqlite3 nor python3 is installed: cannot back up SQLite"
    fi
fi
mv -f "$tmp" "$out"
trap - EXIT
say "wrote $out ($(du -h "$out" | cut -f1))"

# Retention: names sort by time (UTC stamp), newest last.
shopt -s nullglob
backups=("$dir"/duet-????????T??????Z.dump "$dir"/duet-????????T??????Z.sqlite3)
shopt -u nullglob
mapfile -t sorted < <(for f in "${backups[@]}"; do basename "$f"; done | sort)
total="${#sorted[@]}"
if [ "$total" -gt "$keep" ]; then
    for ((i = 0; i < total - keep; i++)); do
        rm -f -- "$dir/${sorted[$i]}"
        say "deleted old backup $dir/${sorted[$i]}"
    done
    say "kept the newest $keep of $total backups in $dir"
else
    say "$total backup(s) in $dir (keeping up to $keep)"
fi
