# Portico's two commands: `make test` runs every check and test; `make demo` runs the lab.
# Both bootstrap a fresh machine first (scripts/bootstrap.sh, idempotent).
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: test demo bootstrap fmt-check clippy clippy-ebpf unit-and-kernel-tests

test: bootstrap fmt-check clippy clippy-ebpf unit-and-kernel-tests

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

# Kernel tests need root; they fail (never skip) without it.
unit-and-kernel-tests:
	$(CARGO) test --workspace --locked

demo: bootstrap
	$(CARGO) run --release --locked -- lab
