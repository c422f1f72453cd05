//! Following a channel (issue 13): the loop's side of [`crate::channel`].
//!
//! ```text
//! every poll_interval_secs (+ up to a tenth of jitter), while idle:
//!   keys_url?    GET URL, URL.sig → keys::verify(trusted keys, last rotation, clock)
//!                → apply: trusted keys := the rotation's, clock floor := issued; persisted
//!   channel_url? GET URL, URL.sig → channel::verify(trusted keys, channel name)
//!                → decide(host, tags, running system, profile system; record; clock)
//!                → refused (expired, replayed, reused seq, other channel, bad signature):
//!                  one line in status and the log, nothing changes
//!                → record.accept, clock floor := issued; persisted (only if changed);
//!                  deploy: the job a signed deploy starts (origin channel, same
//!                  fetch / switch / health / commit); wait: the next check is no
//!                  later than the wave's start
//! ```
//! Sequence spaces: deploy documents (POST, `poll_url`) are checked against
//! `highest_seq`, channel documents against the channel record's `seq`,
//! and a job of either origin never moves the other's. The two are
//! different instructions: a deploy document speaks to one host, a channel
//! to a fleet, and an admin numbers them in different places (a per-host
//! counter; the channel's CI). When both are configured the channel is the
//! declared state: a per-device deploy runs, and at the next check a
//! channel whose wave is open for this device deploys its group's system
//! again unless the device runs it. To hold a device on something else,
//! halt its group (or give it no tag the channel names).
//!
//! The document of a channel job is kept as `channel.json` (+ `.sig`) in
//! the state dir; the fetch re-verifies it for its group's caches.

use super::*;
use crate::channel::{self, fresh::Clock, keys, Decision, Device, GroupAction, Verified};

const CHANNEL_DOC: &str = "channel.json";
const CHANNEL_SIG: &str = "channel.json.sig";

/// `URL.sig`; for `s3://` the object key takes the suffix, before the query.
pub(super) fn sig_url(url: &str) -> String {
    match url.split_once('?') {
        Some((base, query)) if url.starts_with("s3://") => format!("{base}.sig?{query}"),
        _ => format!("{url}.sig"),
    }
}

fn clock(ctx: &Ctx, state: &State) -> Clock {
    Clock::new(state.clock_floor, Some(ctx.cfg.clock_floor))
}

/// What status shows of the channel: the config's URLs and name, what the
/// checks found ([`Shared::channel`]), the persisted record (accepted seq,
/// failed system), the rotation and the clock floor.
pub(super) fn view(ctx: &Ctx, sh: &Shared) -> Option<api::Channel> {
    let cfg = &ctx.cfg;
    if cfg.channel.is_none() && cfg.keys_url.is_none() {
        return None;
    }
    let mut v = sh.channel.clone().unwrap_or_default();
    v.url = cfg.channel.as_ref().map(|c| c.url.clone());
    v.name = cfg.channel.as_ref().map(|c| c.name.clone());
    let rec = &sh.state.channel;
    v.accepted_seq = (rec.seq > 0).then_some(rec.seq);
    v.failed_system = rec.failed.clone();
    v.keys_url = cfg.keys_url.clone();
    v.keys_seq = sh.state.rotation.as_ref().map(|r| r.seq);
    v.clock_floor = clock(ctx, &sh.state).floor();
    Some(v)
}

/// The device's group, its 1-based wave in that group's plan (0: not in
/// the plan) and the system the group names ("" when none applies). Shown
/// whatever the decision, so a fleet view can count waves even of hosts
/// that already run the release or failed it.
fn placement(v: &Verified, tags: &[String], host: &str) -> (String, u64, String) {
    let Some(g) = tags.iter().find_map(|t| v.doc.groups.iter().find(|g| g.tag == *t)) else {
        return (String::new(), 0, String::new());
    };
    match channel::wave::wave_of(&g.waves, channel::wave::position(&v.doc.channel, host)) {
        Some(i) => (g.tag.clone(), i as u64 + 1, g.system.to_absolute()),
        None => (g.tag.clone(), 0, String::new()),
    }
}

/// Sets a check's error; a new one is logged once (a check that keeps
/// failing the same way every interval would flood the log).
fn note(ctx: &Ctx, slot: &mut Option<String>, new: Option<String>) {
    if let Some(line) = new.as_ref().filter(|l| slot.as_ref() != Some(*l)) {
        log::warn!("{line}");
        persist::log_event(&ctx.cfg.state_dir, now(), line);
    }
    *slot = new;
}

fn channel_error(ctx: &Ctx, sh: &mut Shared, e: Option<String>) {
    let view = sh.channel.get_or_insert_with(Default::default);
    note(ctx, &mut view.error, e.map(|e| format!("channel: {e}")));
}

impl Agent {
    /// A key rotation document and its signature (or why not), judged.
    pub(super) fn follow_keys(&mut self, url: &str, fetched: Result<(Vec<u8>, Vec<u8>), String>) {
        let ctx = self.ctx.clone();
        let mut sh = self.shared.borrow_mut();
        let sh = &mut *sh;
        let wall = now();
        let result = fetched.and_then(|(body, sig)| {
            let last = sh.state.rotation.as_ref().map(|a| (a.seq, a.digest));
            let t = clock(&ctx, &sh.state).now(wall);
            keys::verify(&body, Some(&sig), &sh.keys, last, t).map_err(|e| format!("{url}: {e}"))
        });
        let error = match result {
            Ok(keys::Outcome::AlreadyApplied) => None,
            Ok(keys::Outcome::Apply(r)) => {
                let mut next = sh.state.clone();
                next.rotation = Some(r.applied(&ctx.cfg.deploy_keys));
                next.clock_floor = next.clock_floor.max(r.issued);
                match persist::save(&ctx.cfg.state_dir, &next) {
                    Ok(()) => {
                        sh.state = next;
                        sh.keys = keys::effective(&ctx.cfg.deploy_keys, sh.state.rotation.as_ref());
                        let names: Vec<&str> = sh.keys.keys().iter().map(|k| k.name()).collect();
                        let line = format!(
                            "deploy keys rotated (rotation seq {}, signed by {}): trusting {}",
                            r.seq,
                            crate::text::clip(&r.signer, crate::text::FIELD_MAX),
                            names.join(", ")
                        );
                        log::info!("{line}");
                        persist::log_event(&ctx.cfg.state_dir, now(), &line);
                        None
                    }
                    Err(e) => Some(format!("{url}: cannot record the key rotation: {e}")),
                }
            }
            Err(e) => Some(e),
        };
        let view = sh.channel.get_or_insert_with(Default::default);
        note(&ctx, &mut view.keys_error, error.map(|e| format!("keys: {e}")));
    }

    /// A channel document and its signature (or why not), judged and
    /// acted on.
    pub(super) fn follow_channel(
        &mut self,
        ch: &crate::agent::config::Channel,
        fetched: Result<(Vec<u8>, Vec<u8>), String>,
    ) -> Result<(), String> {
        let ctx = self.ctx.clone();
        let root = &ctx.cfg.root;
        let running = system_link(root, "run/current-system");
        let profile = system_link(root, "nix/var/nix/profiles/system");
        let mut guard = self.shared.borrow_mut();
        let sh = &mut *guard;
        let wall = now();
        sh.channel.get_or_insert_with(Default::default).last_check = Some(wall);
        let (body, sig) = match fetched {
            Ok(b) => b,
            Err(e) => {
                channel_error(&ctx, sh, Some(e));
                return Ok(());
            }
        };
        let v = match channel::verify(&body, Some(&sig), &sh.keys, &ch.name) {
            Ok(v) => v,
            Err(r) => {
                channel_error(&ctx, sh, Some(format!("{}: {r}", ch.url)));
                return Ok(());
            }
        };
        let t = clock(&ctx, &sh.state).now(wall);
        let dev = Device {
            host: &ctx.cfg.host,
            tags: &ctx.cfg.tags,
            running: running.as_deref(),
            profile: profile.as_deref(),
        };
        let decision = match channel::decide(&v, &dev, &sh.state.channel, t) {
            Ok(d) => d,
            Err(r) => {
                channel_error(&ctx, sh, Some(format!("{}: seq {}: {r}", ch.url, v.doc.seq)));
                return Ok(());
            }
        };
        let mut next = sh.state.clone();
        next.channel.accept(&v, &ctx.cfg.tags);
        next.clock_floor = next.clock_floor.max(v.doc.issued);
        let (group, wave, system) = placement(&v, &ctx.cfg.tags, &ctx.cfg.host);
        let previous_decision = sh.channel.as_ref().and_then(|c| Some((c.seq?, c.decision.clone()?)));
        {
            let view = sh.channel.get_or_insert_with(Default::default);
            view.seq = Some(v.doc.seq);
            view.expires = Some(v.doc.expires);
            view.decision = Some(decision.name().to_owned());
            view.group = Some(group);
            view.wave = Some(wave);
            view.system = Some(system);
            view.until = match decision {
                Decision::Wait { until, .. } => Some(until),
                _ => None,
            };
        }
        if previous_decision != Some((v.doc.seq, decision.name().to_owned())) {
            log::info!("channel {} seq {}: {}", ch.name, v.doc.seq, describe(&decision));
        }
        let result = match decision {
            Decision::Deploy { system, action, .. } => {
                accept_channel(&ctx, sh, next, &v, (&body, &sig), &system, action)
            }
            other => {
                if let Decision::Wait { until, .. } = other {
                    // Wall seconds are whole: a check a moment early sees
                    // Wait again with at least a second to go, never a loop.
                    let open = schedule::after(Instant::now(), Duration::from_secs(until.saturating_sub(t)));
                    self.follow.open_at(open);
                }
                match next == sh.state {
                    true => Ok(()),
                    false => persist::save(&ctx.cfg.state_dir, &next)
                        .map(|()| sh.state = next)
                        .map_err(|e| persist_error("persisting the channel record", e)),
                }
            }
        };
        match result {
            Ok(()) => channel_error(&ctx, sh, None),
            // A POST served during the fetch started a deploy: it runs; the
            // channel is looked at again at the next check.
            Err(AcceptError::Busy(_)) => channel_error(&ctx, sh, None),
            Err(AcceptError::Refused(r)) => channel_error(&ctx, sh, Some(r.to_string())),
            Err(AcceptError::NoSpace(e)) => channel_error(&ctx, sh, Some(format!("cannot record the channel: {e}"))),
            Err(AcceptError::Fatal(e)) => return Err(e),
        }
        Ok(())
    }

    /// The caches (and inline narinfos) of the running job's document: a
    /// deploy document's, or the channel group's (re-verified from disk,
    /// as anything read back).
    pub(super) fn job_sources(&self) -> (Vec<String>, Vec<String>) {
        let job = self.shared.borrow().state.job.as_ref().map(|j| (j.origin, j.seq));
        let Some((Origin::Channel, seq)) = job else {
            return self.saved_deploy().map(|d| (d.caches, d.narinfos)).unwrap_or_default();
        };
        let (Some(ch), dir) = (self.ctx.cfg.channel.as_ref(), &self.ctx.cfg.state_dir) else {
            return Default::default();
        };
        let (Ok(body), Ok(sig)) = (std::fs::read(dir.join(CHANNEL_DOC)), std::fs::read(dir.join(CHANNEL_SIG))) else {
            return Default::default();
        };
        let sh = self.shared.borrow();
        let Some(v) = channel::verify(&body, Some(&sig), &sh.keys, &ch.name).ok().filter(|v| v.doc.seq == seq) else {
            return Default::default();
        };
        let caches = self.ctx.cfg.tags.iter().find_map(|t| v.doc.groups.iter().find(|g| g.tag == *t));
        (caches.map(|g| g.caches.clone()).unwrap_or_default(), vec![])
    }
}

fn describe(d: &Decision) -> String {
    match d {
        Decision::Deploy { tag, wave, system, action, .. } => {
            format!("deploy ({} {system}, group {tag} wave {wave})", action.as_str())
        }
        Decision::Wait { tag, wave, until } => format!("wait (group {tag} wave {wave} opens at {until})"),
        Decision::NotInPlan { tag } => format!("not in the plan of group {tag}"),
        Decision::Halted => "halted".into(),
        Decision::NotForMe => "no group for this device's tags".into(),
        Decision::AlreadyRunning { tag } => format!("already running group {tag}'s system"),
        Decision::FailedBefore { tag, system } => format!("group {tag}'s {system} failed here before; not retried"),
    }
}

/// Starts the job a channel's deploy decision asks for, exactly as
/// [`accept`] does for a deploy document: claims the idle agent, keeps the
/// document, persists the record and the job in one state write, queues
/// the fetch. `base` is the state with the document accepted into the
/// channel record.
fn accept_channel(
    ctx: &Ctx,
    sh: &mut Shared,
    base: State,
    v: &Verified,
    (body, sig): (&[u8], &[u8]),
    system: &StorePath,
    action: GroupAction,
) -> Result<(), AcceptError> {
    idle(sh).map_err(AcceptError::Busy)?;
    let action = match action {
        GroupAction::Switch => Action::Switch,
        GroupAction::Boot => Action::Boot,
    };
    let ev = Event::Accepted {
        seq: v.doc.seq,
        action,
        system: system.to_absolute(),
        previous: system_link(&ctx.cfg.root, "run/current-system"),
        boot_id: boot_id(),
        origin: Origin::Channel,
    };
    let (next, effects) = machine::step(&base, ev, now(), ctx.timing);
    if !machine::accepted(&base, &next) {
        return Err(AcceptError::Busy(sh.state.job.as_ref().map(|j| j.seq)));
    }
    let dir = fsutil::open_dir(&ctx.cfg.state_dir).map_err(|e| persist_error("state dir", e))?;
    fsutil::write_atomic(dir.as_fd(), CHANNEL_DOC, body, true)
        .map_err(|e| persist_error("saving the channel document", e))?;
    fsutil::write_atomic(dir.as_fd(), CHANNEL_SIG, sig, true).map_err(|e| persist_error("saving its signature", e))?;
    let line = format!(
        "accepted channel {} seq {} (key {}): {} {} {}",
        v.doc.channel,
        v.doc.seq,
        crate::text::clip(&v.key, crate::text::FIELD_MAX),
        action.as_str(),
        system.to_absolute(),
        next.phase.name()
    );
    super::adopt(ctx, sh, next, effects, &line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_urls() {
        assert_eq!(sig_url("https://x/c.json"), "https://x/c.json.sig");
        assert_eq!(sig_url("https://x/c.json?v=1"), "https://x/c.json?v=1.sig");
        assert_eq!(sig_url("s3://b/c.json?region=r&endpoint=http://h"), "s3://b/c.json.sig?region=r&endpoint=http://h");
        assert_eq!(sig_url("file:///c.json"), "file:///c.json.sig");
    }
}
