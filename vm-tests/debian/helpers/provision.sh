#!/bin/bash
# Guest side: makes the guest look like a NixOS machine running generation 1,
# as an installer would leave it: installs SYSTEM (and its closure) from the
# cache with `nixless install`, links it as system-1-link, makes it the fake
# boot loader's default and the current system.
#   provision.sh SYSTEM CACHE_URL CACHE_PUBLIC_KEY
set -euo pipefail
system=$1 cache=$2 key=$3
nixless install --cache "$cache" --trusted-key "$key" "$system"
ln -sfn "$system" /nix/var/nix/profiles/system-1-link
ln -sfn system-1-link /nix/var/nix/profiles/system
mkdir -p /var/lib/fake-boot
echo "$system" >/var/lib/fake-boot/default
/usr/local/sbin/fake-boot
