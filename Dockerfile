# Multi-stage build: the Rust toolchain only in the builder; the runtime image holds the
# binary, CA certificates and nothing else. libzmq is built from source by the zmq crate.
FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY migrations ./migrations
RUN cargo build --release --locked --bin opencti-threatbus

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin bridge \
    && mkdir -p /data && chown bridge /data
COPY --from=builder /src/target/release/opencti-threatbus /usr/local/bin/opencti-threatbus
USER bridge
ENV BRIDGE_DATA_DIR=/data
VOLUME ["/data"]
# Asks the daemon over its admin socket in /data: healthy once the store is open.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["opencti-threatbus", "health"]
ENTRYPOINT ["opencti-threatbus"]
CMD ["run"]
