//! nixless: install NixOS closures from Nix binary caches, without Nix.

pub mod admin;
pub mod agent;

pub mod cli;
pub mod fetch;
pub mod json;
pub mod logger;
pub mod nar;
pub mod nix;
pub mod store;
pub mod switch;
pub mod text;
