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
      # pkgs.testers.runNixOSTest. x86_64 only: the agent's seccomp allowlist
      # (src/agent/seccomp.json) is written for the x86_64 syscall table.
      vmTests = [
        "deploy"
        "bad-signature"
        "health-rollback"
        "self-update"
        "watchdog"
      ];
    in
    {
      packages = forAllSystems (pkgs: rec {
        nixless = mkNixless pkgs;
        default = nixless;
      });

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
        { package = nixlessPackage; }
        // lib.optionalAttrs (pkgs.stdenv.hostPlatform.system == "x86_64-linux") (
          lib.genAttrs (map (t: "vm-${t}") vmTests) (
            check: pkgs.testers.runNixOSTest (import (./vm-tests + "/${lib.removePrefix "vm-" check}.nix") args)
          )
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
