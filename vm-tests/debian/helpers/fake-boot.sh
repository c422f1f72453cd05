#!/bin/sh
# The fake boot loader (fake-boot.service, before the agent): the system the
# "boot loader" defaults to is the one that booted, as on NixOS.
set -eu
default=$(cat /var/lib/fake-boot/default 2>/dev/null || true)
# Booted by a real boot loader (uefi-boot scenario): the entry's
# init=<system>/init names the system, as NixOS's stage 2 knows it.
for w in $(cat /proc/cmdline); do
  case $w in init=/nix/store/*/init) default=${w#init=} default=${default%/init} ;; esac
done
[ -n "$default" ] || exit 0
ln -sfn "$default" /run/booted-system
ln -sfn "$default" /run/current-system
echo "fake-boot: booted $default"
