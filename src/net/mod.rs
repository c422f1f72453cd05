//! The network engine: sans-IO HTTP/1.1 ([`http1`]) driven from one
//! `poll(2)` loop over many connections ([`engine`]).

pub mod dns;
pub mod engine;
pub mod http1;
pub mod resolve;
#[cfg(test)]
pub(crate) mod testutil;
pub mod tls;
