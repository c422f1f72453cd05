{
  description = "nixless: a tiny static pull-based updater for NixOS machines that do not run Nix";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;

      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];

      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      cargoToml = lib.importTOML ./Cargo.toml;

      # The static musl build: one file, no runtime dependencies, so the
      # device's closure gains nothing but the binary.
      mkNixless =
        pkgs:
        pkgs.pkgsStatic.rustPlatform.buildRustPackage {
          pname = cargoToml.package.name;
          inherit (cargoToml.package) version;

          # Only what the build reads: no target/, fuzz/, tests or benches.
          src = lib.fileset.toSource {
            root = ./.;
            fileset = lib.fileset.unions [
              ./Cargo.toml
              ./Cargo.lock
              ./build.rs
              ./src
            ];
          };
          cargoLock.lockFile = ./Cargo.lock;

          # The test suite needs real Nix, nginx and network namespaces;
          # it runs in CI (tests/run.sh) and in the VM tests, not here.
          doCheck = false;

          meta = {
            inherit (cargoToml.package) description;
            license = with lib.licenses; [
              mit
              asl20
            ];
            mainProgram = "nixless";
            platforms = lib.platforms.linux;
          };
        };

      # The VM tests, each a file under vm-tests/ returning a test for
      # pkgs.testers.runNixOSTest, for both systems (nothing in them is
      # architecture-specific; an aarch64-linux builder runs them in an
      # aarch64 VM). The aarch64 seccomp filter (build.rs compiles
      # src/agent/seccomp.json for both) is also exercised on a real arm64
      # kernel by the Debian VM tier (vm-tests/debian, VMTEST_ARCH=aarch64).
      vmTests = [
        "deploy"
        "bad-signature"
        "health-rollback"
        "self-update"
        "watchdog"
      ];

      # The module evaluated with this flake's nixpkgs, or with a release's
      # (`nix flake check --override-input nixpkgs
      # github:NixOS/nixpkgs/nixos-25.05`): a plain machine gets no warning
      # (a renamed option warns) and no failed assertion; a machine on
      # nixpkgs' image-based-appliance profile (system.switch.enable = false)
      # is refused with the reason. Evaluation only, nothing is built.
      moduleEval =
        pkgs:
        let
          machine =
            extra:
            lib.nixosSystem {
              modules = [
                self.nixosModules.default
                {
                  nixpkgs.hostPlatform = pkgs.stdenv.hostPlatform.system;
                  system.stateVersion = lib.trivial.release;
                  nix.enable = false;
                  boot.loader.grub.enable = false;
                  fileSystems."/" = {
                    device = "/dev/vda1";
                    fsType = "ext4";
                  };
                  services.nixless = {
                    enable = true;
                    caches = [ "https://cache.example.org" ];
                    cacheKeys = [ (lib.fileContents ./vm-tests/keys/cache.pub) ];
                    deployKeys = [ (lib.fileContents ./vm-tests/keys/deploy.pub) ];
                  };
                }
                extra
              ];
            };
          failed = sys: map (a: a.message) (lib.filter (a: !a.assertion) sys.config.assertions);
          plain = machine { };
          appliance = machine (
            { modulesPath, ... }:
            {
              imports = [ "${modulesPath}/profiles/image-based-appliance.nix" ];
            }
          );
        in
        pkgs.runCommand "nixless-module-eval"
          {
            nativeBuildInputs = [ pkgs.jq ];
            report = builtins.toJSON {
              release = lib.trivial.release;
              plainWarnings = plain.config.warnings;
              plainFailedAssertions = failed plain;
              applianceFailedAssertions = failed appliance;
            };
            passAsFile = [ "report" ];
          }
          ''
            jq . "$reportPath"
            jq -e '.plainWarnings == [] and .plainFailedAssertions == []
              and any(.applianceFailedAssertions[]; contains("system.switch.enable = true"))' \
              "$reportPath" >/dev/null || exit 1
            touch "$out"
          '';
    in
    {
      # aarch64-linux's package builds natively on an aarch64 builder; an
      # x86_64 machine cross-builds the same static musl binary as
      # nixless-aarch64: pkgsCross.aarch64-multiplatform (lib/systems/examples.nix,
      # config aarch64-unknown-linux-gnu) whose pkgsStatic
      # (pkgs/top-level/stage.nix: makeMuslParsedPlatform, isStatic) is
      # aarch64-unknown-linux-musl, the target tests/run.sh builds and tests.
      packages = forAllSystems (
        pkgs:
        rec {
          nixless = mkNixless pkgs;
          default = nixless;
        }
        // lib.optionalAttrs (pkgs.stdenv.hostPlatform.system == "x86_64-linux") {
          nixless-aarch64 = mkNixless pkgs.pkgsCross.aarch64-multiplatform;
        }
      );

      overlays.default = final: _prev: { nixless = mkNixless final; };

      nixosModules.default =
        { lib, pkgs, ... }:
        {
          imports = [ ./nixos/module.nix ];
          services.nixless.package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        };
      nixosModules.nixless = self.nixosModules.default;

      checks = forAllSystems (
        pkgs:
        let
          nixlessPackage = self.packages.${pkgs.stdenv.hostPlatform.system}.default;
          args = {
            inherit pkgs nixlessPackage;
            nixlessModule = self.nixosModules.default;
          };
        in
        {
          package = nixlessPackage;
          module-eval = moduleEval pkgs;
        }
        // lib.genAttrs (map (t: "vm-${t}") vmTests) (
          check: pkgs.testers.runNixOSTest (import (./vm-tests + "/${lib.removePrefix "vm-" check}.nix") args)
        )
      );

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          packages = with pkgs; [
            cargo
            rustc
            clippy
            rustfmt
            nix
            nginx
          ];
        };
      });

      apps = forAllSystems (
        pkgs:
        let
          nixless = self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        in
        {
          default = {
            type = "app";
            program = "${nixless}/bin/nixless";
            meta.description = "nixless: deploy, status, keygen, install, verify";
          };
        }
      );
    };
}
