# Peapod: the two commands that matter are `make demo` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
CARGO ?= cargo
# The VMM is static, like the agent: it starts faster (no dynamic loader) and the
# shim's jail holds no library (it refuses a dynamic VMM). Same flags as rootfs/build.sh.
TRIPLE := x86_64-unknown-linux-gnu
STATIC_BUILD := RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build --release --target $(TRIPLE)
VMM := target/$(TRIPLE)/release/peapod-vmm
SHIM := target/release/containerd-shim-peapod-v2

# The artefacts under test, for the test, demo and bench programs.
ARTEFACTS = PEAPOD_KERNEL="$$(kernel-config/build.sh)" PEAPOD_INITRD="$$(rootfs/build.sh)" \
	PEAPOD_VMM="$(CURDIR)/$(VMM)" PEAPOD_SHIM="$(CURDIR)/$(SHIM)"

.PHONY: demo boot test bench deps lint build install fuzz
# Seconds per fuzz target: a smoke run in `make test`, a real one in `make fuzz`.
FUZZ_SMOKE_SECONDS ?= 3
FUZZ_SECONDS ?= 600

## demo: on a fresh machine, install what is missing, build everything, start a private
## containerd with CRI, CNI and peapod, run a pod in a microVM over CRI, print what its
## container sees, and remove the pod.
demo: deps build
	$(ARTEFACTS) $(CARGO) run --release -q -p peapod-tests --bin peapod-demo

## boot: boot a bare guest and show its console until the agent reports ready and
## powers the VM off (the VMM alone, no containerd).
boot: deps build
	$(VMM) --kernel "$$(kernel-config/build.sh)" --initrd "$$(rootfs/build.sh)" \
	    --console stdout --cmdline peapod.poweroff=ready --api-socket /tmp/peapod-boot.sock

## install: the shim, the VMM, the guest kernel and initramfs, the containerd config
## snippets and the RuntimeClass, on this node (DESTDIR stages them elsewhere).
install: build
	shim/deploy/install.sh $(SHIM) $(VMM) "$$(kernel-config/build.sh)" "$$(rootfs/build.sh)"

## test: lints, unit tests, the integration tests that boot real guests under KVM, and
## every fuzz target for a few seconds.
test: deps lint build
	$(ARTEFACTS) PEAPOD_TEST_INITRD="$$(rootfs/build-test.sh)" \
	$(CARGO) test --profile release-tests --workspace --lib --bins --tests
	vmm/fuzz/run.sh $(FUZZ_SMOKE_SECONDS)

## fuzz: every fuzz target (guest memory into each device, MMIO registers, vsock
## packets, the control API) for FUZZ_SECONDS each, under AddressSanitizer.
fuzz:
	vmm/fuzz/run.sh $(FUZZ_SECONDS)

## bench: boot figures against QEMU's microvm, the devices' cost against raw system
## calls, each measured in one run, a container's start in a guest, and pods over CRI
## (start latency and memory per pod) against runc on the same containerd.
bench: build
	.ci/install-deps.sh bench
	$(CARGO) bench -p peapod-devices --features test-utils --bench devices
	PEAPOD_KERNEL="$$(kernel-config/build.sh)" PEAPOD_INITRD="$$(rootfs/build.sh)" \
	PEAPOD_VMM="$(CURDIR)/$(VMM)" $(CARGO) bench -p peapod-tests --bench boot
	PEAPOD_KERNEL="$$(kernel-config/build.sh)" \
	PEAPOD_INITRD="$$(rootfs/build-test.sh --with-strace target/peapod/bench-initramfs.cpio)" \
	PEAPOD_VMM="$(CURDIR)/$(VMM)" $(CARGO) bench -p peapod-tests --bench agent
	$(ARTEFACTS) $(CARGO) bench -p peapod-tests --bench cri
	$(ARTEFACTS) $(CARGO) bench -p peapod-tests --bench layers

deps:
	.ci/install-deps.sh

lint:
	$(CARGO) fmt --check
	$(CARGO) fmt --check --manifest-path vmm/fuzz/Cargo.toml
	$(CARGO) clippy --all-targets --all-features -- -D warnings

build:
	$(STATIC_BUILD) -p peapod-vmm
	@if readelf -l $(VMM) | grep -q INTERP; then echo "$(VMM) is not static" >&2; exit 1; fi
	$(CARGO) build --release -p peapod-shim
