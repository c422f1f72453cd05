//! nixless: install NixOS closures from Nix binary caches, without Nix.

pub mod nix;
pub mod nar;
