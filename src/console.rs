//! Commands for an operator at the device's console: `nixless rollback`
//! and `nixless gc`. Both refuse to run while the agent is in the middle of
//! an update (its state says so), so they never race it.
//!
//! Beside `cli`, above the agent: it reads the agent's config and state
//! file, so it is an entry point, not part of `switch`.

use crate::agent::config::Config;
use crate::agent::machine::Phase;
use crate::agent::persist;
use crate::store::{gc, profile, Store};
use crate::switch::helper::{self, run_captured};
use std::path::Path;
use std::process::Command;

fn idle(cfg: &Config) -> Result<(), String> {
    let st = persist::load(&cfg.state_dir)?;
    if st.phase != Phase::Idle {
        let seq = st.job.map(|j| j.seq).unwrap_or(0);
        return Err(format!("the agent is {} (seq {seq}); wait for it to finish", st.phase.name()));
    }
    Ok(())
}

/// Switches to the generation before the current one, like
/// `nixos-rebuild switch --rollback`: the profile link first, then that
/// system's `switch-to-configuration switch`.
pub fn rollback(config: &Path, dry_run: bool) -> Result<(), String> {
    let cfg = Config::load(config)?;
    idle(&cfg)?;
    let (cur, _) = profile::current(&cfg.root).ok_or("no current system generation in the profile")?;
    let (prev, system) = profile::previous(&cfg.root).ok_or(format!("no generation before {cur}"))?;
    let store = Store::open(&cfg.root, &cfg.state_dir).map_err(|e| format!("opening store: {e}"))?;
    let stc = helper::check_system(&cfg.root, &store, &system)?;
    println!("generation {cur} -> {prev}: {system}");
    if dry_run {
        return Ok(());
    }
    profile::set_current(&cfg.root, prev).map_err(|e| format!("setting profile: {e}"))?;
    persist::log_event(
        &cfg.state_dir,
        crate::clock::now(),
        &format!("console rollback to generation {prev}: {system}"),
    );
    let (code, tail) = run_captured(Command::new(&stc).arg("switch"), None);
    if code != Some(0) {
        return Err(format!("switch-to-configuration switch exited {code:?}: {}", tail.lines().last().unwrap_or("")));
    }
    Ok(())
}

pub fn gc(config: &Path, dry_run: bool, no_wait: bool) -> Result<(), String> {
    let cfg = Config::load(config)?;
    idle(&cfg)?;
    let store = Store::open(&cfg.root, &cfg.state_dir).map_err(|e| format!("opening store: {e}"))?;
    // The agent's fetch and another console install or gc hold it too.
    let lock = crate::cli::lock_store(&store, no_wait)?;
    let (roots, keep) = gc::roots(&cfg.root, cfg.generations_to_keep)?;
    let report = gc::collect(&lock, &roots, dry_run)?;
    for p in &report.deleted {
        println!("{} {p}", if dry_run { "would delete" } else { "deleted" });
    }
    if !dry_run {
        profile::delete_generations(&cfg.root, &keep).map_err(|e| format!("deleting old generations: {e}"))?;
    }
    eprintln!("{report}");
    Ok(())
}
