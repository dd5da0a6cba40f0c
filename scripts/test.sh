#!/usr/bin/env bash
# scripts/test.sh — THE test command (README, .ci/run): ensures PostgreSQL and
# Redis are up (scripts/services.sh), then builds, tests and lints the whole
# workspace and checks that duet-actors stays free of storage/HTTP crates.
#   DUET_TEST_DATABASE_URL  default postgres://postgres@127.0.0.1:5432/test
#   DUET_TEST_REDIS_URL     default redis://127.0.0.1:6379
# Extra arguments are passed to `cargo test` (e.g. a test name filter).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
started=$SECONDS

# Chromium too: tests/api/browser.rs drives the demo page in it.
scripts/services.sh --chromium

export DUET_TEST_DATABASE_URL="${DUET_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
export DUET_TEST_REDIS_URL="${DUET_TEST_REDIS_URL:-redis://127.0.0.1:6379}"

step() { printf '\n==> %s\n' "$*"; }

step "cargo build --release --workspace --locked"
cargo build --release --workspace --locked

# Tee the test output so that the totals can be summed for the last line.
test_log="$(mktemp)"
trap 'rm -f "$test_log"' EXIT
step "cargo test --release --workspace --locked"
test_rc=0
cargo test --release --workspace --locked --no-fail-fast "$@" 2>&1 | tee "$test_log" || test_rc=$?

# "test result: ok. 12 passed; 0 failed; 1 ignored; ..." — one per test binary.
read -r passed failed ignored < <(
    awk '/^test result:/ {
            for (i = 1; i <= NF; i++) {
                if ($(i) ~ /^passed;?$/) p += $(i - 1)
                if ($(i) ~ /^failed;?$/) f += $(i - 1)
                if ($(i) ~ /^ignored;?$/) g += $(i - 1)
            }
         }
         END { printf "%d %d %d\n", p, f, g }' "$test_log"
)

clippy="skipped (clippy not installed)"
rc=$test_rc
# Lint and boundary run even after a failed test: they are cheap and tell more.
if cargo clippy --version >/dev/null 2>&1; then
    step "cargo clippy --release --workspace --all-targets --locked -- -D warnings"
    if cargo clippy --release --workspace --all-targets --locked -- -D warnings; then
        clippy="ok"
    else
        clippy="FAILED"
        rc=1
    fi
else
    echo "note: cargo clippy is not installed; lint step skipped"
fi

# duet-actors must reach storage, coordination and HTTP only through its
# own traits (STYLE.md section 1): none of these may be among its normal deps.
step "dependency boundary: duet-actors"
forbidden='^(diesel|diesel_[a-z_]+|redis|redis-[a-z-]+|deadpool|deadpool-[a-z-]+|reqwest|actix-web|actix-http)$'
deps="$(cargo tree -p duet-actors -e normal --prefix none --locked --target all | awk '{print $1}' | sort -u)"
bad="$(grep -E "$forbidden" <<<"$deps" || true)"
if [ -n "$bad" ]; then
    echo "ERROR: duet-actors depends on crates it must not use:" >&2
    while read -r crate; do
        echo "  - $crate, pulled in by: $(cargo tree -p duet-actors -e normal --locked --target all -i "$crate" --prefix none 2>/dev/null | awk 'NR > 1 {print $1}' | sort -u | tr '\n' ' ')" >&2
    done <<<"$bad"
    echo "actors/ must stay free of diesel, redis, deadpool, reqwest, actix-web and actix-http (STYLE.md section 1)." >&2
    boundary="FAILED"
    rc=1
else
    boundary="ok"
    echo "duet-actors: none of diesel, redis, deadpool, reqwest, actix-web, actix-http"
fi

elapsed=$((SECONDS - started))
echo
if [ "$test_rc" -ne 0 ]; then
    echo "test.sh: FAILED in ${elapsed}s: tests FAILED (cargo test exited $test_rc), clippy ${clippy}, boundary ${boundary}"
elif [ "$rc" -ne 0 ]; then
    echo "test.sh: FAILED in ${elapsed}s: tests ok, clippy ${clippy}, boundary ${boundary}"
else
    echo "test.sh: OK in ${elapsed}s: build ok, tests ok, clippy ${clippy}, boundary ${boundary}"
fi
echo "summary: ${passed} passed, ${failed} failed, ${ignored} skipped"
exit "$rc"
