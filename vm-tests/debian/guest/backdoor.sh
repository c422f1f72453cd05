#!/bin/bash
# Guest side of the VM test driver (baked into the base image; run by
# vmtest-backdoor.service on every boot). It talks to the host over the
# virtio console /dev/hvc0, one line per message:
#
#   guest -> host  VMTEST-BACKDOOR-READY <boot_id>        once per start
#   host  -> guest <timeout-secs> <base64 of a bash script>
#   guest -> host  VMTEST-RESULT <exit code> <base64 of stdout+stderr>
#
# Commands run one at a time as root with bash, stdin from /dev/null, under
# `timeout` (exit 124 when it fires). Output is capped at 1 MiB.
set -u
port=/dev/hvc0
exec 0<"$port" 1>"$port" 2>/dev/null
stty raw -echo <"$port" 2>/dev/null || true

# The host's files (binary, units, configs, caches): a read-only 9p share.
if ! mountpoint -q /mnt/vmtest; then
  modprobe 9pnet_virtio 2>/dev/null || true
  mkdir -p /mnt/vmtest
  mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=none,msize=262144 vmtest /mnt/vmtest 2>/dev/null || true
fi

work=/run/vmtest-backdoor
mkdir -p "$work"
printf '\nVMTEST-BACKDOOR-READY %s\n' "$(cat /proc/sys/kernel/random/boot_id)"
while IFS=' ' read -r t b64; do
  case $t in ''|*[!0-9]*) continue ;; esac
  printf '%s' "$b64" | base64 -d >"$work/cmd" 2>/dev/null || { printf 'VMTEST-RESULT 125 %s\n' "$(echo 'bad base64' | base64 -w0)"; continue; }
  ( cd /root && exec timeout -k 5 "$t" bash "$work/cmd" ) </dev/null >"$work/out" 2>&1 3>&- 
  rc=$?
  printf 'VMTEST-RESULT %s %s\n' "$rc" "$(head -c 1048576 "$work/out" | base64 -w0)"
done
