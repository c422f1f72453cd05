# Evaluates nixos/module.nix without nixpkgs, against stand-ins for the
# option sets of the nixpkgs releases it supports, and checks
#   - every option it sets is declared in that release, and is not an alias
#     left by a rename (mkRenamedOptionModule: evaluates, with a warning) or a
#     removal (mkRemovedOptionModule: fails),
#   - the assertions fire, with their reasons, where nixless cannot work:
#     no switch-to-configuration, a store mounted or built read-only,
#   - and stay quiet on the configurations the VM tests use.
#
# The option sets are stand-ins written from nixpkgs' own declarations
# (cited per shape below); the check proves the module follows them, not
# that they are complete. Run by tests/nix-parse.sh:
#   nix-instantiate --eval --strict --json tests/nix/module-eval.nix
# gives { cases = N; failures = [ ... ]; }; no failures is a pass.
# `--arg module PATH` checks another copy of the module (e.g. an older one,
# to see the check fail on it).
{
  module ? ../../nixos/module.nix,
}:
let
  lib = import ./stub-lib.nix;
  inherit (builtins)
    attrNames
    concatMap
    filter
    isAttrs
    isList
    length
    ;

  optionalAttrs = cond: set: if cond then set else { };

  option = {
    _type = "option";
  };
  # mkRenamedOptionModule / mkRemovedOptionModule keep the old path declared.
  renamedTo = to: option // { renamed = to; };
  removed = option // { removed = true; };

  # Options of other modules that nixos/module.nix sets, in every release.
  common = {
    assertions = option;
    warnings = option;
    environment = {
      etc = option;
      systemPackages = option;
    };
    networking.firewall.allowedTCPPorts = option;
    services.nixless = option;
    systemd = {
      services = option;
      paths = option;
      tmpfiles.rules = option;
    };
  };

  merge =
    a: b:
    if isAttrs a && isAttrs b && !(a ? _type) && !(b ? _type) then
      a // builtins.mapAttrs (n: v: if a ? ${n} then merge a.${n} v else v) b
    else
      b;

  shapes = {
    # Before system.switch (nixos/modules/system/activation/switchable-system.nix,
    # 23.11) and boot.nixStoreMountOpts: boot.readOnlyNixStore
    # (nixos/modules/system/boot/stage-2.nix), systemd.watchdog.*
    # (nixos/modules/system/boot/systemd.nix).
    old = merge common {
      boot.readOnlyNixStore = option;
      systemd.watchdog = {
        runtimeTime = option;
        rebootTime = option;
      };
    };
    # system.switch.enable, still boot.readOnlyNixStore and systemd.watchdog.*.
    switchable = merge shapes.old { system.switch.enable = option; };
    # boot.nixStoreMountOpts next to a still declared boot.readOnlyNixStore.
    transition = merge shapes.switchable { boot.nixStoreMountOpts = option; };
    # 25.11 on: stage-2.nix has mkRemovedOptionModule [ "boot" "readOnlyNixStore" ],
    # systemd.nix declares settings.Manager and mkRenamedOptionModule
    # [ "systemd" "watchdog" "runtimeTime" ] -> [ "systemd" "settings" "Manager"
    # "RuntimeWatchdogSec" ] (and rebootTime -> RebootWatchdogSec).
    current = merge common {
      system.switch.enable = option;
      boot = {
        nixStoreMountOpts = option;
        readOnlyNixStore = removed;
      };
      systemd = {
        settings.Manager = option;
        watchdog = {
          runtimeTime = renamedTo "systemd.settings.Manager.RuntimeWatchdogSec";
          rebootTime = renamedTo "systemd.settings.Manager.RebootWatchdogSec";
        };
      };
    };
  };

  cfg = {
    enable = true;
    package = "/nix/store/00000000000000000000000000000000-nixless";
    host = "kiosk-7";
    listen = [
      "0.0.0.0:8731"
      "[::]:8731"
    ];
    openFirewall = true;
    caches = [ "http://cache" ];
    cacheKeys = [ "cache-1:lUzG8lFb3QU4PAdGA2Rgqr/vMDZ8NSfHyYuPriOlg0g=" ];
    deployKeys = [ "admin-1:Of7MmzdW/APYftiQQR5RlNuBS9XewDW/AZmX/5IZTxA=" ];
    pollUrl = null;
    pollIntervalSecs = 300;
    health = {
      timeoutSecs = 120;
      units = [ ];
      command = null;
      checkNetwork = true;
    };
    switchTimeoutSecs = 900;
    inhibitedSwitch = "fail";
    generationsToKeep = 5;
    stateDir = "/var/lib/nixless";
    extraConfig = { };
    netrcFile = null;
    bearerTokenFiles = { };
    s3 = {
      credentialsFile = null;
      profile = null;
    };
    pushgateway = {
      url = null;
      intervalSecs = 300;
    };
    sslCertFile = "/etc/ssl/certs/ca-certificates.crt";
    channel = {
      url = null;
      name = null;
      tags = [ ];
      keysUrl = null;
      clockFloor = null;
    };
    hardwareWatchdog = {
      enable = true;
      runtimeSecs = 30;
      rebootSecs = 120;
    };
  };

  rootExt4 = {
    "/" = {
      mountPoint = "/";
      device = "/dev/vda1";
      fsType = "ext4";
      options = [ "defaults" ];
    };
  };

  # The configuration values the module reads, as the module system would
  # hand them over. Options a shape lacks are absent, or throw as a removed
  # option does when read.
  configFor =
    shape:
    {
      switch ? true,
      storeOpts ? [
        "nodev"
        "nosuid"
      ],
      readOnlyStore ? false,
      fileSystems ? rootExt4,
      watchdog ? true,
      nixless ? { },
    }:
    {
      services.nixless =
        cfg
        // {
          hardwareWatchdog = cfg.hardwareWatchdog // {
            enable = watchdog;
          };
        }
        // nixless;
      networking.hostName = "kiosk-7";
      nix.enable = false;
      inherit fileSystems;
      boot =
        optionalAttrs (shape.boot ? nixStoreMountOpts) { nixStoreMountOpts = storeOpts; }
        // {
          readOnlyNixStore =
            if shape.boot.readOnlyNixStore.removed or false then
              throw "boot.readOnlyNixStore was read, but this release removed it"
            else
              readOnlyStore;
        };
    }
    // optionalAttrs (shape ? system) { system.switch.enable = switch; };

  pkgs = {
    writeText = name: _text: "/nix/store/00000000000000000000000000000000-${name}";
    formats.json = _: { type = "json"; };
    nixless = cfg.package;
  };

  evalModule =
    shape: args:
    import module {
      inherit lib pkgs;
      options = shape;
      config = configFor shape args;
    };

  # Push mkIf/mkMerge down the way the module system does; a mkDefault stays
  # as it is (a leaf that carries its priority).
  resolve =
    v:
    if isAttrs v && v._type or null == "if" then
      (if v.condition then resolve v.content else { })
    else if isAttrs v && v._type or null == "merge" then
      builtins.foldl' merged { } (map resolve v.contents)
    else if isAttrs v && !(v ? _type) then
      builtins.mapAttrs (_: resolve) v
    else
      v;
  merged =
    a: b:
    if isAttrs a && isAttrs b && !(a ? _type) && !(b ? _type) then
      a // builtins.mapAttrs (n: v: if a ? ${n} then merged a.${n} v else v) b
    else if isList a && isList b then
      a ++ b
    else
      b;

  # The agent's config.json the module writes for `nixless` (option values
  # over cfg) on the current release: a writeText that keeps the text.
  agentJson =
    nixless:
    builtins.fromJSON
      (resolve
        (import module {
          inherit lib;
          pkgs = pkgs // {
            writeText = _: text: text;
          };
          options = shapes.current;
          config = configFor shapes.current { inherit nixless; };
        }).config
      ).environment.etc."nixless/agent.json".source;

  showPath = builtins.concatStringsSep ".";

  # Every path the module sets, checked against the shape's declarations.
  undeclared =
    path: value: decl:
    if decl == null then
      [ "sets ${showPath path}, which this release does not declare" ]
    else if decl._type or null == "option" then
      (if decl ? renamed then
        [ "sets ${showPath path}, renamed to ${decl.renamed} (evaluates with a warning)" ]
      else if decl.removed or false then
        [ "sets ${showPath path}, which this release removed" ]
      else
        [ ])
    else if isAttrs value && !(value ? _type) then
      concatMap (n: undeclared (path ++ [ n ]) value.${n} (decl.${n} or null)) (attrNames value)
    else
      [ "sets ${showPath path} to a value, but it is a set of options" ];

  configOf = shape: args: resolve (evalModule shape args).config;

  failedAssertions =
    shape: args: map (a: a.message) (filter (a: !a.assertion) ((configOf shape args).assertions or [ ]));

  contains = needle: hay: builtins.match ".*${needle}.*" (builtins.replaceStrings [ "\n" ] [ " " ] hay) != null;

  getPath =
    path: set:
    builtins.foldl' (acc: n: if acc != null && isAttrs acc && acc ? ${n} then acc.${n} else null) set path;

  # A case: a name and the list of what went wrong (empty: it passed).
  case = name: problems: { inherit name problems; };

  expect =
    what: cond:
    if cond then [ ] else [ what ];

  # The shape's own option paths must be the ones the module sets.
  expectSet =
    c: path: want:
    let
      got = getPath path c;
    in
    expect "${showPath path} = ${builtins.toJSON want}, got ${builtins.toJSON got}" (got == want);
  # { } is what a false mkIf leaves in this resolver: nothing is set there.
  expectUnset =
    c: path:
    let
      got = getPath path c;
    in
    expect "${showPath path} is set: ${builtins.toJSON got}" (got == null || got == { });

  assertionCase =
    name: shape: args: needles:
    let
      failed = failedAssertions shape args;
    in
    case name (
      expect "exactly one assertion fails, got ${builtins.toJSON failed}" (length failed == 1)
      ++ concatMap (
        n: expect "the failing assertion says '${n}': ${builtins.toJSON failed}" (builtins.any (contains n) failed)
      ) needles
    );

  passCase =
    name: shape: args:
    case name (
      let
        failed = failedAssertions shape args;
      in
      expect "no assertion fails, got ${builtins.toJSON failed}" (failed == [ ])
    );

  mkDefault = lib.mkDefault;
  writable = mkDefault [
    "nodev"
    "nosuid"
  ];

  perShape = concatMap (
    name:
    let
      shape = shapes.${name};
      c = configOf shape { };
      newStore = shape.boot ? nixStoreMountOpts;
      newWatchdog = shape ? systemd.settings.Manager;
    in
    [
      (case "${name}: only declared, current option names" (undeclared [ ] c shape))
      (passCase "${name}: a writable store, switch-to-configuration: no assertion fails" shape { })
      (case "${name}: the store is made writable through the release's option" (
        if newStore then
          expectSet c [ "boot" "nixStoreMountOpts" ] writable ++ expectUnset c [ "boot" "readOnlyNixStore" ]
        else
          expectSet c [ "boot" "readOnlyNixStore" ] (mkDefault false) ++ expectUnset c [ "boot" "nixStoreMountOpts" ]
      ))
      (case "${name}: the hardware watchdog through the release's option" (
        if newWatchdog then
          expectSet c [ "systemd" "settings" "Manager" "RuntimeWatchdogSec" ] (mkDefault "30s")
          ++ expectSet c [ "systemd" "settings" "Manager" "RebootWatchdogSec" ] (mkDefault "120s")
          ++ expectUnset c [ "systemd" "watchdog" ]
        else
          expectSet c [ "systemd" "watchdog" "runtimeTime" ] (mkDefault "30s")
          ++ expectSet c [ "systemd" "watchdog" "rebootTime" ] (mkDefault "120s")
          ++ expectUnset c [ "systemd" "settings" ]
      ))
      (case "${name}: hardwareWatchdog.enable = false sets no watchdog" (
        let
          off = configOf shape { watchdog = false; };
        in
        expectUnset off [ "systemd" "watchdog" ] ++ expectUnset off [ "systemd" "settings" ]
      ))
    ]
  ) (attrNames shapes);

  inherit (shapes) current;

  fs = mountPoint: attrs: { ${mountPoint} = { inherit mountPoint; } // attrs; };
  erofsImage = fs "/nix/.ro-store" {
    device = "/dev/disk/by-label/nix-store";
    fsType = "erofs";
    options = [ "ro" ];
  };

  cases =
    perShape
    ++ [
      (assertionCase "system.switch.enable = false (image-based-appliance.nix) is refused" current { switch = false; } [
        "system.switch.enable = true"
        "switch-to-configuration"
      ])
      (assertionCase "and so on a release with readOnlyNixStore" shapes.switchable { switch = false; } [
        "system.switch.enable = true"
      ])
      (passCase "a release without system.switch always has switch-to-configuration" shapes.old { switch = false; })
      (assertionCase "\"ro\" in boot.nixStoreMountOpts is refused" current {
        storeOpts = [
          "ro"
          "nodev"
        ];
      } [ "remove \"ro\" from boot.nixStoreMountOpts" ])
      (assertionCase "boot.readOnlyNixStore = true is refused where it exists" shapes.old { readOnlyStore = true; } [
        "boot.readOnlyNixStore = false"
      ])
      (assertionCase "a store partition of its own, erofs, is refused" current {
        fileSystems = rootExt4 // fs "/nix/store" {
          device = "/dev/disk/by-partlabel/nix-store";
          fsType = "erofs";
          options = [ "defaults" ];
        };
      } [ "read-only file system" "/nix/store" "erofs" ])
      (assertionCase "a squashfs root that holds the store is refused" current {
        fileSystems = fs "/" {
          device = "/dev/vda2";
          fsType = "squashfs";
        };
      } [ "read-only file system" "squashfs" ])
      (assertionCase "a /nix mounted ro is refused" current {
        fileSystems = rootExt4 // fs "/nix" {
          device = "/dev/vda3";
          fsType = "ext4";
          options = [ "ro" ];
        };
      } [ "read-only file system" ])
      # qemu-vm.nix, useNixStoreImage without writableStore: /nix/store binds
      # the erofs image (and, from 26.05, declares no fsType).
      (assertionCase "a bind of a read-only store image is refused" current {
        fileSystems =
          rootExt4
          // erofsImage
          // fs "/nix/store" {
            device = "/nix/.ro-store";
            fsType = throw "fsType is used but not defined";
            options = [ "bind" ];
          };
      } [ "read-only file system" ])
      (assertionCase "an overlay without an upper directory is refused" current {
        fileSystems =
          rootExt4
          // erofsImage
          // fs "/nix/store" {
            fsType = "overlay";
            device = "overlay";
            options = [ "lowerdir=/nix/.ro-store" ];
          };
      } [ "read-only file system" ])
      # qemu-vm.nix, useNixStoreImage + writableStore, as the VM tests use it:
      # an overlay (the overlay option, 24.11 on) over the erofs image.
      (passCase "the VM tests' writable overlay over an erofs image" current {
        fileSystems =
          rootExt4
          // erofsImage
          // fs "/nix/store" {
            fsType = "overlay";
            device = "overlay";
            options = [ "defaults" ];
            overlay = {
              lowerdir = [ "/nix/.ro-store" ];
              upperdir = "/nix/.rw-store/upper";
              workdir = "/nix/.rw-store/work";
            };
          };
      })
      (passCase "the same overlay as older qemu-vm.nix writes it (options)" shapes.old {
        fileSystems =
          rootExt4
          // erofsImage
          // fs "/nix/store" {
            fsType = "overlay";
            device = "overlay";
            options = [
              "lowerdir=/nix/.ro-store"
              "upperdir=/nix/.rw-store/store"
              "workdir=/nix/.rw-store/work"
            ];
          };
      })
      (passCase "a root without fsType (26.05 has no default) does not break evaluation" current {
        fileSystems = fs "/" {
          device = "/dev/vda1";
          fsType = throw "fsType is used but not defined";
        };
      })
      (passCase "a bind that names itself ends" current {
        fileSystems = rootExt4 // fs "/nix/store" {
          device = "/nix/store";
          fsType = "none";
          options = [ "bind" ];
        };
      })
      (passCase "no file systems at all (a container)" current { fileSystems = { }; })
      (case "credential files reach the agent through LoadCredential=" (
        let
          c = configOf current {
            nixless = {
              netrcFile = "/run/secrets/netrc";
              bearerTokenFiles."https://cache.example" = "/run/secrets/token";
              s3 = {
                credentialsFile = "/run/secrets/aws";
                profile = "cache";
              };
            };
          };
        in
        expectSet c [ "systemd" "services" "nixless-agent" "serviceConfig" "LoadCredential" ] [
          "netrc:/run/secrets/netrc"
          "bearer-token-0:/run/secrets/token"
          "aws-credentials:/run/secrets/aws"
        ]
      ))
      (case "the pushgateway options reach the agent's config; without a URL, neither key" (
        let
          on = agentJson {
            pushgateway = {
              url = "https://gw.example:9091";
              intervalSecs = 60;
            };
          };
          off = agentJson { };
        in
        expect "pushgateway_url/push_interval_secs: ${builtins.toJSON on}" (
          on.pushgateway_url == "https://gw.example:9091" && on.push_interval_secs == 60
        )
        ++ expect "no push keys without a URL: ${builtins.toJSON off}" (
          !(off ? pushgateway_url) && !(off ? push_interval_secs)
        )
        ++ expect "the system CA bundle by default: ${builtins.toJSON off}" (
          off.ssl_cert_file == "/etc/ssl/certs/ca-certificates.crt"
        )
        ++ expect "sslCertFile = null: the built-in roots (no key)" (
          !((agentJson { sslCertFile = null; }) ? ssl_cert_file)
        )
      ))
      (case "the channel options reach the agent's config; without a URL, no channel key" (
        let
          on = agentJson {
            listen = [ ];
            channel = {
              url = "https://deploy.example/stable.json";
              name = "stable";
              tags = [
                "kiosk"
                "all"
              ];
              keysUrl = "https://deploy.example/keys.json";
              clockFloor = 1796083200;
            };
          };
          off = agentJson { };
        in
        expect "channel keys: ${builtins.toJSON on}" (
          on.channel_url == "https://deploy.example/stable.json"
          && on.channel == "stable"
          && on.tags == [
            "kiosk"
            "all"
          ]
          && on.keys_url == "https://deploy.example/keys.json"
          && on.clock_floor == 1796083200
        )
        ++ expect "no channel keys without a URL: ${builtins.toJSON off}" (
          !(off ? channel_url || off ? channel || off ? tags || off ? keys_url || off ? clock_floor)
        )
      ))
      (passCase "a channel alone (no listen, no pollUrl) can receive deploys" current {
        nixless = cfg // {
          listen = [ ];
          channel = cfg.channel // {
            url = "file:///media/usb/stable.json";
            name = "stable";
            tags = [ "kiosk" ];
          };
        };
      })
      (assertionCase "a channel URL without its name is refused" current {
        nixless.channel = cfg.channel // {
          url = "https://deploy.example/stable.json";
          tags = [ "kiosk" ];
        };
      } [ "channel.name: required with channel.url" ])
      (assertionCase "a channel URL without tags is refused" current {
        nixless.channel = cfg.channel // {
          url = "https://deploy.example/stable.json";
          name = "stable";
        };
      } [ "channel.tags: at least one is needed" ])
      (case "no credentials: no LoadCredential=" (
        expectUnset (configOf current { }) [ "systemd" "services" "nixless-agent" "serviceConfig" "LoadCredential" ]
      ))
      (assertionCase "a credential file in the Nix store is refused" current {
        nixless.netrcFile = "/nix/store/00000000000000000000000000000000-netrc";
      } [ "must not be in the Nix store" ])
      (passCase "a disabled erofs store mount (fileSystems.<name>.enable = false) is not the store" current {
        fileSystems = rootExt4 // fs "/nix/store" {
          enable = false;
          device = "/dev/disk/by-partlabel/nix-store";
          fsType = "erofs";
        };
      })
    ];
in
{
  cases = length cases;
  failures = concatMap (c: map (p: "${c.name}: ${p}") c.problems) cases;
}
