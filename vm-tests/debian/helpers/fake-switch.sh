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
# Like the real one, test|switch hold /run/nixos/switch-to-configuration.lock
# and resume the units an interrupted run recorded in /run/nixos/*-list: this
# system's `etc` replaces other generations' units first, so another
# generation's units fail to start (exit 4). Behaviour "hang-lists": test
# installs and starts a unit of its own, records it in the lists as the real
# one does before acting, and hangs (a forked `sleep 3601`) until killed.
# Every run is logged to /var/lib/fake-nixos/log with the cgroup it ran in
# and the units it found left over (left=…).
set -eu
out=@out@
gen=@gen@
behaviour=@behaviour@
action=${1:-}
state=/var/lib/fake-nixos
mkdir -p "$state"
cg=$(cut -d: -f3 /proc/self/cgroup | head -1)
lists=/run/nixos
left=none
case $action in
  test|switch)
    mkdir -p "$lists"
    exec 9>>"$lists/switch-to-configuration.lock"
    flock -n 9 || { echo "Could not acquire lock"; exit 1; }
    left=$(cat "$lists/start-list" "$lists/restart-list" "$lists/reload-list" "$lists/activation-restart-list" \
      "$lists/activation-reload-list" 2>/dev/null | sort -u | paste -sd, -)
    left=${left:-none}
    ;;
esac
echo "$(date +%s) gen=$gen action=$action cgroup=$cg left=$left" >>"$state/log"
# Durable before anything else: the hw-watchdog scenario panics the kernel
# 5 s later, before ext4's commit interval would have written it.
sync "$state/log" "$state"
echo "fake switch-to-configuration: generation $gen, $action (cgroup $cg)"

case $action in
  test|switch)
    # This generation's "etc": no other generation's units.
    for u in /run/systemd/system/vmtest-gen*-only.service; do
      if [ -e "$u" ] && [ "$u" != "/run/systemd/system/vmtest-gen$gen-only.service" ]; then rm -f "$u"; fi
    done
    if [ "$behaviour" = hang-lists ]; then
      printf '[Service]\nExecStart=/bin/sleep infinity\n' >"/run/systemd/system/vmtest-gen$gen-only.service"
      systemctl daemon-reload
      echo "vmtest-gen$gen-only.service" >>"$lists/start-list"
      echo "nixless-agent.service" >>"$lists/restart-list"
      systemctl start "vmtest-gen$gen-only.service"
      echo "started vmtest-gen$gen-only.service; hanging until killed"
      sleep 3601 &
      echo $! >"$state/hang.pid"
      wait
      exit 0
    fi
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
if [ "$left" != none ]; then
  # Resumed after this generation's units were loaded, as the real one does.
  systemctl daemon-reload
  failed=0
  for u in $(echo "$left" | tr , ' '); do
    systemctl start "$u" || { echo "Failed to start $u"; failed=1; }
  done
  rm -f "$lists/start-list" "$lists/restart-list" "$lists/reload-list" "$lists/activation-restart-list" \
    "$lists/activation-reload-list"
  [ "$failed" = 0 ] || exit 4
fi
case $action in
  test|switch|boot|dry-activate) exit 0 ;;
  *) echo "unknown action $action" >&2; exit 1 ;;
esac
