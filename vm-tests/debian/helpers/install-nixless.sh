#!/bin/bash
# Guest side: installs nixless from the host's share (/mnt/vmtest) the way a
# non-NixOS host would: the static binary, the unit files rendered from
# nixos/units.json, the agent config, the scenario's drop-ins, and a fake
# NixOS boot loader (fake-boot.service sets /run/booted-system at boot).
# Enables the agent and the path unit (so they come back after a reboot),
# starts only the path unit.
set -euo pipefail
S=/mnt/vmtest
install -D -m 0755 "$S/nixless" /usr/local/bin/nixless
install -D -m 0600 "$S/agent.json" /etc/nixless/agent.json
install -m 0644 "$S"/units/* /etc/systemd/system/
if [ -d "$S/etc" ]; then cp -r "$S/etc/." /etc/; fi
install -m 0755 "$S/helpers/fake-boot.sh" /usr/local/sbin/fake-boot
cat >/etc/systemd/system/fake-boot.service <<'UNIT'
[Unit]
Description=Fake NixOS boot loader: /run/booted-system
DefaultDependencies=no
After=local-fs.target
Before=sysinit.target nixless-agent.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/fake-boot

[Install]
WantedBy=sysinit.target
UNIT
mkdir -p /nix/store /nix/var/nix/profiles /nix/var/nix/gcroots /var/lib/nixless
chmod 0700 /var/lib/nixless
# Unit files that systemd itself finds fault with fail here.
verify=$(systemd-analyze verify /etc/systemd/system/nixless-agent.service \
  /etc/systemd/system/nixless-switch.service /etc/systemd/system/nixless-switch.path 2>&1 || true)
if [ -n "$verify" ]; then
  echo "systemd-analyze verify:"
  echo "$verify"
  if echo "$verify" | grep -qiE 'fail|error|invalid|unknown (key|section)|bad'; then exit 1; fi
fi
systemctl daemon-reload
systemctl enable -q fake-boot.service nixless-switch.path nixless-agent.service
systemctl start nixless-switch.path
