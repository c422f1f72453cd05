//! What one device does with a verified channel document: a pure function
//! of the document, the device, what it remembers of the channel, and the
//! effective time ([`super::fresh::Clock::now`]).
//!
//! ```text
//! expired (now >= expires)                       → refused  Expired
//! seq < record.seq                               → refused  Stale        (no downgrade, no replay)
//! seq = record.seq, other bytes                  → refused  SeqReused
//! halt                                           → Halted
//! no tag of the device names a group             → NotForMe
//! group halt                                     → Halted
//! device runs (or will boot) the group's system   → AlreadyRunning
//! the group's system failed here before          → FailedBefore
//! no wave covers the device's position           → NotInPlan
//! its wave starts after now                      → Wait(until start)
//! otherwise                                      → Deploy
//! ```
//! The same document (same sequence and bytes) is evaluated again on every
//! poll: waves open as time passes. A device's group is the first of its
//! tags, in config order, that the document names: the document's groups
//! are a JSON object, which has no order to go by, and the device's
//! config does.
//!
//! `halt` stops devices that have not started the release; one that has
//! (a deploy in progress, which the agent does not interrupt for a channel
//! document) finishes, and its own health checks decide.
//!
//! A device whose update to S failed does not try S again while documents
//! keep naming S; the first document whose group for it names another
//! system clears that memory ([`Record::accept`]), so an admin who wants a
//! retry of S can publish S again after any other release.

use super::{wave, GroupAction, Refusal, Verified};
use crate::nix::StorePath;

/// What the decision needs to know of the device.
#[derive(Debug, Clone, Copy)]
pub struct Device<'a> {
    pub host: &'a str,
    /// The config's tags, in config order.
    pub tags: &'a [String],
    /// The system running now (`/run/current-system`), if known.
    pub running: Option<&'a str>,
    /// The system profile's current generation (the next boot's default),
    /// if known: a `boot` deploy that committed and waits for a reboot
    /// runs the old system, and must not be started again.
    pub profile: Option<&'a str>,
}

/// What the device remembers of its channel (persisted by the agent).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    /// The sequence of the document last accepted (0: none yet).
    pub seq: u64,
    /// sha256 of that document's bytes.
    pub digest: Option<[u8; 32]>,
    /// The system whose update from this channel failed last, if no
    /// document since named another.
    pub failed: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Deploy {
        tag: String,
        /// 1-based.
        wave: usize,
        system: StorePath,
        action: GroupAction,
        caches: Vec<String>,
    },
    /// In wave `wave`, which opens at `until`.
    Wait {
        tag: String,
        wave: usize,
        until: u64,
    },
    /// The group's plan stops before this device's position.
    NotInPlan {
        tag: String,
    },
    Halted,
    NotForMe,
    /// It runs the group's system, or is set to boot it.
    AlreadyRunning {
        tag: String,
    },
    FailedBefore {
        tag: String,
        system: String,
    },
}

impl Decision {
    /// One word for logs and status.
    pub fn name(&self) -> &'static str {
        match self {
            Decision::Deploy { .. } => "deploy",
            Decision::Wait { .. } => "wait",
            Decision::NotInPlan { .. } => "not-in-plan",
            Decision::Halted => "halted",
            Decision::NotForMe => "not-for-me",
            Decision::AlreadyRunning { .. } => "already-running",
            Decision::FailedBefore { .. } => "failed-before",
        }
    }
}

fn group<'d>(v: &'d Verified, tags: &[String]) -> Option<&'d super::Group> {
    tags.iter().find_map(|t| v.doc.groups.iter().find(|g| g.tag == *t))
}

/// Sequence and freshness only: whether the document may be accepted at
/// all (then [`Record::accept`] it).
pub fn admissible(v: &Verified, record: &Record, now: u64) -> Result<(), Refusal> {
    let d = &v.doc;
    // The document's own issue time is a floor for now, as it is for the
    // clock ([`super::fresh`]); `issued < expires` is checked by parse.
    let now = now.max(d.issued);
    if super::fresh::expired(d.expires, now) {
        return Err(Refusal::Expired { expires: d.expires, now });
    }
    if d.seq < record.seq {
        return Err(Refusal::Stale { seq: d.seq, accepted: record.seq });
    }
    if d.seq == record.seq && record.digest.is_some_and(|h| h != v.digest) {
        return Err(Refusal::SeqReused(d.seq));
    }
    Ok(())
}

pub fn decide(v: &Verified, dev: &Device, record: &Record, now: u64) -> Result<Decision, Refusal> {
    admissible(v, record, now)?;
    let d = &v.doc;
    let now = now.max(d.issued);
    if d.halt {
        return Ok(Decision::Halted);
    }
    let Some(g) = group(v, dev.tags) else { return Ok(Decision::NotForMe) };
    let tag = g.tag.clone();
    if g.halt {
        return Ok(Decision::Halted);
    }
    let system = g.system.to_absolute();
    let is_it = |p: Option<&str>| p.and_then(|p| StorePath::from_absolute(p).ok()).is_some_and(|p| p == g.system);
    if is_it(dev.running) || is_it(dev.profile) {
        return Ok(Decision::AlreadyRunning { tag });
    }
    if record.failed.as_deref() == Some(system.as_str()) {
        return Ok(Decision::FailedBefore { tag, system });
    }
    let Some(i) = wave::wave_of(&g.waves, wave::position(&d.channel, dev.host)) else {
        return Ok(Decision::NotInPlan { tag });
    };
    let start = g.waves[i].start;
    if start > now {
        return Ok(Decision::Wait { tag, wave: i + 1, until: start });
    }
    Ok(Decision::Deploy { tag, wave: i + 1, system: g.system.clone(), action: g.action, caches: g.caches.clone() })
}

impl Record {
    /// Remembers an admissible document (call it only after [`decide`] or
    /// [`admissible`] said Ok): its sequence and bytes, and
    /// forgets a failed system the document no longer names for this
    /// device. Returns whether anything changed (and must be persisted).
    pub fn accept(&mut self, v: &Verified, tags: &[String]) -> bool {
        let before = self.clone();
        self.seq = v.doc.seq;
        self.digest = Some(v.digest);
        if let Some(g) = group(v, tags) {
            if self.failed.as_deref().is_some_and(|f| f != g.system.to_absolute()) {
                self.failed = None;
            }
        }
        *self != before
    }

    /// A deploy of `system` from this channel failed (rolled back or never
    /// switched): do not try it again.
    pub fn failed(&mut self, system: &str) {
        self.failed = Some(system.to_owned());
    }

    /// A deploy from this channel committed.
    pub fn succeeded(&mut self) {
        self.failed = None;
    }
}
