//! Nix's formats, as plain functions over bytes: no I/O here.

pub mod base64;
pub mod cache_info;
pub mod hash;
pub mod keys;
pub mod narinfo;
pub mod nixbase32;
pub mod store_path;

pub use hash::Sha256;
pub use keys::{PublicKey, SecretKey, TrustedKeys};
pub use narinfo::{Compression, NarInfo};
pub use store_path::{StorePath, STORE_DIR};
