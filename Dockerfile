# Portico's image for those who build with a registry at hand (docker build -t portico .).
# Without one, scripts/image.sh (`make image`) builds the same content, Debian's glibc and
# libgcc plus the binary, as an OCI archive, with SBOMs; that is the image the tests run.
# Untested here: these machines reach no container registry.

# The eBPF program is built by xdp-lb's build script with nightly (-Z build-std) and
# bpf-linker 0.10.4, which loads the toolchain's own LLVM.
FROM docker.io/library/rust:1.95-bookworm AS build
RUN rustup toolchain install nightly --profile minimal --component rust-src \
 && cargo install bpf-linker@0.10.4 --locked
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin portico \
 && objcopy --strip-debug target/release/portico /portico

# glibc and libgcc_s (what `ldd portico` lists) and nothing else: no shell.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /portico /usr/local/bin/portico
# The controller runs as this user; the agent's DaemonSet runs it as root with BPF,
# NET_ADMIN and PERFMON (deploy/base/agent.yaml).
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/portico"]
