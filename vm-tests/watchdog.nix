# The service watchdog: a running agent pings systemd (WatchdogSec=30s) from
# its event loop; one that stops answering (here: SIGSTOP) is aborted and
# restarted by systemd (Restart=always) and serves again.
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
  name = "watchdog";

  testScript = ''
    def nrestarts() -> int:
        return int(device.succeed("systemctl show -P NRestarts nixless-agent.service").strip())


    with subtest("a healthy agent keeps pinging the watchdog"):
        # more than two WatchdogSec periods
        device.sleep(70)
        assert nrestarts() == 0
        device.succeed("systemctl is-active nixless-agent.service")

    with subtest("a frozen agent is aborted and restarted"):
        pid = device.succeed("systemctl show -P MainPID nixless-agent.service").strip()
        device.succeed(f"kill -STOP {pid}")
        device.wait_until_succeeds(
            "test $(systemctl show -P NRestarts nixless-agent.service) -ge 1", timeout=300
        )
        device.succeed("journalctl -b -u nixless-agent.service | grep -qi 'watchdog timeout'")
        device.wait_until_succeeds("curl -sf http://localhost:8731/v1/status", timeout=60)
        assert device.succeed("systemctl show -P MainPID nixless-agent.service").strip() != pid
        assert status()["phase"] == "idle"
        assert nrestarts() == 1
  '';
}
