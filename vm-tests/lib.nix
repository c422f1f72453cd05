# What the VM tests share: the two machines, the test keys and a Python
# prelude. Not a test itself; each vm-tests/<name>.nix calls `mkTest`.
#
#   cache   plays CI and the admin: nginx serves a binary cache under
#           /srv/cache; `publish(path)` pushes a closure to it with
#           `nix copy`, narinfos signed with the test cache key; `nixless
#           deploy` signs deploy documents with the test deploy key.
#   device  a NixOS machine with nix.enable = false running nixless, its
#           store holding only its own closure (virtualisation.useNixStoreImage),
#           so whatever a deploy needs really has to come from the cache.
#
# The keys under ./keys are test-only (nix-store --generate-binary-cache-key);
# evil.sec is a different key under the trusted deploy key's name.
{
  pkgs,
  nixlessModule,
  nixlessPackage,
}:

let
  inherit (pkgs) lib;

  publicKey = name: lib.fileContents (./keys + "/${name}.pub");

  device =
    { lib, pkgs, ... }:
    {
      imports = [ nixlessModule ];

      nix.enable = false;

      # Only this machine's closure in its store, not the host's whole store
      # over 9p; writable (an overlay) so that nixless can install into it.
      virtualisation.useNixStoreImage = true;
      virtualisation.writableStore = true;

      # Booted straight into its kernel: no boot loader to install, so
      # `switch-to-configuration boot` only warns, as on an ISO.
      boot.loader.grub.enable = false;

      # nixpkgs' test nodes leave switch-to-configuration out of their
      # systems unless they have specialisations
      # (nixos/lib/testing/nixos-test-base.nix, key
      # "no-switch-to-configuration", a mkDefault); nixless switches with it,
      # and the module asserts it is there.
      system.switch.enable = true;

      environment.etc."nixless-test/generation".text = lib.mkDefault "1";
      environment.systemPackages = [ pkgs.curl ];

      services.nixless = {
        enable = true;
        caches = [ "http://cache" ];
        cacheKeys = [ (publicKey "cache") ];
        deployKeys = [ (publicKey "deploy") ];
        openFirewall = true;
        health.timeoutSecs = 30;
      };
    };

  cache =
    { nodes, pkgs, ... }:
    {
      services.nginx = {
        enable = true;
        virtualHosts.cache = {
          default = true;
          root = "/srv/cache";
          extraConfig = "access_log /var/log/nginx/cache-access.log;";
        };
      };
      networking.firewall.allowedTCPPorts = [ 80 ];
      systemd.tmpfiles.rules = [ "d /srv/cache 0755 root root - -" ];

      nix.settings.experimental-features = [ "nix-command" ];
      environment.systemPackages = [
        nixlessPackage
        pkgs.curl
      ];
      environment.etc = {
        "nixless-test/cache.sec".source = ./keys/cache.sec;
        "nixless-test/deploy.sec".source = ./keys/deploy.sec;
        "nixless-test/evil.sec".source = ./keys/evil.sec;
      };

      # `nix copy` pushes only valid paths: register the next system (and
      # its closure) in this machine's Nix database.
      virtualisation.additionalPaths = [ nodes.device.system.build.nixlessNext ];
      # The whole closure of a system, compressed, lands in /srv/cache.
      virtualisation.diskSize = 4096;
    };

  # NEXT's store path as plain text, without its string context. nixpkgs
  # copies whatever a test script refers to into the store image of every
  # node with useNixStoreImage (nixos/lib/testing/testScript.nix:
  # virtualisation.additionalPaths gets writeStringReferencesToFile of the
  # script when includeTestScriptReferences, default true): with the
  # context, the device would boot with NEXT's closure already in its store
  # and fetch nothing. The cache node's additionalPaths still makes NEXT a
  # build input of the test, and the prelude checks the device lacks it.
  nextPath = nodes: builtins.unsafeDiscardStringContext nodes.device.system.build.nixlessNext.outPath;

  # Helpers every test script starts with. FIRST is the generation the
  # device boots, NEXT the one the test deploys (when there is one).
  prelude =
    { nodes, withCache }:
    ''
      import json

      FIRST = "${nodes.device.system.build.toplevel}"
      AGENT = "http://device:8731"
      KEYS = "/etc/nixless-test"


      def status() -> dict:
          """The agent's GET /v1/status."""
          return json.loads(device.succeed("curl -sf http://localhost:8731/v1/status"))


      def device_file(path: str) -> str:
          return device.succeed(f"cat {path}").strip()


      def resolve(path: str) -> str:
          return device.succeed(f"readlink -f {path}").strip()


      start_all()
      device.wait_for_unit("nixless-agent.service")
      device.wait_for_open_port(8731)
      device.wait_until_succeeds("curl -sf http://localhost:8731/v1/status")
      assert resolve("/run/current-system") == FIRST
    ''
    + lib.optionalString withCache ''
      NEXT = "${nextPath nodes}"


      def publish(path: str) -> None:
          """CI's part: push a closure to the cache, narinfos signed by the cache key."""
          cache.succeed(
              "nix copy --to 'file:///srv/cache?compression=zstd&secret-key="
              + KEYS
              + "/cache.sec' "
              + path
          )


      def deploy_cmd(system: str, key: str = "deploy") -> str:
          """The admin's part: sign a deploy document, send it, follow it to its end."""
          return (
              f"nixless deploy --key {KEYS}/{key}.sec --host device"
              f" --system {system} --agent {AGENT} --timeout 900"
          )


      cache.wait_for_unit("nginx.service")
      cache.wait_for_open_port(80)
      cache.wait_until_succeeds(f"curl -sf {AGENT}/v1/status")
      # The device does not have the next generation until it fetches it.
      device.fail(f"test -e {NEXT}")
    '';
in
{
  inherit device cache;

  # A test for pkgs.testers.runNixOSTest.
  #   next:       a module: what the deployed generation adds to the device's
  #               configuration; null for tests that deploy nothing (no
  #               cache machine then).
  #   testScript: Python, run after the prelude.
  mkTest =
    {
      name,
      next ? null,
      testScript,
    }:
    let
      withCache = next != null;
    in
    {
      name = "nixless-${name}";

      nodes =
        {
          device =
            { extendModules, ... }:
            {
              imports = [ device ];
            }
            // lib.optionalAttrs withCache {
              # The next generation: this very node's configuration plus
              # `next`, evaluated with extendModules (as specialisations are),
              # so it keeps the VM's file systems, network and test
              # instrumentation, but it is not part of the device's closure.
              system.build.nixlessNext = (extendModules { modules = [ next ]; }).config.system.build.toplevel;
            };
        }
        // lib.optionalAttrs withCache { inherit cache; };

      testScript =
        { nodes, ... }:
        prelude { inherit nodes withCache; } + "\n" + testScript;
    };
}
