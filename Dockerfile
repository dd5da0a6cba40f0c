# syntax=docker/dockerfile:1
# Dockerfile — duet's container image, in two stages: the workspace is built
# with the Rust toolchain image (embedded migrations, bundled libpq and SQLite:
# no system libraries needed at run time), then only the `duet` binary goes
# into a slim Debian image that runs as the non-root user `duet` (uid 10001).
#   docker build -t duet .
#   docker run -p 8080:8080 -v duet-data:/data duet            # SQLite in /data
#   docker run --rm -v duet-data:/data duet admin add alice --name Alice   # CLI, same database
# Needs BuildKit (the default builder of current Docker) for the cache mounts.

FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
# The registry and target caches survive between builds; the binary is copied
# out of the cached target dir, which is not part of the image layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p duet \
    && install -m 0755 target/release/duet /usr/local/bin/duet

FROM debian:bookworm-slim
# ca-certificates: TLS to AI providers and notifiers; curl: the health check.
# Versions follow the bookworm-slim base (security updates come with a rebuild).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 duet \
    && useradd --system --uid 10001 --gid duet --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin duet \
    && install -d -o duet -g duet -m 0750 /data
COPY --from=builder /usr/local/bin/duet /usr/local/bin/duet

ENV DUET_BIND=0.0.0.0:8080 \
    DATABASE_URL=/data/duet.db
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8080
# SIGTERM is duet's graceful shutdown: stop taking sockets, hand sessions over.
STOPSIGNAL SIGTERM
# Liveness on the port that DUET_BIND names (8080 unless overridden); shell
# form on purpose, for the ${DUET_BIND##*:} expansion.
# hadolint ignore=DL3025
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD curl -fsS "http://127.0.0.1:${DUET_BIND##*:}/health" >/dev/null || exit 1
# Numeric, so that orchestrators can verify runAsNonRoot; it is the user duet.
USER 10001:10001
ENTRYPOINT ["/usr/local/bin/duet"]
