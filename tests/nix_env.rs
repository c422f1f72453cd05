//! What NixOS's systemd-boot builder needs from Nix on a device without Nix.
//!
//! nixpkgs' `systemd-boot-builder.py` (`get_generations`) lists the system
//! profile's generations with `@nix@/bin/nix-env --list-generations -p
//! /nix/var/nix/profiles/system`, from the builder's own closure (so it is
//! there with `nix.enable = false`), keeping the first word of each line as
//! the generation number; everything else it reads from the
//! `system-N-link`s. Here real Nix (2.8) runs that command the way the
//! device runs it (as root, no nix.conf, no Nix database) on a profile that
//! nixless linked, and must list exactly nixless's generations. It opens the
//! store as it starts, which creates an empty database under
//! /nix/var/nix/db: nixless never reads it (see README, NixOS).

mod common;

use common::rm_rf;
use nixless::store::profile;
use std::path::Path;
use std::process::Command;

const A: &str = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-nixos-system-a";
const B: &str = "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-nixos-system-b";

/// `nix-env --list-generations` as the builder runs it, with `root` as the
/// store's root (a chroot store: its state lives under root/nix/var/nix).
fn list_generations(root: &Path, home: &Path) -> std::process::Output {
    let profile = profile::profiles_dir(root).join("system");
    Command::new("nix-env")
        .args(["--list-generations", "-p"])
        .arg(&profile)
        .arg("--store")
        .arg(root)
        // The device has no /etc/nix/nix.conf and no Nix settings.
        .env_remove("NIX_CONFIG")
        .env("NIX_CONF_DIR", home)
        .env("HOME", home)
        .output()
        .expect("running nix-env (apt-get install nix-bin)")
}

/// The generation numbers, parsed as the builder parses them.
fn builder_generations(stdout: &str) -> Vec<u64> {
    stdout
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(|w| w.parse().unwrap_or_else(|_| panic!("the builder's int(line.split()[0]) fails on {w:?}")))
        .collect()
}

#[test]
fn nix_env_lists_the_generations_nixless_linked_without_a_nix_database() {
    let root = tempfile::Builder::new().prefix("nixless-nixenv-").tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    for system in [A, B, A] {
        profile::commit(root.path(), system).unwrap();
    }
    // What a crash in the middle of a profile switch can leave behind.
    std::os::unix::fs::symlink(B, profile::profiles_dir(root.path()).join(".system-4-link.tmp")).unwrap();
    let db = root.path().join("nix/var/nix/db");
    assert!(!db.exists(), "no Nix database to begin with");

    let out = list_generations(root.path(), home.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "nix-env failed: {}{stdout}", String::from_utf8_lossy(&out.stderr));
    let ours: Vec<u64> = profile::generations(root.path()).into_iter().map(|(n, _)| n).collect();
    assert_eq!(ours, vec![1, 2, 3]);
    assert_eq!(builder_generations(&stdout), ours, "{stdout}");
    let current: Vec<&str> = stdout.lines().filter(|l| l.contains("(current)")).collect();
    assert_eq!(current.len(), 1, "{stdout}");
    assert_eq!(current[0].split_whitespace().next(), Some("3"), "{stdout}");

    // The side effect: an empty database, which knows none of the store.
    assert!(db.join("db.sqlite").is_file(), "nix-env opened (and so created) the store's database");
    assert_eq!(profile::current(root.path()).map(|(n, _)| n), Some(3), "the profile is untouched");
    rm_rf(root.path());
}
