#!/usr/bin/env bash
# The whole test suite: what README's test command runs and .ci/run calls.
# Installs what it needs on a fresh Debian machine, then runs, in order:
# format and lint checks, the static musl builds for x86_64 and aarch64
# (size and linkage), every cargo test (unit tests; integration tests against
# real Nix 2.8 closures served by nginx on loopback), the aarch64 unit and
# install tests under qemu-user, then the Debian VM tests.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v nix-store >/dev/null || need_pkgs+=(nix-bin)
command -v nginx >/dev/null || need_pkgs+=(nginx-light)
command -v musl-gcc >/dev/null || need_pkgs+=(musl-tools)
command -v file >/dev/null || need_pkgs+=(file)
# aarch64: C cross compiler for ring's C/asm (rust-lld links), qemu-user to run tests.
command -v aarch64-linux-gnu-gcc >/dev/null || need_pkgs+=(gcc-aarch64-linux-gnu)
command -v qemu-aarch64-static >/dev/null || need_pkgs+=(qemu-user-static)
command -v dnsmasq >/dev/null || need_pkgs+=(dnsmasq-base)
command -v ip >/dev/null || need_pkgs+=(iproute2)
if ((${#need_pkgs[@]})); then
  echo "== installing ${need_pkgs[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi
# tests/private_cache.rs: an S3 API server that checks signatures (moto's
# server mode, with authentication turned on by the test) and boto3, the
# standard S3 client, to upload the cache. Debian has no python3-moto: pip.
if ! python3 -c 'import moto.server, boto3' 2>/dev/null; then
  echo "== installing moto[server] and boto3 (pip)"
  python3 -m pip --version >/dev/null 2>&1 || {
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip >/dev/null
  }
  python3 -m pip install -q 'moto[server]' boto3 2>/dev/null \
    || python3 -m pip install -q --break-system-packages 'moto[server]' boto3 \
    || { echo "error: could not install moto[server] and boto3 (tests/private_cache.rs needs them)"; exit 1; }
fi
# tests/pushgateway.rs: Debian's Pushgateway; the test runs the binary on a
# loopback port of its own (the package's service is not needed).
if [[ ! -x /usr/bin/prometheus-pushgateway ]]; then
  echo "== installing prometheus-pushgateway"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus-pushgateway >/dev/null; } \
    || { echo "error: could not install prometheus-pushgateway (tests/pushgateway.rs needs it)"; exit 1; }
fi
# tests/fleet.rs: Debian's Prometheus scraping that Pushgateway; the test
# runs it on a loopback port with its own config and storage directory.
if [[ ! -x /usr/bin/prometheus ]]; then
  echo "== installing prometheus"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; } \
    || { echo "error: could not install prometheus (tests/fleet.rs needs it)"; exit 1; }
fi
command -v openssl >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null; }
for t in x86_64-unknown-linux-musl aarch64-unknown-linux-musl; do
  rustup target list --installed 2>/dev/null | grep -qx "$t" || rustup target add "$t"
done

# static_build TRIPLE FILE-ARCH: release build, statically linked for that
# architecture (as `file` names it), at most 3 MiB stripped.
static_build() {
  echo "== static musl release build, $1"
  cargo build -q --release --target "$1"
  local bin=target/$1/release/nixless desc size
  desc=$(file -b "$bin")
  [[ $desc == *"$2"* ]] || { echo "$bin: not $2: $desc"; exit 1; }
  [[ $desc == *"statically linked"* || $desc == *"static-pie linked"* ]] || { echo "$bin: not static: $desc"; exit 1; }
  size=$(stat -c %s "$bin")
  echo "binary: $bin, $size bytes stripped ($(echo "$desc" | cut -d, -f1-4))"
  ((size <= 3 * 1024 * 1024)) || { echo "binary over 3 MiB"; exit 1; }
}

echo "== cargo fmt --check"
cargo fmt --check
echo "== cargo clippy -D warnings"
cargo clippy --all-targets -q -- -D warnings
# The aarch64-only code (the seccomp selftest's raw syscalls) is linted only here.
cargo clippy --target aarch64-unknown-linux-musl --all-targets -q -- -D warnings

static_build x86_64-unknown-linux-musl "x86-64"
# Cross-built on this machine: .cargo/config.toml names the linker and C compiler.
static_build aarch64-unknown-linux-musl "ARM aarch64"

echo "== nix files parse, units.json is valid"
bash tests/nix-parse.sh

echo "== cargo test"
cargo test -q 2>&1 | tee target/test.log | grep -vE '^(running|$)'

# The same code for aarch64, run by qemu-user: the unit tests (formats, NAR,
# narinfo, the seccomp rules' constants), the NAR comparison with Nix and the
# install tests (real Nix closures, nginx; nixless spawned through
# NIXLESS_TEST_RUNNER, as binfmt_misc may not be registered). Not
# tests/seccomp.rs: qemu-user hands the guest's syscalls to the x86_64 kernel,
# which cannot apply an aarch64 filter; instead tests/qemu_syscalls.rs checks
# every syscall an install makes (qemu -strace) against the aarch64
# allowlist. Not the agent/switch/lock tests: they wait on timing and
# process trees that emulation slows and distorts.
echo "== a fleet of 200 static agents (tests/fleet_rollout.rs; cargo test above ran 20 debug ones)"
NIXLESS_FLEET_AGENTS=200 NIXLESS_FLEET_AGENT_BIN="$PWD/target/x86_64-unknown-linux-musl/release/nixless" \
  cargo test -q --test fleet_rollout 2>&1 | grep -vE '^(running|$)'
cat target/fleet-rollout-200.txt

echo "== cargo test, aarch64 under qemu-user"
CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_RUNNER=qemu-aarch64-static NIXLESS_TEST_RUNNER=qemu-aarch64-static \
  timeout 1200 cargo test -q --target aarch64-unknown-linux-musl --lib --test install --test nar_vs_nix --test install_engine --test qemu_syscalls 2>&1 \
  | tee target/test-aarch64.log | grep -vE '^(running|$)'

# The slower tier: systemd behaviour under a real systemd, in a Debian VM
# (qemu, TCG): an x86_64 guest, then an arm64 guest with the aarch64 binary
# on a real aarch64 kernel (there the seccomp filter runs). NIXLESS_SKIP_VM=1
# skips both for a quick local run, NIXLESS_SKIP_ARM_VM=1 only the arm64 one.
if [ -z "${NIXLESS_SKIP_VM:-}" ]; then
  echo "== Debian VM tests (tests/debian-vm.sh)"
  bash tests/debian-vm.sh
fi
echo "== done"
