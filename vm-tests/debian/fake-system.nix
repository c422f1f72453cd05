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
{ gen, behaviour ? "ok", salt ? "" }:
derivation {
  name = "nixless-vmtest-system-${gen}";
  system = "x86_64-linux";
  builder = "/bin/sh";
  inherit gen behaviour salt;
  script = builtins.readFile ./helpers/fake-switch.sh;
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
    ''
  ];
}
