# Fake NixOS systems for the switch tests: each is a store path with a
# bin/switch-to-configuration that records its calls and behaves as the
# test tells it at run time (through files in $FAKE_NIXOS_DIR), so a few
# builds cover every failure mode:
#   $FAKE_NIXOS_DIR/calls                 "<name> <action>" per call
#   $FAKE_NIXOS_DIR/behaviour-<name>      ok | fail2 | exit4 | exit100 | hang | slow | unhealthy | bootfail | kill-agent
#                                         | daemon (leaves `sleep 300` holding stdout, its pid in daemon.pids)
#                                         | hang-fork (forks `sleep 3600`, pid in grandchild.pids, and waits)
#                                         | hang-lists (records units to start in $FAKE_NIXOS_ROOT/run/nixos/*-list,
#                                           as switch-to-configuration does before acting, and hangs)
#                                         | inhibited (test/switch refused by system.switch.inhibitors, verbatim)
#   $FAKE_NIXOS_ROOT/run/nixos/*-list     units an interrupted run left: every test/switch resumes them
#                                         first, as switch-to-configuration does, and as they are not
#                                         this system's units, fails (exit 4)
#   $FAKE_NIXOS_DIR/agent.pid             the agent kill-agent kills (self-update: the switch restarts it)
#   $FAKE_NIXOS_DIR/current               name of the system last activated
#   $FAKE_NIXOS_DIR/boot-default          name of the system last made the boot default
#   $FAKE_NIXOS_DIR/unhealthy             exists while an "unhealthy" system runs
#   $FAKE_NIXOS_ROOT/run/current-system   symlink to the active system, as NixOS keeps it
{ salt ? "" }:
let
  sh = "/bin/sh";
  # A dependency, so each system has a closure of more than one path.
  lib = name: derivation {
    name = "nixless-fake-lib-${name}";
    system = "x86_64-linux";
    builder = sh;
    inherit salt;
    args = [ "-c" "export PATH=/usr/bin:/bin; mkdir -p $out/lib; echo 'lib ${name}' > $out/lib/libfake.so" ];
  };
  fakeSystem = name: derivation {
    name = "nixless-fake-system-${name}";
    system = "x86_64-linux";
    builder = sh;
    inherit salt;
    dep = lib name;
    script = ''
      #!/bin/sh
      name=${name}
      action="$1"
      self=$(cd "$(dirname "$0")/.." && pwd -P)
      d="''${FAKE_NIXOS_DIR:?}"
      echo "$name $action" >> "$d/calls"
      b=$(cat "$d/behaviour-$name" 2>/dev/null || echo ok)
      echo "switch-to-configuration $action of $name ($b)"
      lists="''${FAKE_NIXOS_ROOT:-/nonexistent}/run/nixos"
      if [ "$action" = test ] || [ "$action" = switch ]; then
        # nixpkgs' pre-switch check (switchable-system.nix), then
        # switch-to-configuration's "Pre-switch checks failed" and exit 1.
        if [ "$b" = inhibited ] && [ "''${NIXOS_NO_CHECK:-}" != 1 ]; then
          echo "Checking switch inhibitors..."
          echo "There are changes to critical components of the system:"
          echo
          echo "systemd : /nix/store/00000000000000000000000000000000-systemd-256 -> $self-systemd-257"
          echo
          echo "Switching into this system is not recommended."
          echo "You probably want to run 'nixos-rebuild boot' and reboot your system instead."
          echo
          echo "If you really want to switch into this configuration directly, then"
          echo "you can set NIXOS_NO_CHECK=1 to ignore pre-switch checks."
          echo
          echo "WARNING: doing so might cause the switch to fail or your system to become unstable."
          echo
          echo "Pre-switch check 'switchInhibitors' failed"
          echo "Pre-switch checks failed"
          exit 1
        fi
        left=$(cat "$lists/start-list" "$lists/restart-list" "$lists/reload-list" \
          "$lists/activation-restart-list" "$lists/activation-reload-list" 2>/dev/null | sort -u | tr '\n' ' ')
        if [ -n "$left" ]; then
          echo "Failed to start $left(left by an interrupted switch)"
          exit 4
        fi
        case "$b" in
          hang-lists)
            mkdir -p "$lists"
            echo "$name-only.service" >> "$lists/start-list"
            echo "$name-daemon.service" >> "$lists/restart-list"
            echo "$name-daemon.service" >> "$lists/activation-restart-list"
            echo "recorded the units to start; hanging"
            sleep 3600 ;;
          fail2) echo "error: activation script snippet 'etc' failed"; exit 2 ;;
          exit4) echo "warning: the following units failed: broken.service"; exit 4 ;;
          exit100) echo "a reboot is required"; exit 100 ;;
          hang) sleep 3600 ;;
          slow) sleep 3 ;;
          kill-agent) kill -9 "$(cat "$d/agent.pid")"; sleep 1 ;;
          daemon) sleep 300 & echo $! >> "$d/daemon.pids" ;;
          hang-fork) sleep 3600 & echo $! >> "$d/grandchild.pids"; wait; exit 0 ;;
        esac
        echo "$name" > "$d/current"
        if [ "$b" = unhealthy ]; then touch "$d/unhealthy"; else rm -f "$d/unhealthy"; fi
        if [ -n "''${FAKE_NIXOS_ROOT:-}" ]; then
          mkdir -p "$FAKE_NIXOS_ROOT/run"
          ln -sfn "/nix/store/$(basename "$self")" "$FAKE_NIXOS_ROOT/run/current-system"
        fi
      fi
      if [ "$action" = boot ] || [ "$action" = switch ]; then
        [ "$b" = bootfail ] && { echo "error: installing the boot loader failed"; exit 1; }
        echo "$name" > "$d/boot-default"
      fi
      exit 0
    '';
    passAsFile = [ "script" ];
    args = [ "-c" ''
      export PATH=/usr/bin:/bin
      mkdir -p $out/bin
      cp $scriptPath $out/bin/switch-to-configuration
      chmod 555 $out/bin/switch-to-configuration
      echo ${name} > $out/nixos-version
      ln -s $dep $out/lib
    '' ];
  };
in
{
  a = fakeSystem "a";
  b = fakeSystem "b";
  c = fakeSystem "c";
}
