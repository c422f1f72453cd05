#!/usr/bin/env bash
# Runs the Debian VM scenarios (see README.md beside this script):
#
#   vm-tests/debian/run-test.sh [SCENARIO...]    # ready-watchdog deploy hw-watchdog killed-switch uefi-boot (default: all)
#   VMTEST_ARCH=aarch64 vm-tests/debian/run-test.sh [SCENARIO...]   # the arm64 guest: ready-watchdog deploy
#
# Builds or reuses the cached base image (build-image.sh), then boots one VM
# per scenario under qemu (TCG) and drives it through the backdoor. Uses the
# static binary at $NIXLESS_BIN (default target/<arch>-unknown-linux-musl/
# release/nixless: build it first) in the guest and $NIXLESS_HOST_BIN
# (default target/x86_64-unknown-linux-musl/release/nixless) on the host,
# and the unit definitions in $VMTEST_UNITS (default nixos/units.json).
# Prints `VMTEST:<scenario>:<check>:PASS|FAIL:…` per check and `N passed, N
# failed` last; exits non-zero on any failure or when the whole run exceeds
# $VMTEST_TIMEOUT seconds (default 1500). Extra arguments for scenarios.py
# (e.g. --skip-unsupported) go before the scenario names.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)

arch=${VMTEST_ARCH:-x86_64}
case $arch in
  x86_64 | aarch64) ;;
  *) echo "run-test: VMTEST_ARCH must be x86_64 or aarch64, not ${arch:0:40}" >&2; exit 1 ;;
esac
host_bin=${NIXLESS_HOST_BIN:-$repo/target/x86_64-unknown-linux-musl/release/nixless}
bin=${NIXLESS_BIN:-$repo/target/$arch-unknown-linux-musl/release/nixless}
units=${VMTEST_UNITS:-$repo/nixos/units.json}
for b in "$bin" "$host_bin"; do
  [ -x "$b" ] || { echo "run-test: no nixless binary at $b (cargo build --release --target ...-unknown-linux-musl)" >&2; exit 1; }
done
[ -f "$units" ] || { echo "run-test: no unit definitions at $units" >&2; exit 1; }
for t in "qemu-system-$arch" qemu-img nix-build nix nginx python3; do
  command -v "$t" >/dev/null || { echo "run-test: missing $t (tests/debian-vm.sh installs what is needed)" >&2; exit 1; }
done

t0=$(date +%s)
image=$(VMTEST_ARCH=$arch "$here/build-image.sh")
echo "run-test: base image $image ($(($(date +%s) - t0)) s)"
work=$repo/target/debian-vm/run
[ "$arch" = x86_64 ] || work=$repo/target/debian-vm/run-$arch
exec timeout -k 30 "${VMTEST_TIMEOUT:-1500}" python3 "$here/scenarios.py" \
  --image "$image" --bin "$bin" --host-bin "$host_bin" --arch "$arch" --units "$units" --work "$work" "$@"
