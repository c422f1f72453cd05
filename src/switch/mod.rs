//! The switch side: the protocol files shared with the oneshot
//! `nixless-switch.service`, and (issue C) the helper it runs.

pub mod capture;
pub mod console;
pub mod helper;
pub mod leftovers;
pub mod profile;
pub mod protocol;
