//! The agent: the daemon on the device (`daemon`), its pure core (`machine`,
//! `config`, `status`, `persist`, and the rules the loop asks what is due:
//! `schedule`, `helper_watch`, `health`, `throttle`) and its edges (`http`,
//! `notify`, `seccomp`). It sits above everything but the command line: nothing under
//! it (`deploy`, `switch`, `store`, `admin`, …) imports from it, which
//! tests/layering.rs checks.
//!
//! Byte-index slicing of `str` is denied here: an index from a length or a
//! search can land inside a character and panic, and everything the agent
//! handles may come from a stranger. Use `str::get`, `char_indices` or
//! `crate::text::clip`.

#![deny(clippy::string_slice)]

pub mod config;
pub mod daemon;
pub mod fuzz;
pub mod health;
pub mod helper_watch;
pub mod http;
pub mod machine;
pub mod notify;
pub mod persist;
pub mod push;
pub mod schedule;
pub mod seccomp;
pub mod status;
pub mod throttle;
