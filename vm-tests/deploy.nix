# Deploy and switch: CI publishes the next generation to the cache, the admin
# sends a signed deploy document, the device fetches what it lacks, switches
# to it, finds it healthy and commits it (system-N-link, profile, boot entry).
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
  name = "deploy";

  # The next generation differs from the running one by one file in /etc.
  next = {
    environment.etc."nixless-test/generation".text = "2";
  };

  testScript = ''
    import re

    with subtest("the device runs the first generation and is idle"):
        assert device_file("/etc/nixless-test/generation") == "1"
        s = status()
        assert s["phase"] == "idle" and s["last_result"] is None, s
        assert s["current_system"] == FIRST, s

    with subtest("CI publishes the next generation, the admin deploys it"):
        publish(NEXT)
        cache.succeed(deploy_cmd(NEXT))

    with subtest("the device runs the next generation"):
        assert device_file("/etc/nixless-test/generation") == "2"
        assert resolve("/run/current-system") == NEXT

    with subtest("it is committed: profile link, status"):
        link = device.succeed("readlink /nix/var/nix/profiles/system").strip()
        assert re.fullmatch(r"system-[0-9]+-link", link), link
        assert resolve("/nix/var/nix/profiles/system") == NEXT
        s = status()
        assert s["phase"] == "idle", s
        assert s["last_result"]["outcome"] == "committed", s
        assert s["current_system"] == NEXT, s
        assert s["profile_system"] == NEXT, s
        # `nixless status`, as the admin sees it
        cache.succeed(f"nixless status {AGENT} | grep -q committed")

    with subtest("what was fetched came from the cache, is recorded and verifies"):
        cache.succeed("grep -q 'GET /.*[.]narinfo' /var/log/nginx/cache-access.log")
        base = NEXT.removeprefix("/nix/store/")
        device.succeed(f"test -s /var/lib/nixless/paths/{base}")
        device.succeed(f"nixless verify {NEXT}")

    with subtest("a document with an older sequence number is refused"):
        out = cache.fail(deploy_cmd(FIRST) + " --seq 1 2>&1")
        assert "409" in out, out
        assert resolve("/run/current-system") == NEXT
  '';
}
