//! Arbitrary bytes as a deploy document (signature check → JSON →
//! validation). Oracles in `nixless::agent::fuzz::deploy_document`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| nixless::agent::fuzz::deploy_document(data));
