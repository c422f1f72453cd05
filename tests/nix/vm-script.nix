# Checks what vm-tests/lib.nix hands nixpkgs' test framework, without
# nixpkgs: the test script must name the next generation (NEXT) only as text.
# nixos/lib/testing/testScript.nix puts every store path the script carries
# in its string context into the store image of each useNixStoreImage node
# (virtualisation.additionalPaths, includeTestScriptReferences defaults to
# true): with NEXT in the context the device would boot already holding the
# deploy and fetch nothing. Also checks that the cache node still depends on
# NEXT (so it is built and registered there) and that the device keeps
# switch-to-configuration (nixos-test-base.nix turns it off by default).
#
#   nix-instantiate --eval --strict --json -E 'import tests/nix/vm-script.nix { }'
# gives { cases = N; failures = [ ... ]; }.
{
  lib-nix ? ../../vm-tests/lib.nix,
}:
let
  stub = import ./stub-lib.nix;
  lib = stub // {
    optionalString = cond: s: if cond then s else "";
    optionalAttrs = cond: set: if cond then set else { };
    fileContents = path: builtins.readFile path;
  };

  # Derivations only to carry string context; never built (--eval).
  fake =
    name:
    derivation {
      inherit name;
      system = "x86_64-linux";
      builder = "/bin/sh";
    };
  first = fake "first-system";
  next = fake "next-system";

  pkgs = {
    inherit lib;
    curl = fake "curl";
  };
  common = import lib-nix {
    inherit pkgs;
    nixlessModule = { };
    nixlessPackage = fake "nixless";
  };

  nodes.device.system.build = {
    toplevel = first;
    nixlessNext = next;
  };

  withNext = common.mkTest {
    name = "check";
    next = { };
    testScript = "";
  };
  withoutNext = common.mkTest {
    name = "check";
    testScript = "";
  };

  script = withNext.testScript { inherit nodes; };
  contextPaths = builtins.attrNames (builtins.getContext script);
  cacheNode = withNext.nodes.cache {
    inherit nodes pkgs;
  };
  deviceConfig = common.device {
    inherit lib pkgs;
  };

  plain = builtins.unsafeDiscardStringContext;
  contains = needle: hay: builtins.match ".*${plain needle}.*" (plain hay) != null;
  case = name: ok: { inherit name ok; };
  cases = [
    (case "the script names NEXT" (contains next.outPath script))
    (case "the script carries no context of NEXT (it would be copied into the device's store image)" (
      !(builtins.elem next.drvPath contextPaths) && !(builtins.elem next.outPath contextPaths)
    ))
    (case "the cache node depends on NEXT (additionalPaths), so it is built" (
      builtins.elem next cacheNode.virtualisation.additionalPaths
    ))
    (case "a test without a next generation has no NEXT and no cache node" (
      !(contains "NEXT = " (withoutNext.testScript { inherit nodes; })) && !(withoutNext.nodes ? cache)
    ))
    (case "the device keeps switch-to-configuration (system.switch.enable = true)" (
      deviceConfig.system.switch.enable or false
    ))
  ];
in
{
  cases = builtins.length cases;
  failures = map (c: c.name) (builtins.filter (c: !c.ok) cases);
}
