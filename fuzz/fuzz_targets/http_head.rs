//! Arbitrary bytes as an HTTP request head: the agent's request parser.
//! Oracles in `nixless::agent::fuzz::http_head`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| nixless::agent::fuzz::http_head(data));
