# syntax=docker/dockerfile:1
# weir: an Envoy-compatible L7 gateway proxy.
#
#   docker build -t weir .
#   docker run --rm -p 10000:10000 weir                      # examples/gateway.yaml
#   docker run --rm -v $PWD/envoy.yaml:/etc/weir/gateway.yaml:ro -p 10000:10000 weir

# === build ===
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the registry and target dir across builds; the binary is
# copied out of the cached target dir in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p weir \
    && install -D -m 0755 target/release/weir /out/weir

# === runtime ===
FROM debian:bookworm-slim
RUN useradd --system --uid 65532 --no-create-home --shell /usr/sbin/nologin weir
COPY --from=build /out/weir /usr/local/bin/weir
COPY examples/gateway.yaml /etc/weir/gateway.yaml
USER weir
# The example's listener; its admin server binds 127.0.0.1:9901 (in-container only).
EXPOSE 10000
ENTRYPOINT ["/usr/local/bin/weir"]
CMD ["-c", "/etc/weir/gateway.yaml"]
