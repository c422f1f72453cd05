#!/bin/sh
# bin/switch-to-configuration of a fake system (see ../fake-system.nix).
# Emulates what NixOS's does, on a Debian guest:
#   test|switch  record the run, point /run/current-system here, install this
#                generation's drop-in for nixless-agent.service and restart
#                the agent (as a real switch does when the agent changed:
#                this is the agent's self-update)
#   boot|switch  make this system the "boot loader" default
#                (/var/lib/fake-boot/default, read at boot by fake-boot.sh);
#                with systemd-boot on /boot, also write its entries and
#                loader.conf (bin/install-bootloader)
# Every run is logged to /var/lib/fake-nixos/log with the cgroup it ran in.
set -eu
out=@out@
gen=@gen@
behaviour=@behaviour@
action=${1:-}
state=/var/lib/fake-nixos
mkdir -p "$state"
cg=$(cut -d: -f3 /proc/self/cgroup | head -1)
echo "$(date +%s) gen=$gen action=$action cgroup=$cg" >>"$state/log"
# On disk now: a "hang" system panics the kernel seconds later, and ext4
# would lose a line still in the page cache (the hw-watchdog check reads it).
sync "$state/log"
echo "fake switch-to-configuration: generation $gen, $action (cgroup $cg)"

case $action in
  test|switch)
    ln -sfn "$out" /run/current-system
    mkdir -p /run/systemd/system/nixless-agent.service.d
    printf '[Service]\nEnvironment=NIXLESS_VMTEST_GENERATION=%s\n' "$gen" \
      >/run/systemd/system/nixless-agent.service.d/generation.conf
    systemctl daemon-reload
    echo "restarting nixless-agent.service"
    systemctl restart nixless-agent.service
    if [ "$behaviour" = hang ]; then
      # A bad update that hangs the machine while the agent verifies it.
      systemd-run --no-block --unit=vmtest-bad-update --collect \
        /bin/sh -c 'sleep 5; echo "vmtest: hanging the machine" >/dev/kmsg; echo c >/proc/sysrq-trigger'
    fi
    ;;
esac
case $action in
  boot|switch)
    # A real boot loader (the uefi-boot scenario: systemd-boot on an ESP at
    # /boot): install it as NixOS does, through the system's builder.
    if [ -d /boot/loader ]; then
      "$out/bin/install-bootloader" "$out"
    fi
    mkdir -p /var/lib/fake-boot
    echo "$out" >/var/lib/fake-boot/default.tmp
    sync /var/lib/fake-boot/default.tmp
    mv /var/lib/fake-boot/default.tmp /var/lib/fake-boot/default
    ;;
esac
case $action in
  test|switch|boot|dry-activate) exit 0 ;;
  *) echo "unknown action $action" >&2; exit 1 ;;
esac
