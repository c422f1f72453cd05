//! The agent's single-threaded event loop.
//!
//! One loop serves HTTP, runs the update work and feeds the watchdog. A
//! deploy's closure fetch is an [`InstallJob`] the loop advances a bounded
//! step per turn ([`Agent::fetch_turn`]): one `poll(2)` waits on the
//! caches' connections and the HTTP server's sockets together, then the
//! job takes what arrived and unpacks at most
//! [`crate::store::parallel::UNPACK_PER_STEP`] bytes, then the server
//! answers what arrived (status, metrics; deploys get 409 while busy).
//! Nothing in the fetch calls back into the loop. The smaller transfers
//! (polled, channel and key documents, the Pushgateway, the health
//! network probe) are requests in flight on the same `poll(2)` ([`docs`]),
//! and a garbage collection (a gc document's, or the disk-space rule's in
//! the middle of a deploy's fetch) tries the store lock and asks for
//! narinfos the same way ([`gc_run`]). No transfer blocks the loop and
//! nothing re-enters it: there is no blocking fetcher in the agent.
//!
//! Every state transition is persisted (atomically, durably) before its
//! effects are carried out; see `machine` for why that makes every crash
//! point resumable.
//!
//! The rules live in pure modules that take the time as an argument; this
//! file reads and writes files and sockets and asks them what is due:
//! `machine` (the update's transitions), `schedule` (poll, follow and push
//! schedules with jitter, watchdog pings, how long the loop sleeps),
//! `helper_watch` (the switch deadline and nudges), `health` (health
//! rounds, the net-before flag, the verdict at the deadline), `throttle`
//! (the auth throttle), [`space_needed`] (the disk-space rule) and
//! [`push_trigger`].

use super::config::{Config, InhibitedSwitch};
use super::health::{self, HealthRun, HelperAction, NET_BEFORE};
use super::helper_watch::SwitchWatch;
use super::http::{Handler, Limits, Request, Response, Server};
use super::machine::{self, Effect, Event, Origin, Phase, State, Timing};
use super::notify::Notifier;
use super::persist;
use super::schedule::{self, Jitter, Schedule};
use super::status::{self, Progress, Snapshot};
use super::throttle::AuthThrottle;
use crate::api;
use crate::deploy::{self, Action, Deploy, Rejection};
use crate::fetch::{CacheUrl, Options};
use crate::nix::{StorePath, TrustedKeys};
use crate::store::fsutil;
use crate::store::install;
use crate::store::parallel::{InstallJob, NetOptions, Step};
use crate::store::{HeldLock, Store, StoreLock};
use crate::switch::protocol;
use rustix::fd::AsFd;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Longest the loop sleeps when idle (switch results, poll schedule).
const IDLE_WAIT: Duration = Duration::from_millis(500);
/// Largest polled document / signature.
const MAX_SIG_BYTES: u64 = 4096;

pub use crate::clock::now;

mod docs;
mod follow;
mod gc_run;

#[derive(Debug, Clone, Copy, Default)]
/// Command-line switches of `nixless agent`.
pub struct AgentOptions {
    pub no_seccomp: bool,
}

/// What the request handler shares with the loop.
struct Shared {
    state: State,
    progress: Progress,
    last_error: Option<String>,
    last_rejection: Option<String>,
    bytes_fetched_total: u64,
    poll_last_check: Option<u64>,
    poll_error: Option<String>,
    rejected: u64,
    started: u64,
    notifier: Notifier,
    server: Option<Server>,
    /// Rejected signatures per peer in the current window.
    auth_throttle: AuthThrottle,
    /// Effects of a deploy accepted by the handler, for the loop to run.
    queued: VecDeque<Effect>,
    /// A fatal error inside the handler (state could not be persisted).
    fatal: Option<String>,
    /// A verified gc document that could not be recorded for lack of space
    /// (seq, body, signature): the loop collects garbage, then accepts it.
    pending_gc: Option<(u64, Vec<u8>, Vec<u8>)>,
    /// How pushes to the Pushgateway go (None without one).
    push: Option<api::Push>,
    /// The deploy keys trusted now: the config's, or a key rotation's
    /// (`channel::keys::effective`). Every signature check uses these.
    keys: TrustedKeys,
    /// The channel followed, as status shows it (None without one).
    channel: Option<api::Channel>,
}

impl Shared {
    fn new(state: State, server: Option<Server>) -> Shared {
        Shared {
            state,
            progress: Progress::default(),
            last_error: None,
            last_rejection: None,
            bytes_fetched_total: 0,
            poll_last_check: None,
            poll_error: None,
            rejected: 0,
            started: now(),
            notifier: Notifier::from_env(),
            server,
            auth_throttle: AuthThrottle::default(),
            queued: VecDeque::new(),
            fatal: None,
            pending_gc: None,
            push: None,
            keys: TrustedKeys::default(),
            channel: None,
        }
    }
}

struct Ctx {
    cfg: Config,
    store: Store,
    timing: Timing,
}

/// `readlink` of a system link under the root, as a store path string.
fn system_link(root: &Path, link: &str) -> Option<String> {
    let target = std::fs::read_link(root.join(link.trim_start_matches('/'))).ok()?;
    let target = target.to_str()?.to_owned();
    // Profile links are relative ("system-3-link") or absolute store paths.
    if target.starts_with("/nix/store/") {
        Some(target)
    } else {
        let dir = root.join(link.trim_start_matches('/'));
        let next = std::fs::read_link(dir.parent()?.join(&target)).ok()?;
        next.to_str().filter(|t| t.starts_with("/nix/store/")).map(str::to_owned)
    }
}

/// The kernel's boot id; `NIXLESS_BOOT_ID` overrides it (containers
/// without their own, and tests that play a reboot).
pub fn boot_id() -> Option<String> {
    if let Ok(id) = std::env::var("NIXLESS_BOOT_ID") {
        return Some(id);
    }
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok().map(|s| s.trim().to_owned())
}

fn snapshot(ctx: &Ctx, sh: &Shared) -> Snapshot {
    let root = &ctx.cfg.root;
    Snapshot {
        host: ctx.cfg.host.clone(),
        version: env!("CARGO_PKG_VERSION"),
        current_system: system_link(root, "run/current-system"),
        booted_system: system_link(root, "run/booted-system"),
        profile_system: system_link(root, "nix/var/nix/profiles/system"),
        state: sh.state.clone(),
        progress: sh.progress,
        last_error: sh.last_error.clone(),
        last_rejection: sh.last_rejection.clone(),
        bytes_fetched_total: sh.bytes_fetched_total,
        poll_url: ctx.cfg.poll_url.clone(),
        poll_last_check: sh.poll_last_check,
        poll_error: sh.poll_error.clone(),
        started: sh.started,
        watchdog_pings: sh.notifier.pings,
        rejected_requests: sh.rejected,
        push: sh.push.clone(),
        channel: follow::view(ctx, sh),
    }
}

fn json_error(status: u16, msg: &str, seq: Option<u64>) -> Response {
    Response::json_of(status, &crate::api::Error { error: msg.to_owned(), seq })
}

/// The agent's side of the HTTP server: [`Handler::head`] refuses what it
/// can from the head alone, so no stranger's body is ever buffered.
struct Front<'a> {
    ctx: &'a Ctx,
    shared: &'a RefCell<Shared>,
}

impl Handler for Front<'_> {
    fn head(&mut self, req: &Request, body_len: usize) -> Result<(), Response> {
        let sh = &mut self.shared.borrow_mut();
        match (req.method.as_str(), req.path.as_str()) {
            ("GET", "/v1/status" | "/metrics") if body_len > 0 => Err(json_error(400, "a GET takes no body", None)),
            ("GET", "/v1/status" | "/metrics") => Ok(()),
            ("POST", "/v1/deploy") => deploy_head(req, self.ctx, sh),
            (_, "/v1/status" | "/metrics" | "/v1/deploy") => Err(json_error(405, "method not allowed", None)),
            _ => Err(json_error(404, "not found", None)),
        }
    }

    fn request(&mut self, req: &Request) -> Response {
        handle(req, self.ctx, &mut self.shared.borrow_mut())
    }
}

fn handle(req: &Request, ctx: &Ctx, sh: &mut Shared) -> Response {
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/v1/status") => Response::json_of(200, &status::status(&snapshot(ctx, sh))),
        ("GET", "/metrics") => {
            let mut r = Response::text(200, status::metrics(&snapshot(ctx, sh)));
            r.content_type = "text/plain; version=0.0.4";
            r
        }
        ("POST", "/v1/deploy") => handle_deploy(req, ctx, sh),
        (_, "/v1/status" | "/metrics" | "/v1/deploy") => json_error(405, "method not allowed", None),
        _ => json_error(404, "not found", None),
    }
}

/// Everything a deploy request can be refused for before its body is read:
/// too many bad signatures from this peer, an update in progress, and a
/// signature header that is missing, malformed or names no trusted key.
fn deploy_head(req: &Request, ctx: &Ctx, sh: &mut Shared) -> Result<(), Response> {
    if let Some(resp) = rate_limited(req.peer.ip(), sh) {
        return Err(resp);
    }
    if let Err(seq) = idle(sh) {
        return Err(json_error(409, "an update is in progress", seq));
    }
    if let Err(rej) = deploy::check_signer(req.header(deploy::SIGNATURE_HEADER), &sh.keys) {
        return Err(refuse(ctx, sh, req.peer, rej));
    }
    Ok(())
}

/// 429 once a peer has had too many rejected signatures in the window (per
/// peer, so a stranger hammering bad signatures cannot lock the admin out).
fn rate_limited(peer: std::net::IpAddr, sh: &mut Shared) -> Option<Response> {
    if sh.auth_throttle.limited(peer, Instant::now()) {
        sh.rejected += 1;
        return Some(json_error(429, "too many rejected deploy requests; try later", None));
    }
    None
}

/// `Err(seq of the running job)` unless the agent is idle with nothing queued.
/// Checked, and the phase claimed, within one call of [`accept`]: the loop
/// is single-threaded, so nothing runs in between.
fn idle(sh: &Shared) -> Result<(), Option<u64>> {
    if machine::can_accept(&sh.state) && sh.queued.is_empty() && sh.pending_gc.is_none() {
        Ok(())
    } else {
        Err(sh.state.job.as_ref().map(|j| j.seq))
    }
}

fn handle_deploy(req: &Request, ctx: &Ctx, sh: &mut Shared) -> Response {
    if let Some(resp) = rate_limited(req.peer.ip(), sh) {
        return resp;
    }
    let sig = req.header(deploy::SIGNATURE_HEADER);
    let verified = deploy::verify(&req.body, sig, &sh.keys, &ctx.cfg.host, sh.state.highest_seq);
    let d = match verified {
        Ok(d) => d,
        Err(rej) => return refuse(ctx, sh, req.peer, rej),
    };
    match accept(ctx, sh, &d, &req.body, sig.unwrap_or_default()) {
        Ok(()) => {
            Response::json_of(202, &api::Accepted { seq: d.seq, status: api::Accepted::STATUS_PATH.into(), note: None })
        }
        Err(AcceptError::Refused(rej)) => refuse(ctx, sh, req.peer, rej),
        Err(AcceptError::Busy(seq)) => json_error(409, "an update is in progress", seq),
        Err(AcceptError::NoSpace(e)) if d.action == Action::Gc => {
            // Collecting garbage is what frees the space to record it: the
            // loop collects first, then accepts. Replaying a gc document
            // only collects garbage, so doing this before the sequence is
            // durable gives an attacker nothing.
            log::warn!("no space to record gc seq {}: collecting garbage first ({e})", d.seq);
            sh.pending_gc = Some((d.seq, req.body.clone(), sig.unwrap_or_default().to_vec()));
            let note = Some("collecting garbage before recording the request: no space left".into());
            Response::json_of(202, &api::Accepted { seq: d.seq, status: api::Accepted::STATUS_PATH.into(), note })
        }
        Err(AcceptError::NoSpace(e)) => {
            sh.rejected += 1;
            let msg = format!("cannot record the deploy: {e}; free space first (a signed gc deploy does)");
            log::warn!("deploy seq {} refused: {msg}", d.seq);
            sh.last_rejection = Some(msg.clone());
            json_error(507, &msg, None)
        }
        Err(AcceptError::Fatal(e)) => {
            sh.fatal = Some(e.clone());
            json_error(500, &e, None)
        }
    }
}

/// Records a refused request and answers it.
fn refuse(ctx: &Ctx, sh: &mut Shared, peer: std::net::SocketAddr, rej: Rejection) -> Response {
    reject(ctx, sh, &rej, &format!("from {peer}"));
    if rej.status() == 401 {
        sh.auth_throttle.failed(peer.ip(), Instant::now());
    }
    let seq = matches!(rej, Rejection::Stale { .. }).then_some(sh.state.highest_seq);
    json_error(rej.status(), &rej.to_string(), seq)
}

fn reject(ctx: &Ctx, sh: &mut Shared, rej: &Rejection, source: &str) {
    sh.rejected += 1;
    let msg = format!("deploy rejected ({source}): {rej}");
    log::warn!("{msg}");
    persist::log_event(&ctx.cfg.state_dir, now(), &msg);
    sh.last_rejection = Some(msg);
}

/// Why [`accept`] did not take a verified document.
#[derive(Debug)]
enum AcceptError {
    /// Refused after all (no previous generation for a rollback).
    Refused(Rejection),
    /// A deploy is running (its seq): nothing was written.
    Busy(Option<u64>),
    /// The state could not be recorded for lack of space; nothing changed.
    NoSpace(String),
    /// The state could not be recorded for another reason.
    Fatal(String),
}

fn persist_error(what: &str, e: std::io::Error) -> AcceptError {
    if fsutil::is_no_space(&e) {
        AcceptError::NoSpace(format!("{what}: {e}"))
    } else {
        AcceptError::Fatal(format!("{what}: {e}"))
    }
}

/// Accepts a verified document: claims the idle agent, saves the document,
/// makes the new highest sequence durable with the state, and queues the
/// work. Nothing is fetched or switched before this returns Ok, and a
/// running job's document is never touched: the claim comes first.
fn accept(ctx: &Ctx, sh: &mut Shared, d: &Deploy, body: &[u8], sig: &[u8]) -> Result<(), AcceptError> {
    idle(sh).map_err(AcceptError::Busy)?;
    let root = &ctx.cfg.root;
    let previous = system_link(root, "run/current-system");
    let system = match (d.action, &d.system) {
        (_, Some(s)) => s.to_string(),
        (Action::Rollback, None) => match crate::store::profile::previous(root) {
            Some((_, p)) => p,
            None => return Err(AcceptError::Refused(Rejection::NoPrevious)),
        },
        (_, None) => String::new(),
    };
    let ev = Event::Accepted {
        seq: d.seq,
        action: d.action,
        system: system.clone(),
        previous,
        boot_id: boot_id(),
        origin: Origin::Deploy,
    };
    let (next, effects) = machine::step(&sh.state, ev, now(), ctx.timing);
    if !machine::accepted(&sh.state, &next) {
        return Err(AcceptError::Busy(sh.state.job.as_ref().map(|j| j.seq)));
    }
    let dir = fsutil::open_dir(&ctx.cfg.state_dir).map_err(|e| persist_error("state dir", e))?;
    fsutil::write_atomic(dir.as_fd(), "deploy.json", body, true)
        .map_err(|e| persist_error("saving the deploy document", e))?;
    fsutil::write_atomic(dir.as_fd(), "deploy.json.sig", sig, true)
        .map_err(|e| persist_error("saving its signature", e))?;
    let line =
        format!("accepted seq {} ({}, key {}): {} {}", d.seq, d.action.as_str(), d.key, system, next.phase.name());
    adopt(ctx, sh, next, effects, &line)
}

/// The end of an accept, for a deploy document or a channel: the new state
/// made durable, the line logged and in events.log, then the loop's own.
fn adopt(ctx: &Ctx, sh: &mut Shared, next: State, effects: Vec<Effect>, line: &str) -> Result<(), AcceptError> {
    persist::save(&ctx.cfg.state_dir, &next).map_err(|e| persist_error("persisting state", e))?;
    log::info!("{line}");
    persist::log_event(&ctx.cfg.state_dir, now(), line);
    sh.state = next;
    sh.progress = Progress::default();
    sh.queued.extend(effects);
    Ok(())
}

/// One round of the HTTP server, waiting up to `wait`.
fn serve(ctx: &Ctx, shared: &RefCell<Shared>, wait: Duration) {
    let server = shared.borrow_mut().server.take();
    let Some(mut server) = server else {
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
        return;
    };
    let res = server.poll(wait, &mut Front { ctx, shared });
    if let Err(e) = res {
        log::error!("http server: {e}");
    }
    shared.borrow_mut().server = Some(server);
}

fn status_line(sh: &Shared) -> String {
    let p = sh.progress;
    match &sh.state.phase {
        Phase::Fetching => format!("fetching {}/{} paths, {} MiB", p.paths_done, p.paths_total, p.bytes_done >> 20),
        Phase::Idle => match &sh.state.last {
            Some(l) => format!("idle; last deploy {} {}", l.seq, l.outcome.as_str()),
            None => "idle".into(),
        },
        other => format!("{} seq {}", other.name(), sh.state.job.as_ref().map(|j| j.seq).unwrap_or(0)),
    }
}

/// How long a fetch or gc waits for another writer's store lock.
const STORE_LOCK_WAIT: Duration = Duration::from_secs(600);
/// How often a fetch waiting for the store lock tries again.
const LOCK_RETRY: Duration = Duration::from_millis(100);

pub struct Agent {
    ctx: Rc<Ctx>,
    shared: Rc<RefCell<Shared>>,
    health: Option<HealthRun>,
    /// The pending switch request's deadline and nudges.
    switch: SwitchWatch,
    /// When `poll_url` is next fetched.
    poll: Schedule,
    /// The poll's and the follow's jitter, so a fleet spreads out.
    jitter: Jitter,
    pusher: Option<super::push::Pusher>,
    /// When the channel (and key rotation) documents are next fetched.
    follow: Schedule,
    /// The deploy's fetch, while one runs.
    fetching: Option<FetchRun>,
    /// The small requests in flight (documents, probe, push): [`docs`].
    reqs: docs::Requests,
    /// A garbage collection in progress ([`gc_run`]).
    gc: Option<gc_run::GcRun>,
}

/// A deploy's closure fetch, advanced a step per turn of the loop.
enum FetchRun {
    /// Waiting for the store lock (a console `nixless install` or gc holds it).
    Locking {
        system: StorePath,
        wait: crate::store::LockWait,
    },
    Running {
        job: Box<InstallJob>,
        lock: HeldLock,
        system: StorePath,
    },
    /// Resolved, short of space: the collection ([`gc_run`], `GcFor::Space`)
    /// holds the lock until it hands it back ([`Agent::space_collected`]).
    Collecting {
        job: Box<InstallJob>,
        system: StorePath,
        nar_bytes: u64,
    },
}

impl Agent {
    /// Reads state, binds sockets; the caller installs seccomp after this.
    pub fn start(cfg: Config) -> Result<Agent, String> {
        let store = Store::open(&cfg.root, &cfg.state_dir)
            .map_err(|e| format!("opening store under {}: {e}", cfg.root.display()))?;
        fsutil::mkdir_p(&protocol::dir(&cfg.state_dir)).map_err(|e| format!("state dir: {e}"))?;
        let state = persist::load(&cfg.state_dir)?;
        let server = if cfg.listen.is_empty() {
            None
        } else {
            let limits = Limits {
                max_body_bytes: cfg.max_body_bytes,
                max_connections: cfg.max_connections,
                request_timeout: cfg.request_timeout,
                // Two documents of the largest size being received at once.
                body_budget: cfg.max_body_bytes.saturating_mul(2),
                ..Limits::default()
            };
            Some(Server::bind(&cfg.listen, limits).map_err(|e| format!("listening on {:?}: {e}", cfg.listen))?)
        };
        let timing = Timing {
            health_timeout_secs: cfg.health_timeout.as_secs(),
            boot_when_inhibited: cfg.inhibited_switch == InhibitedSwitch::Boot,
        };
        let poll_seed = now() ^ u64::from(std::process::id()) << 20;
        let pusher = cfg
            .pushgateway_url
            .as_deref()
            .map(|u| super::push::Pusher::new(u, &cfg.host, cfg.push_interval, poll_seed.rotate_left(32)));
        let mut shared = Shared::new(state, server);
        shared.push = pusher.as_ref().map(|p| p.status.clone());
        shared.keys = crate::channel::keys::effective(&cfg.deploy_keys, shared.state.rotation.as_ref());
        let reqs = docs::Requests::new(&cfg);
        Ok(Agent {
            reqs,
            gc: None,
            ctx: Rc::new(Ctx { cfg, store, timing }),
            shared: Rc::new(RefCell::new(shared)),
            health: None,
            switch: SwitchWatch::default(),
            poll: Schedule::now(),
            jitter: Jitter::new(poll_seed),
            pusher,
            follow: Schedule::now(),
            fetching: None,
        })
    }

    pub fn local_addrs(&self) -> Vec<std::net::SocketAddr> {
        self.shared.borrow().server.as_ref().map(Server::local_addrs).unwrap_or_default()
    }

    /// Applies one event: persist first, then queue its effects.
    fn apply(&mut self, ev: Event) -> Result<(), String> {
        let desc = format!("{ev:?}");
        let mut sh = self.shared.borrow_mut();
        let (next, effects) = machine::step(&sh.state, ev, now(), self.ctx.timing);
        // Nothing to record (an idle agent resuming): writing anyway would
        // make a full disk fatal at start.
        if next != sh.state {
            persist::save(&self.ctx.cfg.state_dir, &next).map_err(|e| format!("persisting state: {e}"))?;
        }
        if next.phase != sh.state.phase || next.last != sh.state.last {
            let line = format!("{} -> {} after {}", sh.state.phase.name(), next.phase.name(), truncate(&desc, 300));
            log::info!("{line}");
            persist::log_event(&self.ctx.cfg.state_dir, now(), &line);
        }
        if let (Some(l), true) = (&next.last, next.last != sh.state.last) {
            if l.outcome != machine::Outcome::Committed && l.outcome != machine::Outcome::Collected {
                sh.last_error = l.reason.clone();
            }
        }
        sh.state = next;
        sh.queued.extend(effects);
        Ok(())
    }

    /// Runs until a fatal error (which systemd answers with a restart).
    pub fn run(&mut self) -> Result<(), String> {
        self.shared.borrow_mut().notifier.ready(Instant::now());
        let booted = system_link(&self.ctx.cfg.root, "run/booted-system");
        self.apply(Event::Resumed { boot_id: boot_id(), booted })?;
        loop {
            // Effects first: they may produce events, which produce effects.
            loop {
                let eff = self.shared.borrow_mut().queued.pop_front();
                let Some(eff) = eff else { break };
                if let Some(ev) = self.perform(eff)? {
                    self.apply(ev)?;
                }
            }
            // What finished already (file:// answers come at once): a
            // switch request after a local-only net-before probe is on disk
            // before status can say "switching".
            self.requests_done()?;
            if let Some(ev) = self.check_progress() {
                self.apply(ev)?;
                continue;
            }
            self.maybe_poll();
            self.maybe_follow();
            self.collect_pending_gc();
            self.gc_turn()?;
            self.maybe_push();
            {
                let mut sh = self.shared.borrow_mut();
                let line = status_line(&sh);
                sh.notifier.status(&line);
                sh.notifier.ping_if_due(Instant::now());
            }
            let wait = self.wait(Instant::now());
            if self.fetching.is_some() {
                if let Some(ev) = self.fetch_turn(wait) {
                    self.apply(ev)?;
                }
                // Its poll waited on the requests' sockets too.
                self.reqs.client.turn(Duration::ZERO, &[]);
            } else {
                self.idle_turn(wait);
            }
            self.requests_done()?;
            if let Some(e) = self.shared.borrow_mut().fatal.take() {
                return Err(e);
            }
        }
    }

    fn wait(&self, now: Instant) -> Duration {
        let sh = self.shared.borrow();
        let timers = Timers {
            next_ping: sh.notifier.next_ping(now),
            switch_deadline: self.switch.deadline(self.ctx.cfg.switch_timeout),
            health_round: self.health.as_ref().and_then(HealthRun::next),
        };
        let wait = loop_wait(now, !sh.queued.is_empty(), &sh.state.phase, timers);
        let wait = self.gc_due().map_or(wait, |g| wait.min(g));
        let requests = self.reqs.client.interest().1.map(|t| t.saturating_duration_since(now));
        requests.map_or(wait, |r| wait.min(r))
    }

    fn perform(&mut self, eff: Effect) -> Result<Option<Event>, String> {
        match eff {
            Effect::Fetch => Ok(self.start_fetch()),
            Effect::RequestSwitch { id, step, system } => {
                let dir = &self.ctx.cfg.state_dir;
                let pending = protocol::read_request(dir).is_some_and(|r| r.id >= id)
                    || protocol::read_result(dir).is_some_and(|r| r.id >= id);
                let req = protocol::Request { id, step, system };
                if health::records_net_before(step, pending) {
                    // The flag is written before the request: the probe
                    // runs first, and the request follows its answer.
                    self.start_probe(docs::ProbeFor::NetBefore(req))?;
                    return Ok(None);
                }
                self.issue_switch(&req)?;
                Ok(None)
            }
            Effect::CheckHealth => {
                self.health = Some(HealthRun::default());
                Ok(None)
            }
            Effect::Commit => {
                let system = self.shared.borrow().state.job.as_ref().map(|j| j.system.clone()).unwrap_or_default();
                Ok(Some(match crate::store::profile::commit(&self.ctx.cfg.root, &system) {
                    Ok(n) => {
                        log::info!("committed {system} as generation {n}");
                        Event::CommitOk
                    }
                    Err(e) => Event::CommitFailed(e.to_string()),
                }))
            }
            Effect::RestoreProfile => {
                let previous = self.shared.borrow().state.job.as_ref().and_then(|j| j.previous.clone());
                if let Some(p) = previous {
                    crate::store::profile::restore(&self.ctx.cfg.root, &p)
                        .map_err(|e| format!("restoring the profile: {e}"))?;
                    log::info!("profile points at {p} again");
                }
                Ok(None)
            }
            Effect::CollectGarbage => {
                // Its GcDone comes when the collection is over (`gc_run`).
                self.start_gc(gc_run::GcFor::Deploy);
                Ok(None)
            }
        }
    }

    /// Writes switch request `req` (unless it is on disk already) and
    /// starts its clock.
    fn issue_switch(&mut self, req: &protocol::Request) -> Result<(), String> {
        let dir = &self.ctx.cfg.state_dir;
        let wrote = protocol::ensure_request(dir, req).map_err(|e| format!("writing switch request: {e}"))?;
        if wrote {
            log::info!("switch request {}: {} {}", req.id, req.step.as_str(), req.system);
        }
        self.switch.issued(req.id, Instant::now());
        Ok(())
    }

    /// The net-before probe answered: the flag, then the switch request.
    /// A failure to write either is fatal, as when they were written at once.
    fn net_before_known(&mut self, req: protocol::Request, reachable: bool) -> Result<(), String> {
        let dir = &self.ctx.cfg.state_dir;
        let fd = fsutil::open_dir(dir).map_err(|e| e.to_string())?;
        fsutil::write_atomic(fd.as_fd(), NET_BEFORE, health::net_before_flag(reachable), true)
            .map_err(|e| format!("state: {e}"))?;
        self.issue_switch(&req)
    }

    /// A gc document that could not be recorded for lack of space: collect
    /// garbage first (that frees the space; `gc_run`), then accept it as
    /// usual ([`Agent::accept_pending_gc`]). The document stays pending
    /// meanwhile, so the agent is busy for deploys.
    fn collect_pending_gc(&mut self) {
        if self.shared.borrow().pending_gc.is_some() {
            self.start_gc(gc_run::GcFor::Pending);
        }
    }

    /// The collection for the pending gc document is over: accept it.
    fn accept_pending_gc(&mut self, collected: Result<crate::store::gc::Report, String>) -> Result<(), String> {
        let Some((seq, body, sig)) = self.shared.borrow_mut().pending_gc.take() else {
            return Ok(());
        };
        let ctx = self.ctx.clone();
        match collected {
            Ok(report) => log::info!("freed space for gc seq {seq}: {report}"),
            Err(e) => log::warn!("collecting garbage for gc seq {seq}: {e}"),
        }
        let mut sh = self.shared.borrow_mut();
        let verified = deploy::verify(&body, Some(&sig), &sh.keys, &ctx.cfg.host, sh.state.highest_seq);
        let res = match verified {
            Ok(d) => accept(&ctx, &mut sh, &d, &body, &sig),
            Err(rej) => Err(AcceptError::Refused(rej)),
        };
        match res {
            Ok(()) => Ok(()),
            Err(AcceptError::Fatal(e)) => Err(e),
            Err(e) => {
                let msg = format!("gc seq {seq}: collected garbage, but could not record the request: {e:?}");
                log::warn!("{msg}");
                sh.last_error = Some(msg);
                Ok(())
            }
        }
    }

    /// The collection itself, once the records are what they will be:
    /// the configured generations kept plus `extra_roots`.
    fn finish_gc(&self, store: &StoreLock, extra_roots: &[StorePath]) -> Result<crate::store::gc::Report, String> {
        use crate::store::gc;
        let cfg = &self.ctx.cfg;
        let (mut roots, keep) = gc::roots(&cfg.root, cfg.generations_to_keep)?;
        roots.extend_from_slice(extra_roots);
        let report = gc::collect(store, &roots, false)?;
        crate::store::profile::delete_generations(&cfg.root, &keep)
            .map_err(|e| format!("deleting old generations: {e}"))?;
        log::info!("garbage collected: {report}");
        persist::log_event(&cfg.state_dir, now(), &format!("gc: {report}"));
        Ok(report)
    }

    /// One round of health checks; an event once they pass or time out.
    fn check_health(&mut self, deadline: u64) -> Option<Event> {
        let mut run = self.health.take().unwrap_or_default();
        let mut probe = false;
        let result = self.health_round(&mut run, deadline, &mut probe);
        if result.is_none() {
            self.health = Some(run);
            // Its answer comes on a later turn (`docs`), to this run.
            if probe && !self.reqs.probing() {
                // Health probes write nothing: no error comes back.
                let _ = self.start_probe(docs::ProbeFor::Health);
            }
        }
        result
    }

    fn health_round(&mut self, run: &mut HealthRun, deadline: u64, probe: &mut bool) -> Option<Event> {
        if !run.round_due(Instant::now()) {
            return None;
        }
        let cfg = self.ctx.cfg.clone();
        let before = health::reachable_before(std::fs::read(cfg.state_dir.join(NET_BEFORE)).ok().as_deref());
        *probe = run.network_pending(cfg.health_check_network, before);
        let dir = &cfg.state_dir;
        let configured = !(cfg.health_units.is_empty() && cfg.health_command.is_empty());
        let answered = protocol::read_health_result(dir).map(|r| r.id);
        let id = match run.helper_action(configured, answered, Instant::now()) {
            HelperAction::None => None,
            HelperAction::Request => {
                let id = protocol::read_health_request(dir).max(answered).unwrap_or(0) + 1;
                match protocol::write_health_request(dir, id) {
                    Ok(()) => run.helper_written(id, Instant::now()),
                    Err(e) => run.helper_write_failed(&e),
                }
                None
            }
            // Same race as for switch requests: write it again.
            HelperAction::Rewrite(id) => {
                let _ = protocol::write_health_request(dir, id);
                run.helper_written(id, Instant::now());
                Some(id)
            }
            HelperAction::Await(id) => Some(id),
        };
        if let Some(r) = id.and_then(|id| protocol::read_health_result(dir).filter(|r| r.id == id)) {
            run.helper_result(r.code, &r.tail);
        }
        run.verdict(now(), deadline, cfg.health_timeout)
    }

    /// Events that come from outside: switch results, health deadlines.
    fn check_progress(&mut self) -> Option<Event> {
        let phase = self.shared.borrow().state.phase.clone();
        match phase {
            Phase::Switching { id, .. } => {
                if let Some(r) = protocol::read_result(&self.ctx.cfg.state_dir).filter(|r| r.id == id) {
                    self.switch.done();
                    return Some(Event::SwitchResult { id, code: r.code, tail: r.tail });
                }
                let due = self.switch.check(id, Instant::now(), self.ctx.cfg.switch_timeout);
                if due.nudge {
                    self.nudge_switch(id);
                }
                if due.timed_out {
                    let tail = format!("no result after {} s", self.ctx.cfg.switch_timeout.as_secs());
                    return Some(Event::SwitchResult { id, code: None, tail });
                }
                None
            }
            Phase::Verifying { deadline } => self.check_health(deadline),
            _ => None,
        }
    }

    /// A nudge is due ([`super::helper_watch`]): switch request `id` is written
    /// again unless the helper has started it.
    fn nudge_switch(&mut self, id: u64) {
        let dir = &self.ctx.cfg.state_dir;
        if protocol::read_started(dir).is_some_and(|s| s >= id) {
            return;
        }
        if let Some(req) = protocol::read_request(dir).filter(|r| r.id == id) {
            log::info!("switch request {id} not started yet; writing it again");
            if let Err(e) = protocol::write_request(dir, &req) {
                log::warn!("rewriting switch request {id}: {e}");
            }
        }
        self.switch.nudged(Instant::now());
    }

    /// The saved deploy document of the current job (for caches and narinfos).
    fn saved_deploy(&self) -> Option<Deploy> {
        let dir = &self.ctx.cfg.state_dir;
        let body = std::fs::read(dir.join("deploy.json")).ok()?;
        let sig = std::fs::read(dir.join("deploy.json.sig")).ok()?;
        // Re-verified, as anything read back from disk; the sequence check
        // is against the one before it (it is the highest now).
        let sh = self.shared.borrow();
        let seq = sh.state.job.as_ref()?.seq;
        deploy::verify(&body, Some(&sig), &sh.keys, &self.ctx.cfg.host, seq.saturating_sub(1))
            .ok()
            .filter(|d| d.seq == seq)
    }

    /// Starts the deploy's fetch: the loop advances it ([`Agent::fetch_turn`]).
    fn start_fetch(&mut self) -> Option<Event> {
        let system = match self.shared.borrow().state.job.as_ref().map(|j| StorePath::from_absolute(&j.system)) {
            Some(Ok(p)) => p,
            _ => return Some(Event::FetchFailed("the job's system is not a store path".into())),
        };
        let wait = crate::store::LockWait::new(STORE_LOCK_WAIT, Instant::now());
        self.fetching = Some(FetchRun::Locking { system, wait });
        None
    }

    /// The caches a deploy fetches from: the document's, then the configured ones.
    fn caches(&self, extra: &[String]) -> Vec<CacheUrl> {
        let mut caches: Vec<CacheUrl> = extra.iter().filter_map(|c| CacheUrl::parse(c).ok()).collect();
        for c in &self.ctx.cfg.caches {
            if !caches.contains(c) {
                caches.push(c.clone());
            }
        }
        caches
    }

    /// The install job for `system` over the saved document's caches and
    /// narinfos, under `lock` (whose temps it cleans first).
    fn new_install(&self, lock: &StoreLock, system: &StorePath) -> Result<InstallJob, String> {
        lock.clean_temps().map_err(|e| format!("cleaning temps: {e}"))?;
        // The deploy document's, or the channel group's (re-verified).
        let (caches, narinfos) = self.job_sources();
        let cfg = &self.ctx.cfg;
        let opts =
            NetOptions { fetch: fetch_options(cfg), connections: cfg.connections_per_cache, ..NetOptions::default() };
        let provided = install::provided_from(&narinfos);
        let caches = self.caches(&caches);
        // Held after resolution: the disk-space rule is checked before any NAR comes.
        InstallJob::new(&caches, opts, cfg.cache_keys.clone(), std::slice::from_ref(system), provided, true)
            .map_err(|e| e.to_string())
    }

    /// One turn of the loop while a fetch runs: one `poll(2)` over the
    /// caches' connections and the HTTP server's sockets (up to `wait`),
    /// then a bounded step of the install and the server's requests. An
    /// event once the fetch is over.
    fn fetch_turn(&mut self, wait: Duration) -> Option<Event> {
        let ctx = self.ctx.clone();
        match self.fetching.take()? {
            FetchRun::Locking { system, wait: mut lock_wait } => match lock_wait.poll(&ctx.store, Instant::now()) {
                Ok(Some(lock)) => {
                    match self.new_install(&lock, &system) {
                        Ok(job) => {
                            self.fetching = Some(FetchRun::Running { job: Box::new(job), lock: lock.detach(), system })
                        }
                        Err(e) => return Some(Event::FetchFailed(e)),
                    }
                    serve(&ctx, &self.shared, Duration::ZERO);
                    None
                }
                Ok(None) => {
                    self.fetching = Some(FetchRun::Locking { system, wait: lock_wait });
                    serve(&ctx, &self.shared, wait.min(LOCK_RETRY));
                    None
                }
                // Busy past the wait, or the lock file's I/O error.
                Err(e) => Some(Event::FetchFailed(e.to_string())),
            },
            // The collection's look-ups and the server share the loop's
            // poll meanwhile (`gc_run`, `docs`); the job waits, idle.
            run @ FetchRun::Collecting { .. } => {
                self.fetching = Some(run);
                self.idle_turn(wait);
                None
            }
            FetchRun::Running { mut job, lock, system } => {
                let Ok(lock) = ctx.store.reattach(lock) else {
                    return Some(Event::FetchFailed("the store lock is not this store's".into()));
                };
                let server = self.shared.borrow_mut().server.take();
                // The small requests' sockets too (`docs`): one poll for all.
                let (mut fds, due) = self.reqs.client.interest();
                let wait = due.map_or(wait, |d| wait.min(d.saturating_duration_since(Instant::now())));
                let stepped = match &server {
                    Some(srv) => {
                        let (srv_fds, w) = srv.interest(wait);
                        fds.extend(srv_fds);
                        job.step(&lock, w, &fds)
                    }
                    None => job.step(&lock, wait, &fds),
                };
                // The server answers what its sockets brought.
                self.shared.borrow_mut().server = server;
                serve(&ctx, &self.shared, Duration::ZERO);
                let p = *job.progress();
                self.shared.borrow_mut().progress = Progress {
                    paths_done: p.paths_done as u64,
                    paths_total: p.paths_total as u64,
                    bytes_done: p.nar_bytes_done,
                    bytes_total: p.nar_bytes_total,
                };
                match stepped {
                    Ok(Step::Working { .. }) => {}
                    Ok(Step::Resolved) => {
                        let free = crate::store::gc::free_bytes(&lock).unwrap_or(u64::MAX);
                        match space_needed(p.nar_bytes_total, free) {
                            Ok(()) => job.release(),
                            // Another collection waits for this lock: it
                            // cannot run now, and this one cannot start.
                            Err(_) if self.gc.is_some() => {
                                return Some(Event::Refused(short_of_space(p.nar_bytes_total, free, false)))
                            }
                            Err(need) => {
                                log::warn!("need {} MiB, {} MiB free: collecting garbage", need >> 20, free >> 20);
                                let nar_bytes = p.nar_bytes_total;
                                // What the fetch will not fetch again stays.
                                let keep = std::iter::once(system.clone()).chain(job.present().cloned()).collect();
                                self.fetching = Some(FetchRun::Collecting { job, system, nar_bytes });
                                self.start_space_gc(lock.detach(), keep);
                                return None;
                            }
                        }
                    }
                    Ok(Step::Done(plan, prog)) => {
                        self.shared.borrow_mut().bytes_fetched_total += prog.nar_bytes_done;
                        log::info!(
                            "installed {} paths ({} present), {} MiB",
                            prog.paths_done,
                            plan.present,
                            prog.nar_bytes_done >> 20
                        );
                        return Some(Event::FetchOk);
                    }
                    Err(e) => {
                        (*job).abandon(&lock);
                        return Some(Event::FetchFailed(e.to_string()));
                    }
                }
                self.fetching = Some(FetchRun::Running { job, lock: lock.detach(), system });
                None
            }
        }
    }

    /// The disk-space rule's collection is over ([`gc_run`]): the lock
    /// comes back; enough space now, the job fetches its NARs, else the
    /// deploy is refused (nothing of it written).
    fn space_collected(
        &mut self,
        lock: HeldLock,
        collected: Result<crate::store::gc::Report, String>,
    ) -> Option<Event> {
        let failed = collected.err();
        if let Some(e) = &failed {
            log::warn!("garbage collection: {e}");
        }
        let (mut job, system, nar_bytes) = match self.fetching.take() {
            Some(FetchRun::Collecting { job, system, nar_bytes }) => (job, system, nar_bytes),
            // Not reached (the fetch parks before the collection starts);
            // were it, the lock goes and the fetch is left as it is.
            other => {
                self.fetching = other;
                log::error!("a collection for space ended with no fetch waiting for it");
                return None;
            }
        };
        let Ok(store) = self.ctx.store.reattach(lock) else {
            return Some(Event::FetchFailed("the store lock is not this store's".into()));
        };
        let free = crate::store::gc::free_bytes(&store).unwrap_or(u64::MAX);
        if space_needed(nar_bytes, free).is_err() {
            let mut why = short_of_space(nar_bytes, free, true);
            if let Some(e) = failed {
                why = format!("{why} (the collection: {})", crate::text::clip(&e, 300));
            }
            return Some(Event::Refused(why));
        }
        job.release();
        self.fetching = Some(FetchRun::Running { job, lock: store.detach(), system });
        None
    }
}

/// How the agent's transfers go (the install job's and the small requests'):
/// the configured retries, read timeout, credentials and trust.
fn fetch_options(cfg: &Config) -> Options {
    Options {
        retries: cfg.retries,
        read_timeout: cfg.read_timeout,
        credentials: cfg.credentials.clone(),
        trust: cfg.trust.clone(),
        ..Options::default()
    }
}

/// The refusal of the disk-space rule, after a collection or without one.
fn short_of_space(nar_bytes: u64, free: u64, collected: bool) -> String {
    let need = space_needed(nar_bytes, free).err().unwrap_or(0);
    let after =
        if collected { "after garbage collection" } else { "(a garbage collection is waiting for the store lock)" };
    format!("not enough disk space: the closure needs {} MiB, {} MiB free {after}", need >> 20, free >> 20)
}

/// The loop's deadlines, as the timers know them.
struct Timers {
    next_ping: Option<Instant>,
    switch_deadline: Option<Instant>,
    health_round: Option<Instant>,
}

/// How long the loop may sleep at `now`: not at all with effects queued,
/// else until the next watchdog ping or the deadline the phase waits for
/// (the switch's, the next health round), and at most [`IDLE_WAIT`]
/// (switch results come as files, not on an fd). A timer left over from
/// another phase does not count.
fn loop_wait(now: Instant, queued: bool, phase: &Phase, t: Timers) -> Duration {
    if queued {
        return Duration::ZERO;
    }
    let phase_deadline = match phase {
        Phase::Switching { .. } => t.switch_deadline,
        Phase::Verifying { .. } => t.health_round,
        _ => None,
    };
    schedule::sleep(now, IDLE_WAIT, [t.next_ping, phase_deadline])
}

/// The disk-space rule: a closure of `nar_bytes` fits in `free` bytes if
/// they hold it with a margin of a tenth plus 16 MiB (unpacked files take
/// whole blocks; the state and the log still need room to record the
/// outcome); `Err(bytes needed)` if not. Pure, so it is tested alone.
fn space_needed(nar_bytes: u64, free: u64) -> Result<(), u64> {
    let need = nar_bytes.saturating_add(nar_bytes / 10).saturating_add(16 << 20);
    if free >= need {
        Ok(())
    } else {
        Err(need)
    }
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => s.get(..i).unwrap_or(s),
        None => s,
    }
}

/// `nixless agent`: load config, start, drop privileges to the seccomp
/// allowlist, run.
pub fn main(config: &Path, opts: AgentOptions) -> Result<(), String> {
    let mut cfg = Config::load(config)?;
    // Before the seccomp filter, and once: systemd credentials are fixed
    // for the life of the unit. A bad file stops the agent like a bad config.
    let creds =
        crate::auth::Credentials::load_from_process(&cfg.auth).map_err(|e| format!("{}: {e}", config.display()))?;
    cfg.credentials = std::sync::Arc::new(creds);
    if let Some(p) = &cfg.ssl_cert_file {
        cfg.trust = crate::net::tls::load(p).map_err(|e| format!("{}: {e}", config.display()))?;
    }
    let mut agent = Agent::start(cfg)?;
    for a in agent.local_addrs() {
        log::info!("listening on {a}");
    }
    if !opts.no_seccomp {
        super::seccomp::install().map_err(|e| format!("seccomp: {e}"))?;
    }
    agent.run()
}

/// What a push follows at once, not only on its interval: the phase, the
/// last outcome and the channel's decision (a `rollout watch` counts
/// waiting, halted and failed-before hosts by it).
fn push_trigger(sh: &Shared) -> super::push::Trigger {
    let channel =
        sh.channel.as_ref().map(|c| format!("{:?}:{}", c.seq, c.decision.as_deref().unwrap_or(""))).unwrap_or_default();
    (format!("{}|{channel}", sh.state.phase.name()), sh.state.last.as_ref().map(|l| (l.seq, l.finished)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::SecretKey;

    const NEW: &str = "/nix/store/00000000000000000000000000000000-nixos-system-new";
    const OTHER: &str = "/nix/store/11111111111111111111111111111111-nixos-system-other";

    fn setup() -> (tempfile::TempDir, Ctx, SecretKey) {
        let tmp = tempfile::tempdir().unwrap();
        let sk = SecretKey::generate("admin-1").unwrap();
        let json = format!(
            r#"{{"host":"kiosk-7","root":"{}","poll_url":"http://127.0.0.1:9/d.json","caches":["http://127.0.0.1:9"],"cache_keys":["{pk}"],"deploy_keys":["{pk}"]}}"#,
            tmp.path().display(),
            pk = sk.public()
        );
        let cfg = Config::parse(json.as_bytes()).unwrap();
        let store = Store::open(&cfg.root, &cfg.state_dir).unwrap();
        (tmp, Ctx { cfg, store, timing: Timing { health_timeout_secs: 30, boot_when_inhibited: false } }, sk)
    }

    fn doc(sk: &SecretKey, seq: u64, action: Action, system: Option<&str>) -> (Deploy, Vec<u8>, Vec<u8>) {
        let body = deploy::render("kiosk-7", system, seq, action, &[], &[]).unwrap().into_bytes();
        let sig = deploy::sign(sk, &body).into_bytes();
        let keys = crate::nix::TrustedKeys::new(vec![sk.public()]);
        let d = deploy::verify(&body, Some(&sig), &keys, "kiosk-7", 0).unwrap();
        (d, body, sig)
    }

    /// Issue E.5: a poll checks that the agent is idle, then fetches; a
    /// POST served while the fetch is in flight (`docs`: on later turns)
    /// starts a job; then the poll's accept comes. It must find the agent
    /// busy and change nothing.
    #[test]
    fn an_accept_racing_a_running_job_is_busy_and_changes_nothing() {
        let (_tmp, ctx, sk) = setup();
        let sh = &mut Shared::new(State::default(), None);
        let (posted, post_body, post_sig) = doc(&sk, 10, Action::Switch, Some(NEW));
        accept(&ctx, sh, &posted, &post_body, &post_sig).unwrap();
        let saved = |name: &str| std::fs::read(ctx.cfg.state_dir.join(name)).unwrap();
        let state_before = saved(persist::STATE_FILE);
        for (seq, action, system) in
            [(11, Action::Switch, Some(OTHER)), (12, Action::Gc, None), (13, Action::Rollback, Some(OTHER))]
        {
            let (polled, body, sig) = doc(&sk, seq, action, system);
            match accept(&ctx, sh, &polled, &body, &sig) {
                Err(AcceptError::Busy(Some(10))) => {}
                other => panic!("seq {seq}: {other:?}"),
            }
            assert_eq!(saved("deploy.json"), post_body, "the running job's document is kept");
            assert_eq!(saved("deploy.json.sig"), post_sig);
            assert_eq!(saved(persist::STATE_FILE), state_before);
            assert_eq!(sh.state.job.as_ref().unwrap().seq, 10);
            assert_eq!(sh.state.highest_seq, 10);
            assert_eq!(sh.queued, VecDeque::from(vec![Effect::Fetch]));
        }
    }

    #[test]
    fn the_loop_sleeps_until_what_its_phase_waits_for() {
        let t0 = Instant::now();
        let ms = |n: u64| Some(t0 + Duration::from_millis(n));
        let switching = Phase::Switching { step: protocol::Step::Test, id: 1 };
        let verifying = Phase::Verifying { deadline: 100 };
        let t = |ping, switch, health| Timers { next_ping: ping, switch_deadline: switch, health_round: health };
        assert_eq!(loop_wait(t0, true, &Phase::Idle, t(None, None, None)), Duration::ZERO, "effects queued");
        assert_eq!(loop_wait(t0, false, &Phase::Idle, t(None, None, None)), IDLE_WAIT);
        assert_eq!(loop_wait(t0, false, &Phase::Idle, t(ms(30), ms(10), ms(20))), Duration::from_millis(30));
        assert_eq!(loop_wait(t0, false, &switching, t(ms(30), ms(10), ms(20))), Duration::from_millis(10));
        assert_eq!(loop_wait(t0, false, &verifying, t(ms(30), ms(10), ms(20))), Duration::from_millis(20));
        assert_eq!(loop_wait(t0, false, &switching, t(None, ms(900), None)), IDLE_WAIT, "capped");
    }

    #[test]
    fn the_space_rule_wants_a_tenth_and_16_mib_more_and_never_overflows() {
        let mib = 1u64 << 20;
        assert_eq!(space_needed(100 * mib, 126 * mib), Ok(()));
        assert_eq!(space_needed(100 * mib, 126 * mib - 1), Err(126 * mib));
        assert_eq!(space_needed(0, 16 * mib), Ok(()));
        assert_eq!(space_needed(0, 16 * mib - 1), Err(16 * mib));
        assert_eq!(space_needed(u64::MAX, u64::MAX), Ok(()));
        assert_eq!(space_needed(u64::MAX, u64::MAX - 1), Err(u64::MAX));
    }

    /// Issue E.6: a full disk refuses a deploy it cannot record, leaving
    /// nothing behind, and the agent goes on.
    #[test]
    fn no_space_is_told_apart_and_leaves_no_temp() {
        let e = std::io::Error::from_raw_os_error(rustix::io::Errno::NOSPC.raw_os_error());
        assert!(matches!(persist_error("x", e), AcceptError::NoSpace(_)));
        let e = std::io::Error::from_raw_os_error(rustix::io::Errno::IO.raw_os_error());
        assert!(matches!(persist_error("x", e), AcceptError::Fatal(_)));
    }

    /// A change of channel decision (wait → halted) is pushed at once, like
    /// a phase change; an unchanged one is not.
    #[test]
    fn a_channel_decision_change_is_a_push_trigger() {
        let sh = &mut Shared::new(State::default(), None);
        let none = push_trigger(sh);
        sh.channel = Some(api::Channel { seq: Some(4), decision: Some("wait".into()), ..Default::default() });
        let wait = push_trigger(sh);
        assert_ne!(none, wait);
        sh.channel.as_mut().unwrap().until = Some(99);
        assert_eq!(push_trigger(sh), wait, "only seq and decision count");
        sh.channel = Some(api::Channel { seq: Some(5), decision: Some("halted".into()), ..Default::default() });
        assert_ne!(push_trigger(sh), wait);
    }
}
