# A generation that switches cleanly but is not healthy: the application it
# ships never becomes active. The agent (restarted by the switch, since the
# new generation changes its config) runs the new generation's health checks
# until the deadline, then switches back to the first generation and records
# the update as rolled back. Nothing is committed.
{
  pkgs,
  nixlessModule,
  nixlessPackage,
  ...
}:

let
  common = import ./lib.nix { inherit pkgs nixlessModule nixlessPackage; };
in
common.mkTest {
  name = "health-rollback";

  next =
    { pkgs, ... }:
    {
      environment.etc."nixless-test/generation".text = "2";

      # The application never starts: its condition fails, as a missing data
      # file would make it. switch-to-configuration still exits 0 (a skipped
      # unit is not a failed one), so only the health check can tell.
      systemd.services.kiosk-app = {
        wantedBy = [ "multi-user.target" ];
        unitConfig.ConditionPathExists = "/var/lib/kiosk-app/ready";
        serviceConfig.ExecStart = "${pkgs.coreutils}/bin/sleep infinity";
      };

      # The new generation's own definition of healthy.
      services.nixless.health.units = [ "kiosk-app.service" ];
    };

  testScript = ''
    profile_before = device.execute("readlink -f /nix/var/nix/profiles/system")[1]

    with subtest("the unhealthy generation is published and deployed"):
        publish(NEXT)
        out = cache.fail(deploy_cmd(NEXT) + " 2>&1")
        assert "rolled-back" in out, out

    with subtest("the status says rolled back, and why"):
        s = status()
        assert s["phase"] == "idle", s
        assert s["last_result"]["outcome"] == "rolled-back", s
        assert "health" in s["last_result"]["reason"], s
        assert s["current_system"] == FIRST, s

    with subtest("the device runs the first generation again"):
        assert resolve("/run/current-system") == FIRST
        assert device_file("/etc/nixless-test/generation") == "1"
        device.fail("systemctl cat kiosk-app.service")
        device.succeed("systemctl is-active nixless-agent.service")

    with subtest("nothing was committed"):
        assert device.execute("readlink -f /nix/var/nix/profiles/system")[1] == profile_before
        links = device.succeed(
            "find /nix/var/nix/profiles -maxdepth 1 -type l -exec readlink -f {} +"
        )
        assert NEXT not in links.split(), links
  '';
}
