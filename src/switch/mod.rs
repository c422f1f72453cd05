//! The switch side: the protocol files shared with the oneshot
//! `nixless-switch.service` (with the steps and the helper's result codes),
//! and (issue C) the helper it runs. Below the agent: the helper gets its
//! own narrow [`helper::Config`], built by the agent's config parser.

pub mod capture;
pub mod helper;
pub mod leftovers;
pub mod protocol;
