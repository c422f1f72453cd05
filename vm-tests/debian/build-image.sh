#!/usr/bin/env bash
# Builds (or finds cached) the Debian base image for the VM tests:
#
#   vm-tests/debian/build-image.sh        # prints the image directory on stdout
#   VMTEST_ARCH=arm64 vm-tests/debian/build-image.sh   # the arm64 guest's image
#
# The image directory, target/debian-vm/base-<key>/ (arm64:
# target/debian-vm-arm64/base-arm64-<key>/), holds
#   disk.qcow2   ext4 root filesystem (no partition table; root=/dev/vda)
#   vmlinuz      kernel, for qemu -kernel (direct boot, no bootloader)
#   initrd.img   small initramfs (virtio, ext4, 9p modules only)
#   cmdline      the kernel command line to boot it with
#   systemd-bootx64.efi  the image's systemd-boot (for a UEFI boot; amd64 only)
# <key> is a hash of the architecture, this script and guest/ (the files baked in), so the
# image is rebuilt only when one of them changes. Older base-* directories
# are removed after a successful build.
#
# How: debootstrap (minbase + systemd, kernel, iproute2, curl, jq,
# systemd-boot for bootctl and systemd-bless-boot: the uefi-boot scenario) into a
# directory, configure it, then `mkfs.ext4 -d DIR` populates a raw image
# without mounting it, and qemu-img turns it into qcow2. Needs root (as
# debootstrap does) and the Debian mirror apt is configured with (override
# with DEBIAN_MIRROR=URL). Takes 3-4 minutes; a ~150 MiB qcow2 (450 MiB ext4).
#
# arm64 (VMTEST_ARCH=arm64; cache $VMTEST_CACHE_ARM64, default
# target/debian-vm-arm64): `debootstrap --arch arm64 --foreign` unpacks on the
# host; its second stage and every chroot command after it run arm64
# binaries through binfmt_misc and qemu-user (qemu-aarch64-static). If no
# handler for aarch64 ELF files is registered, this script registers one
# (flag F: the interpreter is opened now, so the chroot needs no copy of it)
# for the length of the build and removes it afterwards. Needs a kernel that
# lets root mount binfmt_misc. Takes about 10 minutes (the second stage is
# emulated); a ~120 MiB qcow2.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
suite=bookworm
arch=${VMTEST_ARCH:-amd64}
case $arch in
  amd64 | x86_64)
    arch=amd64
    cache=${VMTEST_CACHE:-$repo/target/debian-vm}
    prefix=base-
    console=ttyS0
    ;;
  arm64 | aarch64)
    arch=arm64
    cache=${VMTEST_CACHE_ARM64:-$repo/target/debian-vm-arm64}
    prefix=base-arm64-
    console=ttyAMA0 # the virt machine's PL011 UART
    ;;
  *) echo "build-image: VMTEST_ARCH must be amd64 (x86_64) or arm64 (aarch64), not ${arch:0:40}" >&2; exit 1 ;;
esac

key=$( (echo "$arch"; cat "$here/build-image.sh" $(find "$here/guest" -type f | LC_ALL=C sort)) | sha256sum | cut -c1-16)
out=$cache/$prefix$key
if [ -e "$out/ok" ]; then
  echo "$out"
  exit 0
fi

log() { echo "build-image: $*" >&2; }
[ "$(id -u)" -eq 0 ] || { log "needs root (debootstrap)"; exit 1; }
for t in debootstrap mkfs.ext4 qemu-img; do
  command -v "$t" >/dev/null || { log "missing $t (apt-get install debootstrap e2fsprogs qemu-utils)"; exit 1; }
done
[ "$arch" = amd64 ] || command -v qemu-aarch64-static >/dev/null \
  || { log "missing qemu-aarch64-static (apt-get install qemu-user-static)"; exit 1; }

mirror=${DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then
  # The first http(s) URI of apt's Debian source (deb822 or one-line format).
  mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null \
    | awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i ~ /^https?:\/\/.*\/debian\/?$/) { print $i; exit } }')
fi
if [ -z "$mirror" ]; then
  mirror=$(grep -hE '^deb +(\[[^]]*\] +)?https?://[^ ]*/debian/? ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
    | sed -E 's/^deb +(\[[^]]*\] +)?//' | awk '{ print $1; exit }')
fi
mirror=${mirror:-http://deb.debian.org/debian}

mkdir -p "$cache/debs"
build=$cache/build.$$
root=$build/rootfs
binfmt=/proc/sys/fs/binfmt_misc
binfmt_ours=
cleanup() {
  for m in proc sys dev/pts dev; do
    mountpoint -q "$root/$m" 2>/dev/null && umount -l "$root/$m" || true
  done
  if [ -n "$binfmt_ours" ]; then echo -1 >"$binfmt/$binfmt_ours" 2>/dev/null || true; fi
  rm -rf "$build"
}
trap cleanup EXIT
mkdir -p "$build"
t0=$(date +%s)

# arm64: the host runs the guest's binaries through binfmt_misc and
# qemu-user. Uses an enabled handler for aarch64 ELF if there is one, else
# registers its own until cleanup.
binfmt_aarch64() {
  mountpoint -q "$binfmt" || mount -t binfmt_misc binfmt_misc "$binfmt" 2>/dev/null \
    || { log "cannot mount binfmt_misc at $binfmt: arm64 binaries cannot run here"; return 1; }
  local f
  for f in "$binfmt"/*; do
    # Another build's temporary handler goes away when that build ends.
    case ${f##*/} in nixless-vmtest-aarch64-*) continue ;; esac
    [ -f "$f" ] && grep -qx enabled "$f" 2>/dev/null && grep -q '^magic 7f454c460201010000000000000000000200b700' "$f" \
      && { log "binfmt_misc: using $(basename "$f")"; return 0; }
  done
  # The ELF header of a 64-bit little-endian aarch64 executable (e_machine
  # 0xb7), as qemu's own scripts/qemu-binfmt-conf.sh registers it.
  binfmt_ours=nixless-vmtest-aarch64-$$
  printf '%s' ":$binfmt_ours:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:$(command -v qemu-aarch64-static):F" \
    >"$binfmt/register" 2>/dev/null || { binfmt_ours=; log "cannot register a binfmt_misc handler for aarch64"; return 1; }
  log "binfmt_misc: registered $binfmt_ours (removed when done)"
}

log "debootstrap $suite ($arch) from $mirror (log: $build/debootstrap.log)"
# systemd-boot: bootctl, systemd-bless-boot and boot-complete.target (in
# bookworm they are not in the systemd package); its postinst installs
# nothing here (no ESP in the chroot). The arm64 guest has no UEFI scenario.
pkgs=systemd,systemd-sysv,udev,linux-image-$arch,initramfs-tools,zstd,kmod,iproute2,procps,curl,jq,e2fsprogs
[ "$arch" = amd64 ] && pkgs=$pkgs,systemd-boot
foreign=()
[ "$arch" = amd64 ] || foreign=(--arch "$arch" --foreign)
if ! debootstrap --variant=minbase "${foreign[@]}" --include="$pkgs" --cache-dir="$cache/debs" \
  "$suite" "$root" "$mirror" >"$build/debootstrap.log" 2>&1; then
  tail -30 "$build/debootstrap.log" >&2
  cat "$root/debootstrap/debootstrap.log" 2>/dev/null | tail -30 >&2 || true
  exit 1
fi
if [ "$arch" != amd64 ]; then
  log "first stage done in $(($(date +%s) - t0)) s; second stage under qemu-user"
  binfmt_aarch64
  # The kernel's postinst would build an initramfs with most modules, all
  # emulated; with the image's setting (below) it holds only the listed ones.
  mkdir -p "$root/etc/initramfs-tools/conf.d"
  printf 'MODULES=list\nCOMPRESS=zstd\n' >"$root/etc/initramfs-tools/conf.d/vmtest.conf"
  chroot "$root" /bin/true || { log "cannot run arm64 binaries in the chroot (binfmt_misc)"; exit 1; }
  if ! chroot "$root" /debootstrap/debootstrap --second-stage >>"$build/debootstrap.log" 2>&1; then
    tail -30 "$build/debootstrap.log" >&2
    tail -30 "$root/debootstrap/debootstrap.log" >&2 2>/dev/null || true
    exit 1
  fi
fi
log "debootstrap done in $(($(date +%s) - t0)) s"

# ---- configuration -------------------------------------------------------
echo vmtest >"$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 vmtest\n::1 localhost\n' >"$root/etc/hosts"
cat >"$root/etc/fstab" <<'FSTAB'
/dev/vda / ext4 rw,errors=remount-ro 0 0
FSTAB
chroot "$root" passwd -d root >/dev/null
# A root shell on the serial console, for debugging by hand (-serial stdio).
mkdir -p "$root/etc/systemd/system/serial-getty@$console.service.d"
cat >"$root/etc/systemd/system/serial-getty@$console.service.d/autologin.conf" <<'EOF'
[Service]
ExecStart=
ExecStart=-/sbin/agetty -o '-p -f -- \\u' --keep-baud --autologin root 115200,57600,38400,9600 - $TERM
EOF

# User-mode networking: slirp's fixed addresses, set by a oneshot unit (no
# DHCP, no network daemon); the host reaches the guest only through hostfwd.
cat >"$root/etc/systemd/system/vmtest-net.service" <<'EOF'
[Unit]
Description=Static address on eth0 (qemu user-mode network)
BindsTo=sys-subsystem-net-devices-eth0.device
After=sys-subsystem-net-devices-eth0.device
Before=network.target network-online.target
Wants=network.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/sbin/ip link set lo up
ExecStart=/sbin/ip link set eth0 up
ExecStart=/sbin/ip addr replace 10.0.2.15/24 dev eth0
ExecStart=/sbin/ip route replace default via 10.0.2.2

[Install]
WantedBy=multi-user.target network-online.target
EOF
chroot "$root" systemctl enable vmtest-net.service >/dev/null 2>&1

# The journal goes to the serial console too (the host keeps it as a log),
# and stays on disk across the reboots the tests provoke.
mkdir -p "$root/etc/systemd/journald.conf.d" "$root/var/log/journal"
cat >"$root/etc/systemd/journald.conf.d/vm.conf" <<EOF
[Journal]
Storage=persistent
ForwardToConsole=yes
TTYPath=/dev/$console
MaxLevelConsole=info
EOF

# No hardware watchdog by default (tests turn it on with a system.conf.d
# drop-in); load the i6300esb driver early so it is there when they do.
# (amd64: the arm64 guest has no hardware watchdog scenario.)
[ "$arch" != amd64 ] || echo i6300esb >"$root/etc/modules-load.d/vmtest.conf"

# Nothing that reaches out or wakes up on its own.
# hvc0 belongs to the backdoor: no getty there. No logind (no sessions).
for u in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service \
  fstrim.timer systemd-timesyncd.service getty@tty1.service serial-getty@hvc0.service \
  systemd-logind.service dpkg-db-backup.timer getty-static.service systemd-networkd.service \
  modprobe@dm_mod.service modprobe@drm.service modprobe@efi_pstore.service modprobe@fuse.service \
  modprobe@loop.service modprobe@configfs.service sys-kernel-debug.mount sys-kernel-tracing.mount \
  dev-hugepages.mount dev-mqueue.mount sys-kernel-config.mount sys-fs-fuse-connections.mount \
  systemd-pcrphase.service systemd-pcrphase-sysinit.service systemd-pstore.service \
  systemd-tmpfiles-clean.timer; do
  ln -sf /dev/null "$root/etc/systemd/system/$u"
done

# The backdoor the host drives the guest through (see guest/backdoor.sh).
install -m 0755 "$here/guest/backdoor.sh" "$root/usr/local/sbin/vmtest-backdoor"
cat >"$root/etc/systemd/system/vmtest-backdoor.service" <<'EOF'
[Unit]
Description=VM test backdoor on /dev/hvc0
Requires=dev-hvc0.device
After=dev-hvc0.device local-fs.target systemd-modules-load.service
DefaultDependencies=no

[Service]
ExecStart=/usr/local/sbin/vmtest-backdoor
Restart=always
RestartSec=1s
KillMode=process

[Install]
WantedBy=multi-user.target
EOF
chroot "$root" systemctl enable vmtest-backdoor.service >/dev/null 2>&1
mkdir -p "$root/mnt/vmtest"

# A small initramfs: just what booting from virtio needs.
cat >"$root/etc/initramfs-tools/conf.d/vmtest.conf" <<'EOF'
MODULES=list
COMPRESS=zstd
EOF
printf '%s\n' virtio_pci virtio_blk virtio_net virtio_console virtio_rng ext4 crc32c_generic >"$root/etc/initramfs-tools/modules"
mount -t proc proc "$root/proc"
mount -t sysfs sys "$root/sys"
kver=$(ls "$root/lib/modules" | sort -V | tail -1)
chroot "$root" update-initramfs -c -k "$kver" >"$build/initramfs.log" 2>&1 \
  || chroot "$root" update-initramfs -u -k "$kver" >>"$build/initramfs.log" 2>&1 \
  || { cat "$build/initramfs.log" >&2; exit 1; }
umount "$root/sys" "$root/proc"

# Keep only the kernel modules a virtio guest needs (and their dependencies):
# a much smaller image, and udev has nothing else to load at boot.
# efivarfs, vfat and its code pages: the uefi-boot scenario's EFI variables
# and ESP.
want="virtio_pci virtio_blk virtio_net virtio_console virtio_rng 9p 9pnet_virtio ext4
  i6300esb crc32c_generic af_packet efivarfs vfat nls_cp437 nls_ascii nls_iso8859_1"
keep=$build/keep-modules
for m in $want; do
  chroot "$root" modprobe -S "$kver" --show-depends "$m" 2>/dev/null | awk '$1 == "insmod" { print $2 }'
done | sort -u >"$keep"
[ -s "$keep" ] || { log "found no kernel modules to keep"; exit 1; }
find "$root/lib/modules/$kver/kernel" -name '*.ko*' | sed "s|^$root||" | sort >"$build/all-modules"
comm -23 "$build/all-modules" "$keep" | sed "s|^|$root|" | xargs rm -f
find "$root/lib/modules/$kver/kernel" -type d -empty -delete
chroot "$root" depmod "$kver"
log "kept $(wc -l <"$keep") kernel modules"

mkdir -p "$build/out"
cp "$root/boot/vmlinuz-$kver" "$build/out/vmlinuz"
cp "$root/boot/initrd.img-$kver" "$build/out/initrd.img"
# The boot loader the uefi-boot scenario puts on its ESP (same version as
# the image's bootctl).
[ "$arch" != amd64 ] || cp "$root/usr/lib/systemd/boot/efi/systemd-bootx64.efi" "$build/out/"
echo "root=/dev/vda rw console=$console,115200 net.ifnames=0 panic=0 quiet loglevel=4 systemd.show_status=1" >"$build/out/cmdline"

# Slim down: documentation, package lists, caches, the kernel copy in /boot.
rm -rf "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
  "$root"/usr/share/locale/* "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* \
  "$root"/boot/* "$root"/var/log/*.log "$root"/debootstrap
: >"$root/etc/machine-id" # generated at first boot

# ---- image ---------------------------------------------------------------
used=$(du -sm "$root" | cut -f1)
size=$((used + used / 3 + 256)) # room for the tests' store paths and journal
log "rootfs ${used} MiB; making a ${size} MiB ext4 image"
truncate -s "${size}M" "$build/root.raw"
mkfs.ext4 -q -F -L vmroot -E root_owner=0:0 -d "$root" "$build/root.raw" >"$build/mkfs.log" 2>&1 \
  || { cat "$build/mkfs.log" >&2; exit 1; }
qemu-img convert -O qcow2 "$build/root.raw" "$build/out/disk.qcow2"
rm -f "$build/root.raw"
date -u +%FT%TZ >"$build/out/ok"

# Only this architecture's older images (base-<16 hex> or base-arm64-<16 hex>).
rm -rf "$cache/$prefix"????????????????
mv "$build/out" "$out"
log "image ready in $(($(date +%s) - t0)) s: $out ($(du -sh "$out" | cut -f1))"
echo "$out"
