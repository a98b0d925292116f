# syntax=docker/dockerfile:1
# The images of memU, from one release build of the workspace (docs/images.md):
#   docker build --target operator -t ghcr.io/memu-k8s/memu-operator:0.1.0 .
#   docker build --target worker   -t ghcr.io/memu-k8s/memu-worker:0.1.0 .
# Both run as the non-root user 65532 and write nothing to their root filesystem, so they run
# under readOnlyRootFilesystem (the chart and the operator's rendered pods set it).
ARG RUST_VERSION=1.89
ARG DEBIAN_RELEASE=bookworm

# --- build: both binaries, with the locked dependencies --------------------------------------
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p memu-operator --bin memu-operator -p memu-worker --bin memu-worker \
 && mkdir -p /out \
 && cp target/release/memu-operator target/release/memu-worker /out/

# --- model: the local embedding model (all-MiniLM-L6-v2), by the repository's own installer --
FROM python:3.12-slim-${DEBIAN_RELEASE} AS model
COPY scripts/install-model.sh /usr/local/bin/install-model.sh
RUN dir=$(MEMU_CACHE=/tmp/memu-cache bash /usr/local/bin/install-model.sh) \
 && mkdir -p /opt/memu/model \
 && cp -r "$dir"/. /opt/memu/model/ \
 && test -f /opt/memu/model/config.json -a -f /opt/memu/model/tokenizer.json -a -f /opt/memu/model/model.safetensors

# --- runtime: Debian slim, CA certificates, user 65532 -----------------------------------------
FROM debian:${DEBIAN_RELEASE}-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 65532 memu \
 && useradd --system --uid 65532 --gid 65532 --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin memu
USER 65532:65532

# --- the operator: /metrics and /healthz on 8081 -----------------------------------------------
FROM runtime AS operator
COPY --from=build /out/memu-operator /usr/local/bin/memu-operator
EXPOSE 8081
ENTRYPOINT ["/usr/local/bin/memu-operator"]

# --- the worker: API on 8080, metrics on 9090; the model where the operator's config points ----
FROM runtime AS worker
COPY --from=model /opt/memu/model /opt/memu/model
COPY --from=build /out/memu-worker /usr/local/bin/memu-worker
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/memu-worker"]
CMD ["serve"]
