#!/bin/sh
# bin/install-bootloader of a fake system (see ../fake-system.nix): what
# NixOS's switch-to-configuration runs for `boot`/`switch` (its
# system.build.installBootLoader), here a stand-in for nixpkgs'
# nixos/modules/system/boot/loader/systemd-boot/systemd-boot-builder.py, the
# version that names entries by generation:
#
#   install-bootloader TOPLEVEL
#
# - generations: the links /nix/var/nix/profiles/system-N-link (the builder
#   asks `nix-env --list-generations -p /nix/var/nix/profiles/system`, which
#   reads exactly these links);
# - one entry per generation, loader/entries/nixos-generation-N.conf, with
#   the builder's lines (title, sort-key, version, linux, initrd,
#   `options init=<system>/init <kernel-params>`, machine-id). With boot
#   counting (@tries@ non-empty: boot.loader.systemd-boot.bootCounting) a new
#   entry is written as nixos-generation-N+TRIES.conf; an existing entry keeps
#   its name, whatever systemd-boot or systemd-bless-boot made of its counter;
# - entries of generations that are gone are removed;
# - loader/loader.conf: `default nixos-generation-N.conf` for TOPLEVEL's
#   generation, written to a temp file and renamed, as the builder does.
# The kernel and initrd are the same for every generation (the test image's)
# and were put on the ESP under /EFI/nixos/ when it was made.
#
# For the test it also logs, to /var/lib/fake-nixos/bootloader-log, the EFI
# variable LoaderEntryDefault as it was when loader.conf's default moved.
set -eu
toplevel=$1
tries=@tries@
esp=/boot
entries=$esp/loader/entries
kernel=/EFI/nixos/vmtest-linux-bzImage.efi
initrd=/EFI/nixos/vmtest-initrd-initrd.efi
vendor=4a67b082-0a4c-41cf-b6c7-440b29bb8c4f
mkdir -p "$entries" /var/lib/fake-nixos

efivar() {
  f=/sys/firmware/efi/efivars/$1-$vendor
  [ -e "$f" ] && cat "$f" | tail -c +5 | tr -d '\000' || true
}

machine_id=$(cat /etc/machine-id 2>/dev/null || true)
default=
gens=
for link in $(ls -d /nix/var/nix/profiles/system-*-link 2>/dev/null | sort -t- -k2 -n); do
  n=${link##*/system-}
  n=${n%-link}
  case $n in '' | *[!0-9]*) continue ;; esac
  system=$(readlink -f "$link")
  gens="$gens $n"
  [ "$system" = "$toplevel" ] && default=$n
  name=
  for f in "$entries/nixos-generation-$n.conf" "$entries/nixos-generation-$n+"*.conf; do
    [ -e "$f" ] && name=${f##*/}
  done
  [ -n "$name" ] || name=nixos-generation-$n${tries:++$tries}.conf
  {
    echo "title NixOS"
    echo "sort-key nixos"
    echo "version Generation $n vmtest, built on $(date -u +%F)"
    echo "linux $kernel"
    echo "initrd $initrd"
    echo "options init=$system/init $(cat "$system/kernel-params")"
    [ -z "$machine_id" ] || echo "machine-id $machine_id"
  } >"$entries/.$name.tmp"
  mv "$entries/.$name.tmp" "$entries/$name"
done

# Entries of generations that no longer exist.
for f in "$entries"/nixos-generation-*.conf; do
  [ -e "$f" ] || continue
  n=${f##*/nixos-generation-}
  n=${n%.conf}
  n=${n%%+*}
  case " $gens " in *" $n "*) ;; *) rm -f "$f" ;; esac
done

[ -n "$default" ] || { echo "install-bootloader: $toplevel is not a generation of the system profile" >&2; exit 1; }
printf 'timeout 0\ndefault nixos-generation-%s.conf\neditor 0\nconsole-mode keep\n' "$default" >"$esp/loader/loader.tmp"
mv "$esp/loader/loader.tmp" "$esp/loader/loader.conf"
sync
echo "$(date +%s) default=nixos-generation-$default.conf LoaderEntryDefault=$(efivar LoaderEntryDefault)" \
  >>/var/lib/fake-nixos/bootloader-log
echo "install-bootloader: loader.conf default nixos-generation-$default.conf"
