//! nixless: install NixOS closures from Nix binary caches, without Nix.
//!
//! Byte-index slicing of `str` (which panics inside a character) is denied
//! in all library code: everything here handles bytes from the network, a
//! cache, a file or a config. Tests may slice their own fixtures.

#![cfg_attr(not(test), deny(clippy::string_slice))]

pub mod admin;
pub mod agent;
pub mod api;
pub mod auth;
pub mod channel;

pub mod cli;
pub mod clock;
pub mod console;
pub mod deploy;
pub mod fetch;
pub mod fleet;
pub mod json;
pub mod logger;
pub mod nar;
pub mod net;
pub mod nix;
pub mod store;
pub mod switch;
#[cfg(test)]
mod testkit;
pub mod text;
