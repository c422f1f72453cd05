# A fake NixOS "system" for the Debian VM tests: a store path with
# bin/switch-to-configuration (helpers/fake-switch.sh, a /bin/sh script run
# by nixless-switch.service in the guest) and a generation number. No
# nixpkgs: built with the host's /bin/sh (needs `sandbox = false`).
#
#   nix-build fake-system.nix --argstr gen 2 --argstr behaviour ok
#
# behaviour: "ok"   test/switch restart the agent with a new drop-in
#                   (the agent's self-update); boot records the default
#            "hang" test additionally makes the machine hang hard a few
#                   seconds later (a kernel panic with panic=0: only the
#                   hardware watchdog gets it back)
#            "hang-lists" test records a unit of its own in /run/nixos/*-list,
#                   as switch-to-configuration does before acting, starts it
#                   and hangs until killed (the switch timeout)
#            "boot-hang" the generation hangs when it boots: its kernel
#                   parameters carry nixless.vmtest.hang, which makes
#                   vmtest-boot-hang.service (uefi-boot scenario) panic the
#                   kernel once the hardware watchdog is armed
#
# For booting it through a real boot loader (the uefi-boot scenario) a
# system also has what NixOS's systemd-boot builder reads: `init` (here it
# just starts the guest's systemd), `kernel-params` (kernelParams), and
# bin/install-bootloader (helpers/sd-boot-builder.sh), which
# switch-to-configuration boot runs when an ESP with systemd-boot is mounted
# at /boot. bootCountingTries: boot.loader.systemd-boot.bootCounting.tries
# ("" = boot counting off).
#
# The store path holds only /bin/sh scripts and text, so the same path
# serves the x86_64 and the arm64 guest: it is built for the host's own
# system (an aarch64-linux derivation could not be built on an x86_64 host
# without binfmt_misc), and nothing in it depends on the guest's
# architecture.
{ gen, behaviour ? "ok", salt ? "", kernelParams ? "", bootCountingTries ? "" }:
derivation {
  name = "nixless-vmtest-system-${gen}";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  inherit gen behaviour salt bootCountingTries;
  kernelParams = kernelParams + (if behaviour == "boot-hang" then " nixless.vmtest.hang" else "");
  script = builtins.readFile ./helpers/fake-switch.sh;
  builderScript = builtins.readFile ./helpers/sd-boot-builder.sh;
  args = [
    "-c"
    ''
      set -e
      export PATH=/usr/bin:/bin
      mkdir -p $out/bin
      echo "$gen" > $out/generation
      printf '%s' "$script" | sed -e "s|@out@|$out|g" -e "s|@gen@|$gen|g" -e "s|@behaviour@|$behaviour|g" \
        > $out/bin/switch-to-configuration
      chmod 0555 $out/bin/switch-to-configuration
      printf '%s' "$builderScript" | sed -e "s|@tries@|$bootCountingTries|g" > $out/bin/install-bootloader
      chmod 0555 $out/bin/install-bootloader
      printf '%s\n' "$kernelParams" > $out/kernel-params
      printf '#!/bin/sh\n# NixOS stage 2 would activate %s here.\nexec /lib/systemd/systemd "$@"\n' "$out" > $out/init
      chmod 0555 $out/init
    ''
  ];
}
