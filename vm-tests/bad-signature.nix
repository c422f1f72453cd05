# Refusals: deploy documents that are not signed by a trusted deploy key, or
# were changed after signing, are answered 401 before anything else happens:
# nothing is fetched, nothing switched, no sequence number consumed. Then the
# untouched document is accepted, so the refusals were not an agent that
# refuses everything.
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
  name = "bad-signature";

  next = {
    environment.etc."nixless-test/generation".text = "2";
  };

  testScript = ''
    def sign(out: str, key: str = "deploy", host: str = "device") -> str:
        """Writes a deploy document for NEXT to `out` and its signature to `out`.sig."""
        cache.succeed(
            f"nixless deploy --key {KEYS}/{key}.sec --host {host} --system {NEXT} --out {out}"
        )
        return out


    def post(doc: str, signed: bool = True) -> str:
        """POSTs a document (with the signature beside it); the HTTP status."""
        header = f"-H \"Nixless-Signature: $(cat {doc}.sig)\" " if signed else ""
        return cache.succeed(
            f"curl -s -o /dev/null -w '%{{http_code}}' -X POST {header}"
            f"--data-binary @{doc} {AGENT}/v1/deploy"
        ).strip()


    before = status()
    profile_before = device.execute("readlink -f /nix/var/nix/profiles/system")[1]
    # Everything is in the cache: a refusal cannot be "nothing to fetch".
    publish(NEXT)

    with subtest("a key that is not trusted, under a trusted key's name: 401"):
        assert post(sign("/tmp/evil.json", key="evil")) == "401"
        out = cache.fail(deploy_cmd(NEXT, key="evil") + " 2>&1")
        assert "401" in out, out

    with subtest("a signed document changed after signing: 401"):
        sign("/tmp/good.json")
        cache.succeed("cp /tmp/good.json /tmp/changed.json")
        cache.succeed("cp /tmp/good.json.sig /tmp/changed.json.sig")
        cache.succeed("sed -i 's/\"action\":\"switch\"/\"action\":\"boot\"/' /tmp/changed.json")
        cache.fail("cmp -s /tmp/good.json /tmp/changed.json")
        assert post("/tmp/changed.json") == "401"

    with subtest("no signature at all: 401"):
        assert post("/tmp/good.json", signed=False) == "401"

    with subtest("well signed, but for another host: 403"):
        assert post(sign("/tmp/other.json", host="kiosk-9")) == "403"

    with subtest("nothing changed on the device, nothing was fetched"):
        s = status()
        assert s["phase"] == "idle", s
        assert s["highest_seq"] == before["highest_seq"], s
        assert s["last_result"] is None, s
        assert resolve("/run/current-system") == FIRST
        assert device.execute("readlink -f /nix/var/nix/profiles/system")[1] == profile_before
        assert device_file("/etc/nixless-test/generation") == "1"
        device.fail(f"test -e {NEXT}")
        cache.fail("grep -q narinfo /var/log/nginx/cache-access.log")

    with subtest("the untouched document is accepted and carried out"):
        assert post("/tmp/good.json") == "202"
        device.wait_until_succeeds(
            "curl -sf http://localhost:8731/v1/status | grep -q '\"outcome\":\"committed\"'",
            timeout=900,
        )
        assert resolve("/run/current-system") == NEXT
        assert device_file("/etc/nixless-test/generation") == "2"
  '';
}
