//! nixless: install NixOS closures from Nix binary caches, without Nix.

pub mod nix;
pub mod nar;
pub mod fetch;
pub mod store;
pub mod cli;
pub mod logger;
