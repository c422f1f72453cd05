#!/usr/bin/env bash
# The whole test suite: what README's test command runs and .ci/run calls.
# Installs what it needs on a fresh Debian machine, then runs, in order:
# format and lint checks, the static musl build (size and linkage), and
# every cargo test (unit tests; integration tests against real Nix 2.8
# closures served by nginx on loopback), then the Debian VM tests.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v nix-store >/dev/null || need_pkgs+=(nix-bin)
command -v nginx >/dev/null || need_pkgs+=(nginx-light)
command -v musl-gcc >/dev/null || need_pkgs+=(musl-tools)
command -v file >/dev/null || need_pkgs+=(file)
if ((${#need_pkgs[@]})); then
  echo "== installing ${need_pkgs[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi
rustup target list --installed 2>/dev/null | grep -q x86_64-unknown-linux-musl \
  || rustup target add x86_64-unknown-linux-musl

echo "== cargo fmt --check"
cargo fmt --check
echo "== cargo clippy -D warnings"
cargo clippy --all-targets -q -- -D warnings

echo "== static musl release build"
cargo build -q --release --target x86_64-unknown-linux-musl
bin=target/x86_64-unknown-linux-musl/release/nixless
file "$bin" | grep -Eq "statically linked|static-pie linked" || { file "$bin"; echo "not static"; exit 1; }
size=$(stat -c %s "$bin")
echo "binary: $bin, $size bytes stripped ($(file -b "$bin" | cut -d, -f1-4))"
((size <= 3 * 1024 * 1024)) || { echo "binary over 3 MiB"; exit 1; }

echo "== nix files parse, units.json is valid"
bash tests/nix-parse.sh

echo "== cargo test"
cargo test -q 2>&1 | tee target/test.log | grep -vE '^(running|$)'

# The slower tier: systemd behaviour under a real systemd, in a Debian VM
# (qemu, TCG). NIXLESS_SKIP_VM=1 skips it for a quick local run.
if [ -z "${NIXLESS_SKIP_VM:-}" ]; then
  echo "== Debian VM tests (tests/debian-vm.sh)"
  bash tests/debian-vm.sh
fi
echo "== done"
