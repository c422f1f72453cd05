# NixOS module for nixless: the agent, the switch helper and the path unit
# that starts it. Meant for machines with `nix.enable = false`.
#
# The three systemd units are defined once, in ./units.json (also rendered
# into plain unit files for non-NixOS hosts); this module substitutes the
# placeholders and maps each JSON section onto the typed systemd options, so
# `restartIfChanged`/`stopIfChanged` take effect the NixOS way.
{
  config,
  lib,
  options,
  pkgs,
  ...
}:

let
  inherit (lib)
    mkEnableOption
    mkIf
    mkOption
    mkPackageOption
    types
    ;

  cfg = config.services.nixless;

  configPath = "/etc/nixless/agent.json";

  # --- the agent's JSON config -------------------------------------------

  # Exactly the keys of src/agent/config.rs; optional keys that are null are
  # left out (the agent refuses unknown keys, and takes its own defaults).
  agentSettings =
    lib.filterAttrs (_: v: v != null) {
      host = cfg.host;
      listen = cfg.listen;
      caches = cfg.caches;
      cache_keys = cfg.cacheKeys;
      deploy_keys = cfg.deployKeys;
      state_dir = cfg.stateDir;
      root = "/";
      poll_url = cfg.pollUrl;
      poll_interval_secs = cfg.pollIntervalSecs;
      health_timeout_secs = cfg.health.timeoutSecs;
      health_units = cfg.health.units;
      health_command = cfg.health.command;
      health_check_network = cfg.health.checkNetwork;
      switch_timeout_secs = cfg.switchTimeoutSecs;
      inhibited_switch = cfg.inhibitedSwitch;
      generations_to_keep = cfg.generationsToKeep;
      # Credential files reach the agent through LoadCredential= (below):
      # the config names them relative to $CREDENTIALS_DIRECTORY.
      netrc_file = if cfg.netrcFile == null then null else "netrc";
      bearer_token_files =
        if cfg.bearerTokenFiles == { } then
          null
        else
          lib.imap0 (i: url: {
            inherit url;
            file = "bearer-token-${toString i}";
          }) (lib.attrNames cfg.bearerTokenFiles);
      aws_credentials_file = if cfg.s3.credentialsFile == null then null else "aws-credentials";
      aws_profile = cfg.s3.profile;
      ssl_cert_file = cfg.sslCertFile;
      pushgateway_url = cfg.pushgateway.url;
      push_interval_secs = if cfg.pushgateway.url == null then null else cfg.pushgateway.intervalSecs;
      channel_url = cfg.channel.url;
      channel = if cfg.channel.url == null then null else cfg.channel.name;
      tags = if cfg.channel.tags == [ ] then null else cfg.channel.tags;
      keys_url = cfg.channel.keysUrl;
      clock_floor = cfg.channel.clockFloor;
    }
    // cfg.extraConfig;

  # name:path pairs for LoadCredential=; systemd copies each file, as root,
  # into the unit's private $CREDENTIALS_DIRECTORY at start.
  loadCredentials =
    lib.optional (cfg.netrcFile != null) "netrc:${cfg.netrcFile}"
    ++ lib.imap0 (i: url: "bearer-token-${toString i}:${cfg.bearerTokenFiles.${url}}") (
      lib.attrNames cfg.bearerTokenFiles
    )
    ++ lib.optional (cfg.s3.credentialsFile != null) "aws-credentials:${cfg.s3.credentialsFile}";

  credentialPaths =
    lib.optional (cfg.netrcFile != null) cfg.netrcFile
    ++ lib.attrValues cfg.bearerTokenFiles
    ++ lib.optional (cfg.s3.credentialsFile != null) cfg.s3.credentialsFile;

  configFile = pkgs.writeText "nixless-agent.json" (builtins.toJSON agentSettings);

  # "addr:port", IPv6 as "[addr]:port": the port follows the last colon.
  listenPorts = lib.unique (map (a: lib.toInt (lib.last (lib.splitString ":" a))) cfg.listen);

  # --- the units, from units.json -----------------------------------------

  units = builtins.fromJSON (builtins.readFile ./units.json);

  substitute =
    lib.replaceStrings
      [ "@nixless@" "@config@" "@stateDir@" ]
      [ (lib.getExe' cfg.package "nixless") configPath cfg.stateDir ];

  substituteValue = v: if builtins.isList v then map substitute v else substitute v;

  section = unit: name: lib.mapAttrs (_: substituteValue) (unit.${name} or { });

  # The sections each unit may have; anything else in units.json is an error
  # here rather than a silently dropped setting.
  knownSections = {
    "nixless-agent.service" = [ "Unit" "Service" "Install" ];
    "nixless-switch.service" = [ "Unit" "Service" "Install" ];
    "nixless-switch.path" = [ "Unit" "Path" "Install" ];
  };

  # [Unit] keys that have typed NixOS options; [Install] is handled by
  # `wantedBy` (NixOS links units itself, it writes no [Install] section).
  typedUnitKeys = [ "Description" "After" "Wants" ];
  knownInstallKeys = [ "WantedBy" ];

  # switch-to-configuration's own flags. units.json carries them as the keys
  # NixOS would write (systemd ignores X- keys, so a rendered unit file on
  # another distribution is unaffected); here they become the typed options
  # and NixOS writes them back itself.
  switchFlags = [ "X-RestartIfChanged" "X-StopIfChanged" ];
  flag = unit: key: ((unit.Service or { }).${key} or "true") == "true";

  commonOf =
    unit:
    let
      u = section unit "Unit";
    in
    {
      description = u.Description or "";
      after = lib.toList (u.After or [ ]);
      wants = lib.toList (u.Wants or [ ]);
      wantedBy = lib.toList ((section unit "Install").WantedBy or [ ]);
      unitConfig = removeAttrs u typedUnitKeys;
    };

  serviceOf =
    name:
    let
      unit = units.${name};
    in
    commonOf unit
    // {
      serviceConfig = removeAttrs (section unit "Service") switchFlags;
      restartIfChanged = flag unit "X-RestartIfChanged";
      stopIfChanged = flag unit "X-StopIfChanged";
    };

  pathOf =
    name:
    let
      unit = units.${name};
    in
    commonOf unit // { pathConfig = section unit "Path"; };

  unitAssertions = lib.concatLists (
    lib.mapAttrsToList (name: allowed: [
      {
        assertion = builtins.hasAttr name units;
        message = "nixless: nixos/units.json has no ${name}";
      }
      {
        assertion = lib.all (s: lib.elem s allowed) (lib.attrNames (units.${name} or { }));
        message = "nixless: nixos/units.json: ${name} may only have the sections ${toString allowed}";
      }
      {
        assertion = lib.all (k: lib.elem k knownInstallKeys) (lib.attrNames ((units.${name} or { }).Install or { }));
        message = "nixless: nixos/units.json: ${name}: the module maps only ${toString knownInstallKeys} from [Install]";
      }
    ]) knownSections
  );

  # --- what differs between nixpkgs releases ------------------------------
  #
  # Decided by which options this evaluation declares, not by a release
  # number: a backport or an unstable snapshot then takes the right branch
  # too. The newer name is always tested first, because nixpkgs keeps the
  # old one declared as an alias (mkRenamedOptionModule) or a removal
  # (mkRemovedOptionModule), so "the old option exists" says nothing.

  # systemd.settings.Manager (25.11 on) replaced systemd.watchdog.*, which
  # now only warn that they were renamed.
  hasManagerSettings = options ? systemd.settings.Manager;

  # boot.nixStoreMountOpts replaced boot.readOnlyNixStore, which 25.11
  # turned into an error.
  hasStoreMountOpts = options ? boot.nixStoreMountOpts;

  # Releases before system.switch.enable (23.11) always built
  # bin/switch-to-configuration.
  switchEnabled = !(options ? system.switch.enable) || config.system.switch.enable;

  storeMountWritable =
    if hasStoreMountOpts then
      !(lib.elem "ro" config.boot.nixStoreMountOpts)
    else
      !config.boot.readOnlyNixStore;

  # The file system that holds /nix/store: its own mount, else /nix's, else
  # the root's. nixless writes there, so it must not be read-only by design
  # (an erofs/squashfs store partition, as image builders make them) or by
  # its mount options.
  # fileSystems.<name>.enable (newer releases) leaves a mount out.
  mounts = lib.filter (fs: fs.enable or true) (lib.attrValues config.fileSystems);
  mountAt = point: lib.findFirst (fs: fs.mountPoint == point) null mounts;
  storeMount = lib.findFirst (fs: fs != null) null (map mountAt [ "/nix/store" "/nix" "/" ]);

  # fsType has no default from 26.05 on, and a bind mount may leave it unset.
  fsTypeOf =
    fs:
    let
      t = builtins.tryEval fs.fsType;
    in
    if t.success then t.value else "none";

  readOnlyFsTypes = [ "erofs" "squashfs" "iso9660" ];

  # A bind mount is as writable as its source; an overlay without an upper
  # directory is read-only whatever its lower layers are. `depth` stops a
  # bind that names itself.
  readOnlyMount =
    depth: fs:
    let
      opts = fs.options or [ ];
      source = if (fs.device or null) == null then null else mountAt fs.device;
      overlayUpper =
        lib.any (lib.hasPrefix "upperdir=") opts || ((fs.overlay or { }).upperdir or null) != null;
    in
    lib.elem (fsTypeOf fs) readOnlyFsTypes
    || lib.elem "ro" opts
    || (fsTypeOf fs == "overlay" && !overlayUpper)
    || (lib.elem "bind" opts && source != null && depth > 0 && readOnlyMount (depth - 1) source);

  storeOnReadOnlyFs = storeMount != null && readOnlyMount 4 storeMount;

  compatAssertions = [
    {
      assertion = switchEnabled;
      message = ''
        services.nixless needs system.switch.enable = true: nixless activates a
        deployed system with its bin/switch-to-configuration, which NixOS leaves
        out of every generation when system.switch.enable = false (as the
        image-based-appliance profile sets it), so every deploy would be refused.
        Set system.switch.enable = true.
      '';
    }
    {
      assertion = storeMountWritable;
      message =
        if hasStoreMountOpts then
          ''
            services.nixless installs store paths itself, so /nix/store must not be
            mounted read-only: remove "ro" from boot.nixStoreMountOpts.
          ''
        else
          ''
            services.nixless installs store paths itself, so /nix/store must not be
            mounted read-only: set boot.readOnlyNixStore = false.
          '';
    }
    {
      assertion = !storeOnReadOnlyFs;
      message = ''
        services.nixless installs store paths into /nix/store, but it lies on a
        read-only file system here: fileSystems."${storeMount.mountPoint or "/"}" (fsType ${fsTypeOf storeMount},
        options ${toString (storeMount.options or [ ])}). An erofs or squashfs store image is
        replaced whole (by systemd-sysupdate, say), not updated by nixless: put
        /nix/store on a writable file system, or a writable overlay over the
        image, to use nixless.
      '';
    }
  ];

  # NixOS bind-mounts the store read-only by default; the Nix daemon undoes
  # that in its own mount namespace. nixless has no privileged daemon (the
  # agent runs without CAP_SYS_ADMIN, under its own seccomp filter), and a
  # unit's ReadWritePaths= cannot make a read-only mount writable, so the
  # store stays writable for root, as on a system with Nix but no daemon.
  writableStoreConfig =
    if hasStoreMountOpts then
      {
        boot.nixStoreMountOpts = lib.mkDefault [
          "nodev"
          "nosuid"
        ];
      }
    else
      { boot.readOnlyNixStore = lib.mkDefault false; };

  watchdogConfig =
    let
      runtime = lib.mkDefault "${toString cfg.hardwareWatchdog.runtimeSecs}s";
      reboot = lib.mkDefault "${toString cfg.hardwareWatchdog.rebootSecs}s";
    in
    if hasManagerSettings then
      {
        systemd.settings.Manager = {
          RuntimeWatchdogSec = runtime;
          RebootWatchdogSec = reboot;
        };
      }
    else
      {
        systemd.watchdog = {
          runtimeTime = runtime;
          rebootTime = reboot;
        };
      };

  # --- option types ---------------------------------------------------------

  # Nix's public key format: name:base64(32 bytes).
  publicKey = types.strMatching "[^:[:space:]]+:[A-Za-z0-9+/]{43}=";
  cacheUrl = types.strMatching "(https?://|s3://|file:///).+";
  # A channel name or tag, as the agent checks it (src/channel/mod.rs).
  channelName = types.strMatching "[A-Za-z0-9._-]{1,64}";
  # A file on the machine, as a string: a Nix path literal would be copied
  # into the world-readable store, which a secret must never be.
  secretFile = types.strMatching "/.+";
  listenAddr = types.strMatching "([[][0-9A-Fa-f:.]+[]]|[0-9.]+):[0-9]+";
in
{
  options.services.nixless = {
    enable = mkEnableOption "the nixless agent, which installs and switches to signed NixOS deploys without Nix";

    package = mkPackageOption pkgs "nixless" {
      extraDescription = ''
        The flake's `nixosModules.default` sets this to its static (musl)
        build; without the flake, provide `pkgs.nixless` through an overlay
        (the flake's `overlays.default`) or set this option.
      '';
    };

    host = mkOption {
      type = types.strMatching "[^/[:space:]]+";
      default = config.networking.hostName;
      defaultText = lib.literalExpression "config.networking.hostName";
      example = "kiosk-7";
      description = ''
        The name deploy documents must carry in their `host` field for this
        machine to accept them.
      '';
    };

    listen = mkOption {
      type = types.listOf listenAddr;
      default = [
        "0.0.0.0:8731"
        "[::]:8731"
      ];
      example = [ "10.0.0.7:8731" ];
      description = ''
        Addresses (`addr:port`, IPv6 as `[addr]:port`) the agent serves
        `POST /v1/deploy`, `GET /v1/status` and `GET /metrics` on. Empty: the
        agent only polls ({option}`services.nixless.pollUrl`).
      '';
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open the TCP ports of {option}`services.nixless.listen` in the firewall.";
    };

    caches = mkOption {
      type = types.listOf cacheUrl;
      default = [ ];
      example = [ "https://cache.example.org" ];
      description = ''
        Binary caches to install from, in priority order: `http://`,
        `https://`, `s3://bucket?region=…&endpoint=…&scheme=…&profile=…`
        (Nix's form; read with AWS Signature V4) or `file:///` (a cache on
        removable media). A deploy document may name further caches, tried
        first.
      '';
    };

    netrcFile = mkOption {
      type = types.nullOr secretFile;
      default = null;
      example = "/run/secrets/nix-netrc";
      description = ''
        A netrc file (Nix's `netrc-file`: `machine HOST login USER password
        PASS`) giving HTTP basic-auth credentials for private caches, as
        Cachix and Attic use them. Give a path outside the Nix store (from
        sops-nix, agenix, …); it reaches the agent through systemd's
        `LoadCredential=` and is never logged or shown in status.
      '';
    };

    bearerTokenFiles = mkOption {
      type = types.attrsOf secretFile;
      default = { };
      example = {
        "https://cache.example.org" = "/run/secrets/cache-token";
      };
      description = ''
        Bearer tokens for private caches: URL prefix → file holding the
        token. Requests under the prefix (the longest that matches) get
        `Authorization: Bearer <token>`. Paths outside the Nix store, passed
        with `LoadCredential=`.
      '';
    };

    s3 = {
      credentialsFile = mkOption {
        type = types.nullOr secretFile;
        default = null;
        example = "/run/secrets/aws-credentials";
        description = ''
          An AWS shared credentials file (`[profile]` sections with
          `aws_access_key_id`, `aws_secret_access_key`, optionally
          `aws_session_token`) for `s3://` caches. A path outside the Nix
          store, passed with `LoadCredential=`. The key needs `s3:GetObject`
          and `s3:ListBucket` on the bucket (without the latter S3 answers a
          missing path with 403 rather than 404).
        '';
      };

      profile = mkOption {
        type = types.nullOr (types.strMatching "[A-Za-z0-9_.@+=,-]+");
        default = null;
        example = "cache";
        description = ''
          The profile of {option}`services.nixless.s3.credentialsFile` for
          `s3://` caches whose URL has no `profile=`. `null`: `default`.
        '';
      };
    };

    cacheKeys = mkOption {
      type = types.listOf publicKey;
      default = [ ];
      example = [ "cache.example.org-1:lUzG8lFb3QU4PAdGA2Rgqr/vMDZ8NSfHyYuPriOlg0g=" ];
      description = ''
        Public keys (`name:base64`, as written by
        `nix-store --generate-binary-cache-key`) whose signature on a narinfo
        makes the path trusted. Nothing unsigned is ever installed.
      '';
    };

    deployKeys = mkOption {
      type = types.listOf publicKey;
      default = [ ];
      example = [ "admin-1:Of7MmzdW/APYftiQQR5RlNuBS9XewDW/AZmX/5IZTxA=" ];
      description = ''
        Public keys (from `nixless keygen`) allowed to sign deploy documents.
        Keep them distinct from {option}`services.nixless.cacheKeys`: a key
        that can publish to the cache need not be able to move machines.
      '';
    };

    pollUrl = mkOption {
      type = types.nullOr cacheUrl;
      default = null;
      example = "https://deploy.example.org/kiosk-7.json";
      description = ''
        Where to poll for this machine's deploy document (the signature is
        read from the same URL with `.sig` appended), for machines behind NAT.
        `null`: no polling.
      '';
    };

    pollIntervalSecs = mkOption {
      type = types.ints.positive;
      default = 300;
      description = "Seconds between two polls of {option}`services.nixless.pollUrl`.";
    };

    sslCertFile = mkOption {
      type = types.nullOr (types.strMatching "/.*");
      # nixpkgs nixos/modules/security/ca.nix writes this file from Mozilla's
      # list plus security.pki.certificates{,Files}, unless
      # security.pki.installCACerts is false (an option newer releases have;
      # older ones always write it).
      default = if config.security.pki.installCACerts or true then "/etc/ssl/certs/ca-certificates.crt" else null;
      defaultText = lib.literalExpression ''
        if config.security.pki.installCACerts or true then "/etc/ssl/certs/ca-certificates.crt" else null
      '';
      example = "/etc/nixless/cache-ca.pem";
      description = ''
        PEM file of the certificate authorities `https://` caches, poll URLs
        and the Pushgateway are checked against (Nix's `ssl-cert-file`). The
        default is the system bundle, so a private cache behind a CA in
        {option}`security.pki.certificates` just works. Read once at the
        agent's start. `null`: the webpki roots built into nixless
        (Mozilla's list).
      '';
    };

    channel = {
      url = mkOption {
        type = types.nullOr cacheUrl;
        default = null;
        example = "https://deploy.example.org/stable.json";
        description = ''
          A signed channel document to follow (its signature at the same URL
          with `.sig` appended; for `s3://`, on the object key), polled every
          {option}`services.nixless.pollIntervalSecs`. The machine deploys the
          system its group names once its wave opens, and never retries a
          system that failed here. `null`: no channel.
        '';
      };
      name = mkOption {
        type = types.nullOr channelName;
        default = null;
        example = "stable";
        description = "The channel's name (required with {option}`services.nixless.channel.url`): a document for another channel is refused.";
      };
      tags = mkOption {
        type = types.listOf channelName;
        default = [ ];
        example = [
          "kiosk"
          "all"
        ];
        description = "This machine's tags, in priority order: its group is the first tag the channel document names.";
      };
      keysUrl = mkOption {
        type = types.nullOr cacheUrl;
        default = null;
        example = "https://deploy.example.org/keys.json";
        description = ''
          A key rotation document (signed by a deploy key trusted now) naming
          the deploy keys to trust from then on, polled with the channel.
          The rotation holds while {option}`services.nixless.deployKeys` stays
          as it was when it was applied; changing that option resets it.
        '';
      };
      clockFloor = mkOption {
        type = types.nullOr (types.ints.between 0 253402300799);
        default = null;
        example = lib.literalExpression "self.lastModified";
        description = ''
          The earliest Unix time this machine may believe it is, for devices
          without a real-time clock: channel documents that expired before
          it are refused even at a 1970 clock. nixpkgs has no build time to
          take it from (its version options are strings), so set it from
          the configuration's own date; in a flake, `self.lastModified`.
          `null`: the agent's built-in floor (its release date).
        '';
      };
    };

    pushgateway = {
      url = mkOption {
        type = types.nullOr (types.strMatching "https?://[^@?#]+");
        default = null;
        example = "https://pushgateway.example.org";
        description = ''
          A Prometheus Pushgateway the agent pushes its metrics to (PUT
          `URL/metrics/job/nixless/host/HOST`), for machines behind NAT that
          Prometheus cannot scrape: at start, after every phase change and
          finished deploy, and every {option}`services.nixless.pushgateway.intervalSecs`.
          Credentials: {option}`services.nixless.netrcFile` or
          {option}`services.nixless.bearerTokenFiles` (by URL prefix), never
          in the URL. `null`: no pushing.
        '';
      };
      intervalSecs = mkOption {
        type = types.ints.between 10 86400;
        default = 300;
        description = "Seconds between two pushes (plus up to a tenth of it, at random).";
      };
    };

    health = {
      timeoutSecs = mkOption {
        type = types.ints.positive;
        default = 120;
        description = ''
          How long the new system has to pass its health checks after
          `switch-to-configuration test`; past it the previous system is
          switched back to. The checks are those of the *new* system's
          configuration.
        '';
      };

      units = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "kiosk.service" ];
        description = "Units that must be active (`systemctl is-active`) for the new system to count as healthy.";
      };

      command = mkOption {
        type = types.nullOr (types.listOf types.str);
        default = null;
        example = lib.literalExpression ''[ "''${pkgs.curl}/bin/curl" "-sf" "http://localhost:8080/health" ]'';
        description = ''
          A command (program and arguments, no shell) the switch helper runs
          as root after the unit checks; exit 0 means healthy.
        '';
      };

      checkNetwork = mkOption {
        type = types.bool;
        default = true;
        description = ''
          Require that a cache that was reachable before the switch is still
          reachable after it, so an update that cuts the machine off is
          rolled back.
        '';
      };
    };

    switchTimeoutSecs = mkOption {
      type = types.ints.positive;
      default = 900;
      description = "Longest a `switch-to-configuration` run may take before the helper kills it and the agent rolls back.";
    };

    inhibitedSwitch = mkOption {
      type = types.enum [
        "fail"
        "boot"
      ];
      default = "fail";
      description = ''
        What a `switch` deploy does when `switch-to-configuration test`
        refuses it because `system.switch.inhibitors` changed: `fail` (the
        deploy fails with "needs a reboot: deploy with action boot"; the
        operator picks when the device reboots) or `boot` (it goes on as a
        `boot` deploy of the same system, run at the next reboot).
      '';
    };

    generationsToKeep = mkOption {
      type = types.ints.positive;
      default = 5;
      description = "System generations (`system-N-link`) kept by the `gc` action; older ones and their paths are collected.";
    };

    stateDir = mkOption {
      type = types.strMatching "/.*";
      default = "/var/lib/nixless";
      description = "The agent's state, path records and the switch request/result files.";
    };

    extraConfig = mkOption {
      type = (pkgs.formats.json { }).type;
      default = { };
      example = {
        max_connections = 16;
        retries = 8;
      };
      description = ''
        Further keys of the agent's JSON config (`max_body_bytes`,
        `max_connections`, `request_timeout_secs`, `retries`), merged over
        the generated ones. The agent refuses unknown keys.
      '';
    };

    hardwareWatchdog = {
      enable = mkOption {
        type = types.bool;
        default = true;
        description = ''
          Have systemd drive the hardware watchdog, so a machine that hangs
          (for instance while a new system is being verified) is reset and
          boots the last committed generation. Sets systemd's
          `RuntimeWatchdogSec` and `RebootWatchdogSec` at `mkDefault` priority
          (`systemd.settings.Manager`, or `systemd.watchdog.runtimeTime` and
          `rebootTime` on releases before it).
        '';
      };

      runtimeSecs = mkOption {
        type = types.ints.positive;
        default = 30;
        description = "Seconds PID 1 may go without pinging the watchdog before the machine is reset.";
      };

      rebootSecs = mkOption {
        type = types.ints.positive;
        default = 120;
        description = "Seconds a reboot may take before the watchdog resets the machine.";
      };
    };
  };

  config = mkIf cfg.enable (lib.mkMerge [
    {
      assertions = [
        {
          assertion = cfg.deployKeys != [ ];
          message = "services.nixless.deployKeys: at least one deploy key is needed, or no deploy is ever accepted.";
        }
        {
          assertion = cfg.cacheKeys != [ ];
          message = "services.nixless.cacheKeys: at least one trusted cache key is needed.";
        }
        {
          assertion = cfg.caches != [ ];
          message = "services.nixless.caches: at least one binary cache URL is needed.";
        }
        {
          assertion = lib.all (p: !lib.hasPrefix builtins.storeDir p) credentialPaths;
          message = "services.nixless: netrcFile, bearerTokenFiles and s3.credentialsFile must not be in the Nix store (it is world-readable).";
        }
        {
          assertion = cfg.listen != [ ] || cfg.pollUrl != null || cfg.channel.url != null;
          message = "services.nixless: set listen, pollUrl or channel.url; with none, no deploy can ever arrive.";
        }
        {
          assertion = cfg.channel.url == null || cfg.channel.name != null;
          message = "services.nixless.channel.name: required with channel.url (the name of the channel followed).";
        }
        {
          assertion = cfg.channel.url == null || cfg.channel.tags != [ ];
          message = "services.nixless.channel.tags: at least one is needed with channel.url (a machine's group is one of its tags).";
        }
      ]
      ++ compatAssertions
      ++ unitAssertions;

      warnings = lib.optional config.nix.enable ''
        services.nixless is enabled together with nix.enable: Nix's database does
        not know the store paths nixless installs, and Nix's garbage collector
        may delete them. nixless is meant for machines with nix.enable = false.
      '';

      environment.etc."nixless/agent.json".source = configFile;

      # The admin commands on the console: `nixless status`, `verify`, `gc`,
      # `rollback`.
      environment.systemPackages = [ cfg.package ];

      # Activation scripts and the boot loader builders link into these even
      # without Nix; the agent writes system-N-link and its GC roots there.
      systemd.tmpfiles.rules = [
        "d /nix/var/nix 0755 root root - -"
        "d /nix/var/nix/profiles 0755 root root - -"
        "d /nix/var/nix/gcroots 0755 root root - -"
        "d ${cfg.stateDir} 0700 root root - -"
      ];

      systemd.services.nixless-agent = lib.mkMerge [
        (serviceOf "nixless-agent.service")
        {
          # A switch that changes the agent's config (keys, caches, health
          # checks) restarts the agent, exactly like one that changes its
          # binary: the new agent then verifies the new system with the new
          # system's health settings.
          restartTriggers = [ configFile ];
          serviceConfig.CapabilityBoundingSet = mkIf (lib.any (p: p < 1024) listenPorts) [
            "CAP_NET_BIND_SERVICE"
          ];
          serviceConfig.LoadCredential = mkIf (loadCredentials != [ ]) loadCredentials;
        }
      ];

      # Never restarted or stopped by a switch: it is the process running it.
      systemd.services.nixless-switch = serviceOf "nixless-switch.service";

      systemd.paths.nixless-switch = pathOf "nixless-switch.path";

      networking.firewall.allowedTCPPorts = mkIf cfg.openFirewall listenPorts;
    }
    writableStoreConfig
    (mkIf cfg.hardwareWatchdog.enable watchdogConfig)
  ]);
}
