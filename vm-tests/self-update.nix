# Self-update: the next generation changes the agent's own unit, so
# switch-to-configuration stops and restarts the agent in the middle of the
# switch it asked for. The switch runs in nixless-switch.service (never
# restarted by a switch), the restarted agent picks the update up from its
# persisted state, verifies and commits it.
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
  name = "self-update";

  # A new agent unit, as a new nixless package or agent config would give.
  next = {
    environment.etc."nixless-test/generation".text = "2";
    systemd.services.nixless-agent.environment.NIXLESS_TEST_GENERATION = "2";
  };

  testScript = ''
    def invocation() -> str:
        return device.succeed("systemctl show -P InvocationID nixless-agent.service").strip()


    first_invocation = invocation()

    with subtest("the next generation is published and deployed"):
        publish(NEXT)
        # `nixless deploy` follows the status across the agent's restart.
        cache.succeed(deploy_cmd(NEXT))

    with subtest("the switch restarted the agent into its new unit"):
        assert invocation() != first_invocation
        device.succeed(
            "systemctl show -P Environment nixless-agent.service"
            " | grep -q NIXLESS_TEST_GENERATION=2"
        )
        # switch-to-configuration (run by the helper) stopped and started it
        device.succeed(
            "journalctl -b -u nixless-switch.service"
            " | grep -q 'stopping the following units:.*nixless-agent.service'"
        )

    with subtest("the switch helper itself was never stopped or restarted"):
        device.fail(
            "journalctl -b -u nixless-switch.service"
            " | grep -q 'stopping the following units:.*nixless-switch.service'"
        )
        assert device.succeed("systemctl show -P Result nixless-switch.service").strip() == "success"

    with subtest("the update is committed"):
        s = status()
        assert s["last_result"]["outcome"] == "committed", s
        assert s["current_system"] == NEXT, s
        assert s["profile_system"] == NEXT, s
        assert device_file("/etc/nixless-test/generation") == "2"
        device.succeed("systemctl is-active nixless-agent.service")
  '';
}
