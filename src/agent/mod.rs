//! The agent: the daemon on the device (`daemon`), its pure core (`machine`,
//! `deploy`, `config`, `status`, `persist`) and its edges (`http`, `notify`,
//! `seccomp`).

pub mod config;
pub mod daemon;
pub mod deploy;
pub mod http;
pub mod machine;
pub mod notify;
pub mod persist;
pub mod seccomp;
pub mod status;
