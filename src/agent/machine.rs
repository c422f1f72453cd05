//! The update state machine, as a pure function.
//!
//! ```text
//!            Accepted(switch|boot)            FetchOk(switch)          result 0
//!   Idle ───────────────────────▶ Fetching ─────────────────▶ Switching(test) ───────▶ Verifying
//!    ▲                               │ FetchFailed                 │ result ≠ 0            │ Healthy
//!    │                               ▼                             ▼                       ▼
//!    │◀──────────── failed ──────────┘              Switching(rollback-test) ◀─ Unhealthy  Committing
//!    │◀──── rolled-back / rollback-failed ──────────────┘                      ◀─ timeout    │ CommitOk
//!    │                                                                                       ▼
//!    │◀──────────────────────── committed ──────────────────────────────── Switching(boot) ◀─┘
//! ```
//! A `boot` deploy goes Fetching → Committing → Switching(boot). A signed
//! `rollback` is a switch to the previous generation without a fetch; `gc`
//! collects garbage and returns to Idle.
//!
//! `step(state, event, now)` returns the next state and the effects the
//! agent loop must perform; the loop persists the state *before* performing
//! them, so every crash point is a state in which `Resumed` re-issues what
//! is still needed (and a switch request is never issued twice: see
//! [`Effect::RequestSwitch`]). Each deploy may take at most
//! [`MAX_TRANSITIONS`] steps, which bounds restart loops.

use crate::channel::keys::Applied;
use crate::channel::Record;
use crate::deploy::Action;
use crate::switch::protocol::{Step, INHIBITED, NO_ONE_SHOT, REFUSED};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    Idle,
    Fetching,
    Switching {
        step: Step,
        id: u64,
    },
    Verifying {
        deadline: u64,
    },
    Committing,
    Collecting,
    /// A `boot` deploy is set up for a one-time boot; the next boot tells.
    AwaitingReboot,
}

impl Phase {
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Fetching => "fetching",
            Phase::Switching { step: Step::RollbackTest, .. } => "rolling-back",
            Phase::Switching { .. } => "switching",
            Phase::Verifying { .. } => "verifying",
            Phase::Committing => "committing",
            Phase::Collecting => "collecting",
            Phase::AwaitingReboot => "awaiting-reboot",
        }
    }
}

/// How a deploy ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Committed,
    RolledBack,
    RollbackFailed,
    /// Refused before anything changed (bad signature, replay, …).
    Rejected,
    /// Failed without changing the running system (fetch failed, …).
    Failed,
    /// A `gc` finished.
    Collected,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Committed => "committed",
            Outcome::RolledBack => "rolled-back",
            Outcome::RollbackFailed => "rollback-failed",
            Outcome::Rejected => "rejected",
            Outcome::Failed => "failed",
            Outcome::Collected => "collected",
        }
    }

    pub fn parse(s: &str) -> Option<Outcome> {
        [
            Outcome::Committed,
            Outcome::RolledBack,
            Outcome::RollbackFailed,
            Outcome::Rejected,
            Outcome::Failed,
            Outcome::Collected,
        ]
        .into_iter()
        .find(|o| o.as_str() == s)
    }

    pub const ALL: [Outcome; 6] = [
        Outcome::Committed,
        Outcome::RolledBack,
        Outcome::RollbackFailed,
        Outcome::Rejected,
        Outcome::Failed,
        Outcome::Collected,
    ];
}

/// Where a job came from. The two have separate sequence spaces: a
/// deploy document's `seq` is checked against [`State::highest_seq`], a
/// channel document's against [`State::channel`]'s, so a channel job must
/// not raise `highest_seq` (a channel at seq 900 would lock out every
/// per-device deploy below 900).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Origin {
    /// A signed deploy document (POST or `poll_url`).
    #[default]
    Deploy,
    /// A channel document (`channel_url`); the job's `seq` is the channel's.
    Channel,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Deploy => "deploy",
            Origin::Channel => "channel",
        }
    }
}

/// The deploy in progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// The document's sequence, in its origin's sequence space.
    pub seq: u64,
    pub action: Action,
    pub system: String,
    /// The system running when the deploy was accepted (rollback target).
    pub previous: Option<String>,
    pub started: u64,
    pub transitions: u32,
    /// Why the update is being rolled back, once it is.
    pub failure: Option<String>,
    /// The kernel boot id when the new system was switched to: a different
    /// one while verifying means the machine rebooted.
    pub boot_id: Option<String>,
    /// A `boot` deploy whose new system did boot (then being verified).
    pub booted_new: bool,
    pub origin: Origin,
}

/// The last finished deploy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Last {
    pub seq: u64,
    pub action: Action,
    pub system: String,
    pub outcome: Outcome,
    pub reason: Option<String>,
    pub finished: u64,
    pub origin: Origin,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    /// The highest sequence number ever accepted; only higher ones are.
    pub highest_seq: u64,
    /// Switch request ids are never reused.
    pub next_switch_id: u64,
    pub phase: Phase,
    pub job: Option<Job>,
    pub last: Option<Last>,
    /// Finished deploys by outcome, indexed like [`Outcome::ALL`].
    pub outcomes: [u64; 6],
    /// What the device remembers of its channel: the last accepted
    /// document's sequence and digest, and the system that failed here.
    pub channel: Record,
    /// The newest verified `issued` time (channel or key rotation): the
    /// clock floor ([`crate::channel::fresh`]). 0: none yet.
    pub clock_floor: u64,
    /// The key rotation applied last, if any ([`crate::channel::keys`]).
    pub rotation: Option<Applied>,
}

impl Default for State {
    fn default() -> Self {
        State {
            highest_seq: 0,
            next_switch_id: 1,
            phase: Phase::Idle,
            job: None,
            last: None,
            outcomes: [0; 6],
            channel: Record::default(),
            clock_floor: 0,
            rotation: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A verified deploy document (the loop has checked signature, host,
    /// sequence), or a channel document whose decision was deploy.
    /// `previous` is the system running now, `boot_id` the kernel's boot
    /// id now.
    Accepted {
        seq: u64,
        action: Action,
        system: String,
        previous: Option<String>,
        boot_id: Option<String>,
        origin: Origin,
    },
    /// The agent (re)started with this boot id, and this system booted.
    Resumed {
        boot_id: Option<String>,
        booted: Option<String>,
    },
    FetchOk,
    FetchFailed(String),
    /// The switch helper's result for request `id`: exit code (`None` if it
    /// never produced one, e.g. it died or timed out) and output tail.
    SwitchResult {
        id: u64,
        code: Option<i32>,
        tail: String,
    },
    Healthy,
    Unhealthy(String),
    CommitOk,
    CommitFailed(String),
    GcDone(Result<String, String>),
    /// Refused before anything changed (e.g. not enough disk space even
    /// after collecting garbage).
    Refused(String),
}

/// What the loop must do after persisting the new state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Install the job's closure (idempotent: present paths are skipped).
    Fetch,
    /// Ensure a switch request `id` exists. The loop writes it only if
    /// neither the request nor a result with that id is on disk yet, and
    /// the helper runs each id at most once, so re-issuing after a crash
    /// never repeats a switch.
    RequestSwitch {
        id: u64,
        step: Step,
        system: String,
    },
    /// Start (or continue) health checks.
    CheckHealth,
    /// New system-N-link, atomic swap of the system profile (idempotent).
    Commit,
    /// Point the profile back at the newest generation of the job's
    /// previous system (idempotent).
    RestoreProfile,
    CollectGarbage,
}

pub const MAX_TRANSITIONS: u32 = 32;

/// Knobs the machine needs.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How long health checks may take before the update is rolled back.
    pub health_timeout_secs: u64,
    /// A `switch` whose `test` switch inhibitors refuse becomes a `boot`
    /// deploy (config `inhibited_switch: "boot"`) instead of failing.
    pub boot_when_inhibited: bool,
}

/// Ends the job. A channel job that did not commit marks its system failed
/// in the channel record, in the same persisted step, so the device never
/// starts it again from that channel (issue 13: no retry of a failure).
fn finish(s: &mut State, outcome: Outcome, reason: Option<String>, now: u64) {
    if let Some(job) = s.job.take() {
        if job.origin == Origin::Channel {
            match outcome {
                Outcome::Committed => s.channel.succeeded(),
                _ => s.channel.failed(&job.system),
            }
        }
        let origin = job.origin;
        s.last =
            Some(Last { seq: job.seq, action: job.action, system: job.system, outcome, reason, finished: now, origin });
    }
    let i = Outcome::ALL.iter().position(|o| *o == outcome).expect("listed");
    s.outcomes[i] += 1;
    s.phase = Phase::Idle;
}

fn switch(s: &mut State, step: Step, system: String) -> Vec<Effect> {
    let id = s.next_switch_id;
    s.next_switch_id += 1;
    s.phase = Phase::Switching { step, id };
    vec![Effect::RequestSwitch { id, step, system }]
}

/// Undo a failed switch: `test` of the previous system, or give up honestly.
fn roll_back(s: &mut State, reason: String, now: u64) -> Vec<Effect> {
    let job = s.job.as_mut().expect("rolling back a job");
    job.failure = Some(reason.clone());
    match job.previous.clone() {
        Some(prev) => switch(s, Step::RollbackTest, prev),
        None => {
            finish(s, Outcome::RollbackFailed, Some(format!("{reason}; no previous system to roll back to")), now);
            vec![]
        }
    }
}

fn describe_exit(code: Option<i32>, tail: &str) -> String {
    let what = match code {
        Some(2) => "activation failed (exit 2)".to_string(),
        Some(4) => "some units failed to start (exit 4)".to_string(),
        Some(100) => "a reboot is needed to switch (exit 100); deploy with action boot".to_string(),
        Some(REFUSED) => "the switch helper refused the request".to_string(),
        Some(INHIBITED) => {
            "needs a reboot: deploy with action boot (refused by system.switch.inhibitors, exit 1)".to_string()
        }
        Some(c) => format!("exit {c}"),
        None => "no result (helper died or timed out)".to_string(),
    };
    let tail = tail.trim();
    if tail.is_empty() {
        what
    } else {
        let last = tail.lines().last().unwrap_or("");
        format!("{what}: {last}")
    }
}

/// Whether a new deploy may be accepted now: only an idle agent takes one.
pub fn can_accept(s: &State) -> bool {
    s.phase == Phase::Idle
}

/// Whether `next`, the result of stepping `before` with `Accepted`, is a
/// new job (and not the refusal of a second one).
pub fn accepted(before: &State, next: &State) -> bool {
    can_accept(before) && next.phase != Phase::Idle
}

/// One transition.
pub fn step(s: &State, ev: Event, now: u64, t: Timing) -> (State, Vec<Effect>) {
    // One deploy at a time: a second `Accepted` while a job runs changes
    // nothing at all (not even the transition count), and the caller sees
    // that through [`accepted`].
    if matches!(ev, Event::Accepted { .. }) && !can_accept(s) {
        return (s.clone(), vec![]);
    }
    let mut s = s.clone();
    if let Some(job) = s.job.as_mut() {
        job.transitions += 1;
        if job.transitions > MAX_TRANSITIONS {
            let reason =
                format!("gave up after {MAX_TRANSITIONS} transitions (restart loop?) in phase {}", s.phase.name());
            finish(&mut s, Outcome::Failed, Some(reason), now);
            return (s, vec![]);
        }
    }
    let effects = match (s.phase.clone(), ev) {
        (Phase::Idle, Event::Accepted { seq, action, system, previous, boot_id, origin }) => {
            if origin == Origin::Deploy {
                s.highest_seq = s.highest_seq.max(seq);
            }
            s.job = Some(Job {
                seq,
                action,
                system: system.clone(),
                previous,
                started: now,
                transitions: 0,
                failure: None,
                boot_id,
                booted_new: false,
                origin,
            });
            match action {
                Action::Switch | Action::Boot => {
                    s.phase = Phase::Fetching;
                    vec![Effect::Fetch]
                }
                Action::Rollback => switch(&mut s, Step::Test, system),
                Action::Gc => {
                    s.phase = Phase::Collecting;
                    vec![Effect::CollectGarbage]
                }
            }
        }
        (Phase::Collecting, Event::GcDone(res)) => {
            match res {
                Ok(summary) => finish(&mut s, Outcome::Collected, Some(summary), now),
                Err(e) => finish(&mut s, Outcome::Failed, Some(e), now),
            }
            vec![]
        }
        (Phase::Fetching, Event::FetchOk) => {
            let job = s.job.as_ref().expect("fetching a job");
            let system = job.system.clone();
            match job.action {
                Action::Boot => {
                    s.phase = Phase::Committing;
                    vec![Effect::Commit]
                }
                _ => switch(&mut s, Step::Test, system),
            }
        }
        (Phase::Fetching, Event::Refused(reason)) => {
            finish(&mut s, Outcome::Rejected, Some(reason), now);
            vec![]
        }
        (Phase::Fetching, Event::FetchFailed(reason)) => {
            finish(&mut s, Outcome::Failed, Some(reason), now);
            vec![]
        }
        (Phase::Switching { step, id }, Event::SwitchResult { id: rid, code, tail }) if rid == id => match step {
            Step::Test if code == Some(0) => {
                s.phase = Phase::Verifying { deadline: now + t.health_timeout_secs };
                vec![Effect::CheckHealth]
            }
            Step::Test if code == Some(INHIBITED) => inhibited(&mut s, &tail, now, t),
            Step::Test => {
                let why = format!("switch-to-configuration test: {}", describe_exit(code, &tail));
                roll_back(&mut s, why, now)
            }
            Step::RollbackTest => {
                let failure = s.job.as_ref().and_then(|j| j.failure.clone()).unwrap_or_default();
                if code == Some(0) {
                    finish(&mut s, Outcome::RolledBack, Some(failure), now);
                } else {
                    let why = format!("{failure}; rollback failed: {}", describe_exit(code, &tail));
                    finish(&mut s, Outcome::RollbackFailed, Some(why), now);
                }
                vec![]
            }
            Step::Boot => {
                if code == Some(0) {
                    finish(&mut s, Outcome::Committed, None, now);
                } else {
                    let why = format!("committed, but switch-to-configuration boot: {}", describe_exit(code, &tail));
                    finish(&mut s, Outcome::Failed, Some(why), now);
                }
                vec![]
            }
            Step::BootOnce if code == Some(0) => {
                s.phase = Phase::AwaitingReboot;
                vec![]
            }
            Step::BootOnce if code == Some(NO_ONE_SHOT) => {
                let why = "no one-time boot entries here (not systemd-boot): the new generation is the boot default";
                finish(&mut s, Outcome::Committed, Some(why.into()), now);
                vec![]
            }
            Step::BootOnce => {
                // The builder may have moved loader.conf's default to the new
                // generation and the running one may be pinned over it
                // (LoaderEntryDefault): going back with `switch` of the
                // previous system puts loader.conf back and drops the pin, so
                // neither outlives the failed deploy (a stale pin would outvote
                // every later commit's default).
                let why = format!("switch-to-configuration boot: {}", describe_exit(code, &tail));
                revert_boot(&mut s, why, now)
            }
            Step::BootConfirm => {
                let why = (code != Some(0))
                    .then(|| format!("booted and healthy, but making it the default: {}", describe_exit(code, &tail)));
                finish(&mut s, Outcome::Committed, why, now);
                vec![]
            }
            Step::BootRevert => {
                let job = s.job.as_ref().expect("reverting a job");
                let failure = job.failure.clone().unwrap_or_default();
                let outcome = match (job.booted_new, code == Some(0)) {
                    (true, true) => Outcome::RolledBack,
                    (true, false) => Outcome::RollbackFailed,
                    (false, _) => Outcome::Failed,
                };
                let why = match code {
                    Some(0) => failure,
                    // The helper made it the boot default instead.
                    Some(INHIBITED) => format!(
                        "{failure}; switch inhibitors refuse switching back to the previous generation live: \
                         it is the boot default again, reboot to run it"
                    ),
                    _ => format!("{failure}; restoring the previous generation: {}", describe_exit(code, &tail)),
                };
                finish(&mut s, outcome, Some(why), now);
                vec![]
            }
        },
        (Phase::Verifying { .. }, Event::Healthy) => {
            let job = s.job.as_ref().expect("verifying a job");
            if job.action == Action::Boot {
                let system = job.system.clone();
                switch(&mut s, Step::BootConfirm, system)
            } else {
                s.phase = Phase::Committing;
                vec![Effect::Commit]
            }
        }
        (Phase::Verifying { .. }, Event::Unhealthy(reason)) => {
            if s.job.as_ref().is_some_and(|j| j.action == Action::Boot) {
                revert_boot(&mut s, format!("health check failed: {reason}"), now)
            } else {
                roll_back(&mut s, format!("health check failed: {reason}"), now)
            }
        }
        (Phase::Committing, Event::CommitOk) => {
            let job = s.job.as_ref().expect("committing a job");
            let (system, action) = (job.system.clone(), job.action);
            switch(&mut s, if action == Action::Boot { Step::BootOnce } else { Step::Boot }, system)
        }
        (Phase::Committing, Event::CommitFailed(reason)) => {
            let action = s.job.as_ref().expect("committing a job").action;
            let why = format!("commit failed: {reason}");
            if action == Action::Boot {
                finish(&mut s, Outcome::Failed, Some(why), now);
                vec![]
            } else {
                roll_back(&mut s, why, now)
            }
        }
        (phase, Event::Resumed { boot_id, booted }) => match phase {
            Phase::Idle => vec![],
            Phase::Fetching => vec![Effect::Fetch],
            Phase::AwaitingReboot if rebooted(&s, &boot_id) => {
                let job = s.job.as_mut().expect("awaiting a job");
                job.boot_id = boot_id;
                if booted.as_deref() == Some(job.system.as_str()) {
                    job.booted_new = true;
                    s.phase = Phase::Verifying { deadline: now + t.health_timeout_secs };
                    vec![Effect::CheckHealth]
                } else {
                    let why = "the new generation did not come up on its one-time boot; the previous one booted";
                    revert_boot(&mut s, why.into(), now)
                }
            }
            Phase::AwaitingReboot => vec![],
            Phase::Verifying { .. }
                if rebooted(&s, &boot_id) && s.job.as_ref().is_some_and(|j| j.action == Action::Boot) =>
            {
                // Rebooted again while checking the one-time boot: the
                // default (the previous generation) came up.
                revert_boot(&mut s, "rebooted while verifying the new generation's first boot".into(), now)
            }
            Phase::Switching { step: Step::Test, .. } | Phase::Verifying { .. } if rebooted(&s, &boot_id) => {
                // The machine rebooted before the update was committed, so
                // it booted the old default: the update failed, and it is
                // never tried again by itself.
                let reason = "rebooted before the update was committed; the previous generation booted";
                finish(&mut s, Outcome::Failed, Some(reason.into()), now);
                vec![]
            }
            Phase::Switching { step, id } => {
                let system = match step {
                    Step::RollbackTest | Step::BootRevert => s.job.as_ref().and_then(|j| j.previous.clone()),
                    _ => s.job.as_ref().map(|j| j.system.clone()),
                };
                match system {
                    Some(system) => vec![Effect::RequestSwitch { id, step, system }],
                    None => vec![],
                }
            }
            Phase::Verifying { .. } => vec![Effect::CheckHealth],
            Phase::Committing => vec![Effect::Commit],
            Phase::Collecting => vec![Effect::CollectGarbage],
        },
        // Anything else (a stale switch result, an event for another phase)
        // changes nothing but the transition count.
        _ => vec![],
    };
    (s, effects)
}

/// `test` refused by switch inhibitors. Their check runs before
/// switch-to-configuration changes anything, so the running system is the
/// previous one still and a rollback `test` would only repeat it: the
/// deploy fails with the advice, or (configured) goes on as a `boot`
/// deploy of the same system, which the check lets through.
fn inhibited(s: &mut State, tail: &str, now: u64, t: Timing) -> Vec<Effect> {
    let job = s.job.as_mut().expect("switching a job");
    if t.boot_when_inhibited && job.action == Action::Switch {
        job.action = Action::Boot;
        s.phase = Phase::Committing;
        return vec![Effect::Commit];
    }
    let why = format!("switch-to-configuration test: {}", describe_exit(Some(INHIBITED), tail));
    finish(s, Outcome::Failed, Some(why), now);
    vec![]
}

/// A `boot` deploy failed: the profile goes back to the previous system
/// and that system is switched to (making its generation the default).
fn revert_boot(s: &mut State, reason: String, now: u64) -> Vec<Effect> {
    let job = s.job.as_mut().expect("reverting a job");
    job.failure = Some(reason.clone());
    match job.previous.clone() {
        Some(prev) => {
            let mut effects = vec![Effect::RestoreProfile];
            effects.extend(switch(s, Step::BootRevert, prev));
            effects
        }
        None => {
            finish(s, Outcome::Failed, Some(format!("{reason}; no previous system to go back to")), now);
            vec![]
        }
    }
}

/// Whether the machine booted since the job was accepted.
fn rebooted(s: &State, now_boot: &Option<String>) -> bool {
    let then = s.job.as_ref().and_then(|j| j.boot_id.as_ref());
    matches!((then, now_boot), (Some(a), Some(b)) if a != b)
}

#[cfg(test)]
mod tests;
