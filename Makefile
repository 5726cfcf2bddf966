# Portico's two commands: `make test` runs every check and test; `make demo` runs the lab demo.
# Both bootstrap a fresh machine first (scripts/bootstrap.sh, idempotent).
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: test demo image bootstrap fmt-check clippy clippy-ebpf unit-and-kernel-tests fuzz-smoke fuzz-smoke-maglev

test: bootstrap fmt-check clippy clippy-ebpf unit-and-kernel-tests fuzz-smoke fuzz-smoke-maglev

bootstrap:
	@bash scripts/bootstrap.sh

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

# The XDP program as the kernel gets it: bpfel target, nightly, build-std.
clippy-ebpf:
	$(CARGO) +nightly clippy -p portico-xdp-ebpf --target bpfel-unknown-none -Z build-std=core \
		--release --locked --target-dir target/bpf-clippy -- -D warnings

# Kernel tests need root; they fail (never skip) without it. The XDP fuzz test replays one
# fixed seed here, so a run is reproducible; unset, it draws a new seed each run (the README's
# long fuzz command), and a failure prints the seed that replays it.
XDP_FUZZ_SEED ?= 1796526597241270925
unit-and-kernel-tests:
	PORTICO_XDP_FUZZ_SEED=$(XDP_FUZZ_SEED) $(CARGO) test --workspace --locked

# A bounded libFuzzer run of the BGP session target, seeded with the checked-in corpus.
# New inputs go to a scratch directory, so the checked-in corpus stays as it is; a crash
# fails the target and leaves its input under announcer/fuzz/artifacts/.
FUZZ_TARGET ?= established_session
FUZZ_SECONDS ?= 30
fuzz-smoke:
	cd announcer/fuzz && scratch=$$(mktemp -d) && trap 'rm -rf "$$scratch"' EXIT && \
		$(CARGO) +nightly fuzz run $(FUZZ_TARGET) "$$scratch" corpus/$(FUZZ_TARGET) -- \
		-max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048

# The same for the Maglev table builder (xdp-lb/fuzz), shorter: each input builds tables of
# up to 131071 slots.
fuzz-smoke-maglev:
	cd xdp-lb/fuzz && scratch=$$(mktemp -d) && trap 'rm -rf "$$scratch"' EXIT && \
		$(CARGO) +nightly fuzz run maglev_table "$$scratch" corpus/maglev_table -- \
		-max_total_time=15 -rss_limit_mb=2048

# The lab (portico lab demo): BIRD ToR with ECMP over two `portico standalone` nodes with
# XDP, four backends, a client; traffic to every address; tables; torn down at the end.
demo: bootstrap
	$(CARGO) run --release --locked -- lab demo

# The container image (OCI archive, localhost/portico:<version>) with the release binary, and
# the SBOMs of the binary and the image, in target/image/ (scripts/image.sh; no registry).
# `make test` builds and checks the same image from the test binary (tests/image.rs).
image: bootstrap
	$(CARGO) build --release --locked --bin portico
	scripts/image.sh --binary target/release/portico --out target/image
