//! Installing a closure over the network engine ([`crate::net::engine`]):
//! many requests in flight from one thread, with the checks of
//! [`pipeline`] and the commit steps of [`super::install`], in its order.
//!
//! - **Resolution** is breadth-first and concurrent: every narinfo known to
//!   be needed is requested at once (urgent, ahead of NARs), and each verified
//!   narinfo queues its references' narinfos and its own NAR.
//! - **Downloads** overlap on up to N connections per cache. Each NAR body is
//!   spooled, compressed, to a file in the store's temp area
//!   (`.nixless-tmp-…​.nar`, under the store lock, removed after use and on
//!   every error, and by the next run's temp cleanup after a crash) while its
//!   FileSize is capped (FileHash is not computed: see `fetch::pipeline`); a
//!   broken download resumes with `Range` from what the spool holds. At most
//!   [`MAX_SPOOLS`] spools and about `spool_budget` bytes of them exist at
//!   once.
//! - **Unpacking** takes one finished spool at a time through the verified
//!   pipeline (decompress → NarHash → NAR parser → unpacker,
//!   [`pipeline::Pass`]) into a temp, at most [`UNPACK_PER_STEP`] NAR bytes
//!   per step, so memory stays that of one decompressor whatever the
//!   concurrency and a large NAR never holds up a caller's loop.
//! - **Commit** is exactly [`super::install`]'s: temps are renamed in plan
//!   order (references before referrers) by batches, after one `syncfs`; a
//!   failure keeps the complete prefix and removes every other temp and spool.
//!   The two waits of a batch (its contents durable before the renames, the
//!   renames durable before the next batch or the end) are [`Flush`]es: a
//!   child process makes the calls while the job's `poll` waits on it with
//!   everything else, so a commit never stalls the caller's loop.
//!
//! `file://` caches are read directly (no request, no spool).
//!
//! The work is an [`InstallJob`] advanced by [`InstallJob::step`]: one
//! engine round (whose `poll(2)` may also wait on the caller's own
//! sockets), what it delivered, and a bounded slice of unpacking; nothing
//! blocks but that one `poll`, and nothing calls back into the caller. The
//! agent steps it from its event loop; [`install`] is a loop around it.
//! Narinfos given up front (a deploy document's) are checked exactly like
//! fetched ones and save their round trips; one that fails the checks is
//! never trusted: the caches are asked instead.

use super::flush::{Flush, FLUSH_DEADLINE};
use super::fsutil;
use super::install::{
    commit_record, contents_durable, contents_what, io_err, names_durable, names_what, rename_into_place, topo_order,
    BatchLimits, InstallError, Plan, PlanItem, Progress, Provided,
};
use super::{temp_name, StoreLock};
use crate::fetch::pipeline::{self, PipelineError};
use crate::fetch::{CacheUrl, FetchError, Options, MAX_NARINFO};
use crate::nar::{NarError, Unpacker};
use crate::net::engine::{self, Engine, Handler, NetError, Origin, ReqId};
use crate::net::http1::Head;
use crate::nix::{cache_info, NarInfo, StorePath, TrustedKeys};
use rustix::event::PollFlags;
use rustix::fd::BorrowedFd;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fs::File;
use std::io::{Seek, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Most NAR spools (downloading or waiting to be unpacked) at once.
pub const MAX_SPOOLS: usize = 64;
/// NAR bytes decompressed, verified and unpacked per [`InstallJob::step`]
/// at most, in slices of [`UNPACK_SLICE`], and no more slices once
/// [`UNPACK_TIME`] has passed: a few milliseconds of work on any machine
/// (an unoptimised build decompresses and hashes ~100× slower), so the
/// caller's loop turns often.
pub const UNPACK_PER_STEP: usize = 1 << 20;
const UNPACK_SLICE: usize = 64 << 10;
const UNPACK_TIME: Duration = Duration::from_millis(10);
/// Records written or temps renamed per step at most, and none more once
/// [`COMMIT_TIME`] has passed (302 of each took 30-60 ms in one turn).
const COMMIT_PER_STEP: usize = 64;
const COMMIT_TIME: Duration = Duration::from_millis(5);

#[derive(Debug, Clone)]
pub struct NetOptions {
    pub fetch: Options,
    /// Connections per cache, 1..=64.
    pub connections: usize,
    /// Compressed bytes spooled at once (one larger NAR is still let through alone).
    pub spool_budget: u64,
}

impl Default for NetOptions {
    fn default() -> Self {
        NetOptions { fetch: Options::default(), connections: 8, spool_budget: 256 << 20 }
    }
}

enum Source {
    Http { origin: usize },
    File(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Health {
    Unchecked,
    Ok,
    Down(String),
}

struct Cache {
    url: CacheUrl,
    source: Source,
    health: Health,
}

/// What a request is for.
#[derive(Debug, Clone)]
enum Job {
    CacheInfo(usize),
    NarInfo(StorePath, usize),
    Nar(StorePath, usize),
}

/// A NAR body being written to disk.
struct Spool {
    file: File,
    path: PathBuf,
    written: u64,
    /// FileSize, if the narinfo has one: more is cut off.
    limit: Option<u64>,
    /// The NAR's size: progress counts what is spooled in NAR bytes.
    nar_size: u64,
}

impl Drop for Spool {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

enum Sink {
    Mem(Vec<u8>, u64),
    Spool(Spool),
}

/// One request in flight and what has arrived for it.
struct Active {
    job: Job,
    url: String,
    sink: Sink,
    /// Bytes already held before this request (a resume from there).
    offset: u64,
    status: Option<u16>,
    /// Leading body bytes to drop: the server ignored our Range.
    skip: u64,
    /// Why the handler stopped the body, if it did.
    refused: Option<PipelineError>,
    /// The start of a 401/403 answer, for its S3 error code.
    denied_body: Vec<u8>,
}

/// The engine's handler: fills sinks, collects completions.
#[derive(Default)]
struct Inbox {
    active: HashMap<ReqId, Active>,
    finished: Vec<(ReqId, Result<(), NetError>)>,
}

impl Handler for Inbox {
    fn head(&mut self, id: ReqId, head: &Head) -> bool {
        let Some(a) = self.active.get_mut(&id) else { return false };
        a.status = Some(head.status);
        if a.offset > 0 {
            match head.status {
                206 if head.range_start != Some(a.offset) => {
                    let msg = format!(
                        "asked for bytes from {}, got Content-Range starting at {:?}",
                        a.offset, head.range_start
                    );
                    a.refused = Some(PipelineError::Fetch(FetchError::Transport { url: a.url.clone(), msg }));
                    return false;
                }
                200 => {
                    log::info!("{}: server ignored Range, re-reading {} bytes", a.url, a.offset);
                    a.skip = a.offset;
                }
                _ => {}
            }
        }
        true
    }

    fn data(&mut self, id: ReqId, mut bytes: &[u8]) -> bool {
        let Some(a) = self.active.get_mut(&id) else { return false };
        if !matches!(a.status, Some(200 | 206)) {
            // An error page: read past it so the connection stays usable
            // (keeping the start of a refusal, for its error code).
            if matches!(a.status, Some(401 | 403)) {
                let room = (crate::fetch::DENIED_BODY as usize).saturating_sub(a.denied_body.len());
                a.denied_body.extend_from_slice(&bytes[..room.min(bytes.len())]);
            }
            return true;
        }
        let skip = usize::try_from(a.skip).map_or(bytes.len(), |s| s.min(bytes.len()));
        a.skip -= skip as u64;
        bytes = &bytes[skip..];
        match &mut a.sink {
            Sink::Mem(buf, limit) => {
                if (buf.len() + bytes.len()) as u64 > *limit {
                    let e = FetchError::TooLarge { url: a.url.clone(), limit: *limit };
                    a.refused = Some(PipelineError::Fetch(e));
                    return false;
                }
                buf.extend_from_slice(bytes);
            }
            Sink::Spool(s) => {
                let n = bytes.len() as u64;
                if let Some(limit) = s.limit.filter(|l| s.written + n > *l) {
                    a.refused = Some(PipelineError::TooLong { what: "file", limit });
                    return false;
                }
                if let Err(e) = s.file.write_all(bytes) {
                    a.refused = Some(PipelineError::Read { url: format!("spool {}", s.path.display()), source: e });
                    return false;
                }
                s.written += n;
            }
        }
        true
    }

    fn done(&mut self, id: ReqId, result: Result<(), NetError>) {
        self.finished.push((id, result));
    }
}

/// A NAR whose bytes are all here: spooled, or in a `file://` cache.
enum Ready {
    Spooled(Spool),
    InCache(PathBuf),
}

/// A path whose narinfo is being looked for, cache by cache.
struct Lookup {
    first_err: Option<InstallError>,
    unreachable: Vec<String>,
}

/// A request to send again later (after a backoff).
struct Retry {
    at: Instant,
    job: Job,
    tries: u32,
    spool: Option<Spool>,
    /// A small document's overall deadline, retries included.
    deadline: Option<Instant>,
}

/// The NAR being unpacked, a step at a time.
struct Unpacking {
    path: StorePath,
    tmp: String,
    pass: pipeline::Pass<'static, File>,
    unpacker: Unpacker<'static>,
    /// The spool it reads.
    spool: Option<Spool>,
    /// NAR bytes unpacked so far.
    nar_done: u64,
}

/// What a [`InstallJob::step`] came to.
pub enum Step {
    /// More to do; whether the caller's descriptors are ready.
    Working { extra_ready: bool },
    /// The closure is resolved and, as asked ([`InstallJob::new`]'s
    /// `hold`), no NAR has been requested: [`InstallJob::release`] starts them.
    Resolved,
    /// Everything installed.
    Done(Plan, Progress),
}

/// An install over the engine, advanced by [`InstallJob::step`] under the
/// store lock (taken by the caller and passed to every step).
pub struct InstallJob {
    st: State,
    keys: TrustedKeys,
}

struct State {
    engine: Engine,
    inbox: Inbox,
    caches: Vec<Cache>,
    opts: NetOptions,
    started: bool,
    /// No NAR is requested before [`InstallJob::release`].
    hold: bool,
    provided: Provided,
    /// Paths whose narinfo came up front: their NAR is in any cache.
    from_doc: BTreeSet<StorePath>,
    /// Overall deadlines of small requests in flight.
    deadlines: HashMap<ReqId, Instant>,
    unpacking: Option<Unpacking>,
    /// NAR bytes counted in progress, per path.
    credited: HashMap<StorePath, u64>,
    /// Consecutive failures of the job behind each request.
    tries: HashMap<ReqId, u32>,
    retries: Vec<Retry>,
    checking: usize,
    roots: Vec<StorePath>,
    seen: BTreeSet<StorePath>,
    /// Paths to discover (see [`InstallJob::discover`]) and whether a
    /// discovery loop is running.
    to_discover: Vec<StorePath>,
    discovering: bool,
    present: BTreeSet<StorePath>,
    lookups: BTreeMap<StorePath, Lookup>,
    found: BTreeMap<StorePath, PlanItem>,
    /// NARs waiting for a spool slot.
    nar_queue: VecDeque<StorePath>,
    spools_open: usize,
    spool_bytes: u64,
    ready: VecDeque<(StorePath, Ready)>,
    unpacked: BTreeMap<StorePath, String>,
    order: Option<Vec<PlanItem>>,
    committed: usize,
    /// The batch `committed..end` of the plan being committed.
    committing: Option<Committing>,
    /// A flush failed or timed out: the file system is not to be waited
    /// for again (abandoning the job commits nothing more).
    flush_failed: bool,
    prog: Progress,
}

/// A batch `committed..end` of the plan being committed, and how far.
struct Committing {
    end: usize,
    stage: Stage,
}

/// A batch's commit, in order; records and renames a slice per step.
enum Stage {
    /// Records of `committed..next` written.
    Records { next: usize },
    /// Every record written; the contents being made durable.
    Contents(Flush),
    /// Temps of `committed..next` renamed into place.
    Renames { next: usize },
    /// Every temp renamed; the names being made durable.
    Names(Flush),
}

/// One step's view: the job's state with the store lock and the keys.
struct Driver<'a, 's> {
    st: &'a mut State,
    keys: &'a TrustedKeys,
    store: &'a StoreLock<'s>,
}

impl std::ops::Deref for Driver<'_, '_> {
    type Target = State;
    fn deref(&self) -> &State {
        self.st
    }
}

impl std::ops::DerefMut for Driver<'_, '_> {
    fn deref_mut(&mut self) -> &mut State {
        self.st
    }
}

/// Resolves and installs the closures of `roots` over the engine, blocking
/// in the job's own `poll(2)` (`nixless install`): the plan and what moved.
pub fn install(
    caches: &[CacheUrl],
    opts: NetOptions,
    store: &StoreLock,
    keys: &TrustedKeys,
    roots: &[StorePath],
    progress: &mut dyn FnMut(&Progress),
) -> Result<(Plan, Progress), InstallError> {
    store.clean_temps().map_err(io_err("clean", store.store_dir().display()))?;
    let mut job = InstallJob::new(caches, opts, keys.clone(), roots, Provided::new(), false)?;
    loop {
        match job.step(store, Duration::from_millis(50), &[]) {
            Ok(Step::Done(plan, prog)) => {
                progress(&prog);
                return Ok((plan, prog));
            }
            Ok(_) => progress(job.progress()),
            Err(e) => {
                job.abandon(store);
                return Err(e);
            }
        }
    }
}

impl InstallJob {
    /// A job for the closures of `roots` from `caches`, using the narinfos
    /// `provided` (by hash part) before asking any cache; with `hold`, it
    /// stops after resolution ([`Step::Resolved`]) until released. The
    /// caller cleans the store's temps first, under the lock.
    pub fn new(
        caches: &[CacheUrl],
        opts: NetOptions,
        keys: TrustedKeys,
        roots: &[StorePath],
        provided: Provided,
        hold: bool,
    ) -> Result<InstallJob, InstallError> {
        let mut engine = Engine::new(engine::Config {
            conns_per_origin: opts.connections,
            connect_timeout: opts.fetch.connect_timeout,
            read_timeout: opts.fetch.read_timeout,
            trust: opts.fetch.trust.clone(),
            ..engine::Config::default()
        });
        let mut cs = Vec::new();
        for url in caches {
            let source = match url {
                CacheUrl::File(dir) => Source::File(dir.clone()),
                CacheUrl::Http(u) => {
                    let (origin, _) = Origin::parse(u)
                        .map_err(|msg| InstallError::Fetch(FetchError::CacheInfo { cache: u.clone(), msg }))?;
                    Source::Http { origin: engine.add_origin(origin) }
                }
                // Path-style: the endpoint is the origin, the bucket the prefix.
                CacheUrl::S3(u) => {
                    let cache = |msg: String| InstallError::Fetch(FetchError::CacheInfo { cache: u.clone(), msg });
                    let t = crate::auth::s3::target(u).map_err(cache)?;
                    let (origin, _) = Origin::parse(&t.url).map_err(cache)?;
                    Source::Http { origin: engine.add_origin(origin) }
                }
            };
            cs.push(Cache { url: url.clone(), source, health: Health::Unchecked });
        }
        let st = State {
            engine,
            inbox: Inbox::default(),
            caches: cs,
            opts,
            started: false,
            hold,
            provided,
            from_doc: BTreeSet::new(),
            deadlines: HashMap::new(),
            unpacking: None,
            credited: HashMap::new(),
            tries: HashMap::new(),
            retries: Vec::new(),
            checking: 0,
            roots: roots.to_vec(),
            seen: BTreeSet::new(),
            to_discover: Vec::new(),
            discovering: false,
            present: BTreeSet::new(),
            lookups: BTreeMap::new(),
            found: BTreeMap::new(),
            nar_queue: VecDeque::new(),
            spools_open: 0,
            spool_bytes: 0,
            ready: VecDeque::new(),
            unpacked: BTreeMap::new(),
            order: None,
            committed: 0,
            committing: None,
            flush_failed: false,
            prog: Progress::default(),
        };
        Ok(InstallJob { st, keys })
    }

    /// One bounded step: one engine round waiting at most `max_wait` (less
    /// when there is unpacking to do or a retry is due) on the caches and
    /// on `extra`, then what arrived, then up to [`UNPACK_PER_STEP`] NAR
    /// bytes unpacked and whatever prefix of the plan is complete committed.
    /// After an `Err`, call [`InstallJob::abandon`].
    pub fn step(
        &mut self,
        store: &StoreLock,
        max_wait: Duration,
        extra: &[(BorrowedFd<'_>, PollFlags)],
    ) -> Result<Step, InstallError> {
        Driver { st: &mut self.st, keys: &self.keys, store }.step(max_wait, extra)
    }

    /// Lets NAR downloads start after [`Step::Resolved`].
    pub fn release(&mut self) {
        self.st.hold = false;
    }

    pub fn progress(&self) -> &Progress {
        &self.st.prog
    }

    /// The closure's paths found present in the store (not fetched again):
    /// a collection while the job waits must keep them.
    pub fn present(&self) -> impl Iterator<Item = &StorePath> {
        self.st.present.iter()
    }

    /// After a failure: what is unpacked and closure-complete (a prefix of
    /// the plan) stays, as in the sequential install (a retry need not
    /// fetch it again); every other temp and spool goes.
    pub fn abandon(mut self, store: &StoreLock) {
        let mut d = Driver { st: &mut self.st, keys: &self.keys, store };
        d.commit_now();
        if let Some(u) = d.unpacking.take() {
            drop(u.unpacker);
            let _ = fsutil::remove_tree(store.store_fd(), u.tmp.as_bytes());
        }
        for tmp in d.unpacked.values() {
            let _ = fsutil::remove_tree(store.store_fd(), tmp.as_bytes());
        }
        d.unpacked.clear();
        // Spools go by their Drop, with the inbox, the retries and the ready queue.
    }
}

impl Driver<'_, '_> {
    fn step(&mut self, max_wait: Duration, extra: &[(BorrowedFd<'_>, PollFlags)]) -> Result<Step, InstallError> {
        if !self.started {
            self.started = true;
            // All counted first: a file:// cache answers at once, and
            // resolution must not start before every cache has answered.
            self.checking = self.caches.len();
            for idx in 0..self.caches.len() {
                self.send(Job::CacheInfo(idx), 0, None, None)?;
            }
            if self.checking == 0 {
                self.start_resolution()?;
            }
        }
        let resolved = self.checking == 0 && self.lookups.is_empty();
        if resolved && self.order.is_none() {
            let order = topo_order(std::mem::take(&mut self.found))?;
            self.prog.paths_total = order.len();
            self.prog.nar_bytes_total = order.iter().fold(0u64, |s, i| s.saturating_add(i.nar_size));
            self.order = Some(order);
            if self.hold {
                return Ok(Step::Resolved);
            }
        }
        self.commit(false)?;
        if self.order.as_ref().is_some_and(|o| self.committed == o.len()) {
            self.commit(true)?;
            let items = self.order.take().unwrap_or_default();
            return Ok(Step::Done(Plan { items, present: self.present.len() }, self.prog));
        }
        self.send_due_retries()?;
        self.start_nars()?;
        let now = Instant::now();
        let idle = self.ready.is_empty() && self.unpacking.is_none() && !self.commit_busy();
        let mut wait = if idle { max_wait } else { Duration::ZERO };
        if let Some(at) = self.retries.iter().map(|r| r.at).min() {
            wait = wait.min(at.saturating_duration_since(now));
        }
        if let Some(f) = self.commit_flush() {
            wait = wait.min(f.deadline().saturating_duration_since(now));
        }
        let st = &mut *self.st;
        // The commit's flush is waited for in the same poll (its readiness
        // also counts as `extra_ready`: the caller's extra poll is cheap).
        let mut fds = extra.to_vec();
        let flush_fd = match st.committing.as_ref().map(|c| &c.stage) {
            Some(Stage::Contents(f) | Stage::Names(f)) => f.fd(),
            _ => None,
        };
        fds.extend(flush_fd.map(|fd| (fd, PollFlags::IN)));
        let extra_ready = st.engine.turn_with(&mut st.inbox, wait, &fds);
        drop(fds);
        self.credit_spools();
        for (id, result) in std::mem::take(&mut self.inbox.finished) {
            self.finished(id, result)?;
        }
        self.unpack_some(UNPACK_PER_STEP)?;
        Ok(Step::Working { extra_ready })
    }

    fn cache_name(&self, idx: usize) -> String {
        self.caches[idx].url.to_string()
    }

    fn url_of(&self, idx: usize, rel: &str) -> String {
        self.caches[idx].url.join(rel)
    }

    /// The request for `rel` of cache `idx` with its credentials
    /// ([`crate::auth::prepare`], signed now: an S3 signature carries the
    /// time): the path to ask the cache's origin for, and the extra header
    /// fields. The Host field is the origin's own (for S3 the signed one is
    /// the same: both come from the endpoint).
    fn authorised(&self, idx: usize, rel: &str) -> Result<(String, Vec<(String, String)>), FetchError> {
        let url = self.url_of(idx, rel);
        let now = crate::clock::now();
        let auth_err = |msg: String| FetchError::Auth { url: url.clone(), msg };
        let p = crate::auth::prepare("GET", &url, now, &self.opts.fetch.credentials)
            .map_err(|e| auth_err(e.to_string()))?;
        let (origin, target) = Origin::parse(&p.url).map_err(auth_err)?;
        let Source::Http { origin: o, .. } = &self.caches[idx].source else {
            return Err(auth_err("not an HTTP cache".into()));
        };
        if origin.authority != self.engine.authority(*o) {
            return Err(auth_err(format!("credentials moved the request to {}", origin.authority)));
        }
        let headers = p
            .headers
            .into_iter()
            .filter(|(name, _)| !name.eq_ignore_ascii_case("host"))
            .map(|(name, value)| (name.to_owned(), value))
            .collect();
        Ok((if target.is_empty() { "/".into() } else { target }, headers))
    }

    /// Sends (or, for `file://`, does) the request behind `job`.
    fn send(
        &mut self,
        job: Job,
        tries: u32,
        spool: Option<Spool>,
        deadline: Option<Instant>,
    ) -> Result<(), InstallError> {
        let (idx, rel, urgent) = match &job {
            Job::CacheInfo(idx) => (*idx, "nix-cache-info".to_owned(), true),
            Job::NarInfo(p, idx) => (*idx, format!("{}.narinfo", p.hash_part()), true),
            Job::Nar(p, idx) => (*idx, self.item(p).info().url.to_owned(), false),
        };
        let url = self.url_of(idx, &rel);
        let Source::Http { origin, .. } = &self.caches[idx].source else {
            return self.read_file(job, idx, &rel);
        };
        let origin = *origin;
        let (target, headers) = match self.authorised(idx, &rel) {
            Ok(t) => t,
            Err(e) => return self.fail(job, PipelineError::Fetch(e)),
        };
        let (sink, limit_deadline) = match (&job, spool) {
            (Job::Nar(..), Some(s)) => (Sink::Spool(s), None),
            (Job::Nar(p, _), None) => (Sink::Spool(self.new_spool(p)?), None),
            (Job::CacheInfo(_), _) => (Sink::Mem(Vec::new(), 64 << 10), Some(())),
            (Job::NarInfo(..), _) => (Sink::Mem(Vec::new(), MAX_NARINFO), Some(())),
        };
        let offset = match &sink {
            Sink::Spool(s) => s.written,
            Sink::Mem(..) => 0,
        };
        // One overall deadline per small document, retries included (a
        // retry keeps the first send's), as the sequential fetcher's.
        let deadline =
            limit_deadline.map(|()| deadline.unwrap_or_else(|| Instant::now() + self.opts.fetch.small_fetch_deadline));
        let id = self.engine.submit(origin, target, headers, offset, deadline, urgent);
        self.tries.insert(id, tries);
        if let Some(d) = deadline {
            self.deadlines.insert(id, d);
        }
        let active = Active { job, url, sink, offset, status: None, skip: 0, refused: None, denied_body: Vec::new() };
        self.inbox.active.insert(id, active);
        Ok(())
    }

    fn new_spool(&self, p: &StorePath) -> Result<Spool, InstallError> {
        let name = format!("{}.nar", temp_name(p));
        let path = self.store.store_dir().join(&name);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err("create spool", path.display()))?;
        let limit = self.item(p).info().file_size;
        let nar_size = self.item(p).nar_size;
        Ok(Spool { file, path, written: 0, limit, nar_size })
    }

    fn set_cache(&mut self, p: &StorePath, idx: usize) {
        let item = match &mut self.order {
            Some(order) => order.iter_mut().find(|i| i.path == *p),
            None => self.found.get_mut(p),
        };
        if let Some(i) = item {
            i.cache = idx;
        }
    }

    fn item(&self, p: &StorePath) -> &PlanItem {
        match &self.order {
            Some(order) => order.iter().find(|i| i.path == *p).expect("planned"),
            None => &self.found[p],
        }
    }

    /// A `file://` cache: the answer now.
    fn read_file(&mut self, job: Job, idx: usize, rel: &str) -> Result<(), InstallError> {
        let Source::File(dir) = &self.caches[idx].source else { unreachable!("an http cache") };
        // A query string means nothing to a directory.
        let rel = rel.split(['?', '#']).next().unwrap_or(rel);
        let path = dir.join(rel);
        if let Job::Nar(p, _) = job {
            if !path.exists() {
                let url = format!("{}/{rel}", self.caches[idx].url);
                return self.nar_missing(p, idx, url);
            }
            self.ready.push_back((p, Ready::InCache(path)));
            return Ok(());
        }
        let limit = if matches!(job, Job::CacheInfo(_)) { 64 << 10 } else { MAX_NARINFO };
        let url = format!("file://{}", path.display());
        let got = crate::fetch::read_local(&url, &path, limit);
        self.answer(job, got)
    }

    fn start_resolution(&mut self) -> Result<(), InstallError> {
        for p in std::mem::take(&mut self.roots) {
            self.discover(p)?;
        }
        Ok(())
    }

    /// A path of the closure: present, or its narinfo is looked for.
    ///
    /// Iterative: narinfos that are there at once (a `file://` cache, the
    /// deploy document's) would otherwise recurse once per reference level,
    /// and a deep chain (a hostile document's, or a long real one) would
    /// overflow the stack. Paths found while discovering go on a worklist.
    fn discover(&mut self, p: StorePath) -> Result<(), InstallError> {
        self.to_discover.push(p);
        if self.discovering {
            return Ok(());
        }
        self.discovering = true;
        let mut result = Ok(());
        while let Some(p) = self.to_discover.pop() {
            result = self.discover_one(p);
            if result.is_err() {
                self.to_discover.clear();
                break;
            }
        }
        self.discovering = false;
        result
    }

    fn discover_one(&mut self, p: StorePath) -> Result<(), InstallError> {
        if !self.seen.insert(p.clone()) {
            return Ok(());
        }
        if self.store.is_present(&p) {
            self.present.insert(p);
            return Ok(());
        }
        if let Some(text) = self.provided.remove(p.hash_part()) {
            match NarInfo::parse(&text, Some(&p)).and_then(|ni| ni.verify(self.keys).map(|_| ni)) {
                Ok(ni) => {
                    let references = ni.references.clone();
                    let nar_size = ni.nar_size;
                    if let Some(idx) = self.next_healthy(0) {
                        self.from_doc.insert(p.clone());
                        return self.found_item(PlanItem { path: p, cache: idx, narinfo: text, nar_size, references });
                    }
                }
                // Never trusted: the caches are asked, as for a path the
                // document did not cover.
                Err(e) => log::warn!("{p}: narinfo supplied with the deploy: {e}; asking the caches"),
            }
        }
        self.lookups.insert(p.clone(), Lookup { first_err: None, unreachable: Vec::new() });
        self.next_cache(p, 0)
    }

    /// The first cache from `from` on that answered its `nix-cache-info`.
    fn next_healthy(&self, from: usize) -> Option<usize> {
        (from..self.caches.len()).find(|i| self.caches[*i].health == Health::Ok)
    }

    /// A verified narinfo: its NAR is queued, its references looked for.
    fn found_item(&mut self, item: PlanItem) -> Result<(), InstallError> {
        let p = item.path.clone();
        let references = item.references.clone();
        self.found.insert(p.clone(), item);
        self.nar_queue.push_back(p.clone());
        for r in references {
            if r != p {
                self.discover(r)?;
            }
        }
        Ok(())
    }

    /// Asks the first usable cache from `from` on for `p`'s narinfo, or fails.
    fn next_cache(&mut self, p: StorePath, from: usize) -> Result<(), InstallError> {
        for idx in from..self.caches.len() {
            match &self.caches[idx].health {
                Health::Ok => return self.send(Job::NarInfo(p, idx), 0, None, None),
                Health::Down(why) => {
                    let why = why.clone();
                    if let Some(l) = self.lookups.get_mut(&p) {
                        l.unreachable.push(why);
                    }
                }
                Health::Unchecked => unreachable!("resolution starts after the checks"),
            }
        }
        let l = self.lookups.remove(&p).expect("looked up");
        Err(l
            .first_err
            .unwrap_or(InstallError::Fetch(FetchError::NotFound { path: p.to_string(), unreachable: l.unreachable })))
    }

    /// A finished request: its answer, a retry, or a failure.
    fn finished(&mut self, id: ReqId, result: Result<(), NetError>) -> Result<(), InstallError> {
        let Some(a) = self.inbox.active.remove(&id) else { return Ok(()) };
        let tries = self.tries.remove(&id).unwrap_or(0);
        let deadline = self.deadlines.remove(&id);
        if let Some(err) = a.refused {
            return self.fail(a.job, err);
        }
        if let (Err(NetError::Deadline), false) = (&result, matches!(a.job, Job::Nar(..))) {
            let e = FetchError::Deadline { url: a.url, after: self.opts.fetch.small_fetch_deadline };
            return self.fail(a.job, PipelineError::Fetch(e));
        }
        let status = a.status.unwrap_or(0);
        let transient = match &result {
            Err(e) => Some(e.to_string()),
            Ok(()) if crate::fetch::transient_status(status) => Some(format!("GET {}: HTTP {status}", a.url)),
            Ok(()) => None,
        };
        let progressed = match &a.sink {
            Sink::Spool(s) => s.written > a.offset,
            Sink::Mem(..) => false,
        };
        if let Some(why) = transient {
            // The budget is for consecutive failures: progress resets it.
            let tries = if progressed { 1 } else { tries + 1 };
            let spool = match a.sink {
                Sink::Spool(s) => Some(s),
                Sink::Mem(..) => None,
            };
            if tries > self.opts.fetch.retries {
                let e = FetchError::Transport { url: a.url, msg: why };
                return self.fail(a.job, PipelineError::Fetch(e));
            }
            let delay = self.opts.fetch.backoff.saturating_mul(1 << (tries - 1).min(16));
            match &spool {
                Some(s) if s.written > 0 => log::warn!("{}: {why}; resuming at byte {}", a.url, s.written),
                _ => log::warn!("{}: {why}; retrying in {delay:?}", a.url),
            }
            self.retries.push(Retry { at: Instant::now() + delay, job: a.job, tries, spool, deadline });
            return Ok(());
        }
        if matches!(status, 401 | 403) {
            let what = match a.job {
                Job::CacheInfo(idx) => format!("cache {}", self.cache_name(idx)),
                _ => a.url,
            };
            let e = FetchError::Denied { what, status, code: crate::fetch::denied_code(&a.denied_body) };
            return self.fail(a.job, PipelineError::Fetch(e));
        }
        match (a.job, a.sink) {
            (job @ (Job::CacheInfo(_) | Job::NarInfo(..)), Sink::Mem(buf, _)) => {
                let got = match status {
                    200 | 206 => Ok(Some(buf)),
                    404 | 410 => Ok(None),
                    _ => Err(FetchError::Http { url: a.url, status }),
                };
                self.answer(job, got)
            }
            (Job::Nar(p, idx), Sink::Spool(s)) => match status {
                200 | 206 => {
                    self.ready.push_back((p, Ready::Spooled(s)));
                    Ok(())
                }
                404 | 410 => {
                    drop(s);
                    self.release_spool(&p);
                    let url = self.url_of(idx, self.item(&p).info().url);
                    self.nar_missing(p, idx, url)
                }
                _ => Err(InstallError::Nar {
                    path: p,
                    err: PipelineError::Fetch(FetchError::Http { url: a.url, status }),
                }),
            },
            _ => unreachable!("sinks match their jobs"),
        }
    }

    /// A request that will not be retried failed with `err`.
    fn fail(&mut self, job: Job, err: PipelineError) -> Result<(), InstallError> {
        match job {
            Job::Nar(p, _) => Err(InstallError::Nar { path: p, err }),
            job => {
                let e = match err {
                    PipelineError::Fetch(e) => e,
                    other => FetchError::Transport { url: String::new(), msg: other.to_string() },
                };
                self.answer(job, Err(e))
            }
        }
    }

    /// The answer to a small request: the body, `None` for "not here", or why it failed.
    fn answer(&mut self, job: Job, got: Result<Option<Vec<u8>>, FetchError>) -> Result<(), InstallError> {
        match job {
            Job::CacheInfo(idx) => {
                let cache = self.cache_name(idx);
                self.caches[idx].health = match got {
                    Ok(Some(bytes)) => {
                        let text = String::from_utf8_lossy(&bytes);
                        cache_info::parse(&text).map_err(|e| {
                            InstallError::Fetch(FetchError::CacheInfo { cache: cache.clone(), msg: e.to_string() })
                        })?;
                        Health::Ok
                    }
                    Ok(None) => Health::Down(format!("{cache}: no nix-cache-info (not a binary cache)")),
                    Err(e) => Health::Down(e.to_string()),
                };
                if let Health::Down(why) = &self.caches[idx].health {
                    log::warn!("skipping cache for this run: {why}");
                }
                self.checking -= 1;
                if self.checking == 0 {
                    self.start_resolution()?;
                }
                Ok(())
            }
            Job::NarInfo(p, idx) => match got {
                Ok(None) => self.next_cache(p, idx + 1),
                Err(e @ FetchError::TooLarge { .. }) => Err(InstallError::Fetch(e)),
                Err(e) => {
                    if let Some(l) = self.lookups.get_mut(&p) {
                        l.unreachable.push(e.to_string());
                    }
                    self.next_cache(p, idx + 1)
                }
                Ok(Some(bytes)) => self.narinfo(p, idx, bytes),
            },
            Job::Nar(..) => unreachable!("NARs are not small answers"),
        }
    }

    fn narinfo(&mut self, p: StorePath, idx: usize, bytes: Vec<u8>) -> Result<(), InstallError> {
        let cache = self.cache_name(idx);
        let Ok(text) = String::from_utf8(bytes) else {
            let e = FetchError::Transport { url: self.url_of(idx, p.hash_part()), msg: "narinfo is not UTF-8".into() };
            return Err(InstallError::Fetch(e));
        };
        let checked = NarInfo::parse(&text, Some(&p)).and_then(|ni| ni.verify(self.keys).map(|_| ni));
        let (nar_size, references) = match checked {
            Ok(ni) => (ni.nar_size, ni.references.clone()),
            Err(err) => {
                if idx + 1 < self.caches.len() {
                    log::warn!("{p}: narinfo from {cache}: {err}; trying the next cache");
                }
                if let Some(l) = self.lookups.get_mut(&p) {
                    l.first_err.get_or_insert(InstallError::NarInfo { path: p.clone(), cache, err });
                }
                return self.next_cache(p, idx + 1);
            }
        };
        self.lookups.remove(&p);
        self.found_item(PlanItem { path: p, cache: idx, narinfo: text, nar_size, references })
    }

    /// Starts queued NAR downloads while spool slots and budget allow.
    fn start_nars(&mut self) -> Result<(), InstallError> {
        // Held (the agent's disk-space rule runs first, and a collection
        // then may remove every temp in the store): nothing is fetched.
        if self.hold {
            return Ok(());
        }
        while let Some(p) = self.nar_queue.front() {
            let item = self.item(p);
            let size = item.info().file_size.unwrap_or(item.nar_size);
            let busy = self.spools_open > 0;
            if busy
                && (self.spools_open >= MAX_SPOOLS || self.spool_bytes.saturating_add(size) > self.opts.spool_budget)
            {
                return Ok(());
            }
            let p = self.nar_queue.pop_front().expect("front");
            let idx = self.item(&p).cache;
            self.start_nar(p, idx)?;
        }
        Ok(())
    }

    /// Requests `p`'s NAR from cache `idx`, taking a spool slot for it.
    fn start_nar(&mut self, p: StorePath, idx: usize) -> Result<(), InstallError> {
        self.set_cache(&p, idx);
        if matches!(self.caches[idx].source, Source::Http { .. }) {
            let item = self.item(&p);
            let size = item.info().file_size.unwrap_or(item.nar_size);
            self.spools_open += 1;
            self.spool_bytes = self.spool_bytes.saturating_add(size);
        }
        self.send(Job::Nar(p, idx), 0, None, None)
    }

    /// Gives back the spool slot `start_nar` took for `p`.
    fn release_spool(&mut self, p: &StorePath) {
        let item = self.item(p);
        let size = item.info().file_size.unwrap_or(item.nar_size);
        self.spools_open -= 1;
        self.spool_bytes = self.spool_bytes.saturating_sub(size);
    }

    /// A NAR missing from cache `idx`: for a narinfo from the document
    /// (which names no cache), asked of the next cache; else the end.
    fn nar_missing(&mut self, p: StorePath, idx: usize, url: String) -> Result<(), InstallError> {
        let next = if self.from_doc.contains(&p) { self.next_healthy(idx + 1) } else { None };
        match next {
            Some(next) => self.start_nar(p, next),
            None => Err(InstallError::Nar { path: p, err: PipelineError::MissingNar { url } }),
        }
    }

    fn send_due_retries(&mut self) -> Result<(), InstallError> {
        let now = Instant::now();
        let mut i = 0;
        while i < self.retries.len() {
            if self.retries[i].at <= now {
                let r = self.retries.swap_remove(i);
                self.send(r.job, r.tries, r.spool, r.deadline)?;
            } else {
                i += 1;
            }
        }
        Ok(())
    }

    /// Decompresses, verifies and unpacks about `budget` NAR bytes of the
    /// ready NARs, one at a time, each into a temp.
    fn unpack_some(&mut self, budget: usize) -> Result<(), InstallError> {
        let start = Instant::now();
        let mut left = budget;
        while left > 0 && start.elapsed() < UNPACK_TIME {
            if self.unpacking.is_none() {
                let Some((p, ready)) = self.ready.pop_front() else { return Ok(()) };
                self.start_unpack(p, ready)?;
            }
            let st = &mut *self.st;
            let Some(u) = st.unpacking.as_mut() else { return Ok(()) };
            let unpacker = &mut u.unpacker;
            let mut moved = 0usize;
            let mut sink = |ev: crate::nar::Event<'_>| unpacker.event(ev).map_err(NarError::from);
            let mut meter = |n: u64| moved = moved.saturating_add(n as usize);
            let stepped = u.pass.step(left.min(UNPACK_SLICE), &mut sink, &mut meter);
            u.nar_done = u.nar_done.saturating_add(moved as u64);
            let (p, done) = (u.path.clone(), u.nar_done);
            self.credit(&p, done);
            left = left.saturating_sub(moved.max(1));
            match stepped {
                Ok(false) => {}
                Ok(true) => self.finish_unpack()?,
                Err(err) => return Err(self.unpack_failed(err)),
            }
        }
        Ok(())
    }

    /// Progress in NAR bytes: a path is credited with what is spooled of
    /// it (in proportion: FileSize to NarSize) or unpacked, whichever is
    /// more, so the total only grows and ends at the closure's NarSize.
    fn credit(&mut self, p: &StorePath, nar_bytes: u64) {
        let st = &mut *self.st;
        let c = st.credited.entry(p.clone()).or_insert(0);
        if nar_bytes > *c {
            st.prog.nar_bytes_done += nar_bytes - *c;
            *c = nar_bytes;
        }
    }

    /// Credits the NAR bytes spooled so far.
    fn credit_spools(&mut self) {
        let spooled: Vec<(StorePath, u64)> = self
            .inbox
            .active
            .values()
            .filter_map(|a| match (&a.job, &a.sink) {
                (Job::Nar(p, _), Sink::Spool(s)) => {
                    let file = s.limit.unwrap_or(s.nar_size).max(1);
                    let est = u128::from(s.written) * u128::from(s.nar_size) / u128::from(file);
                    Some((p.clone(), u64::try_from(est).unwrap_or(u64::MAX).min(s.nar_size)))
                }
                _ => None,
            })
            .collect();
        for (p, n) in spooled {
            self.credit(&p, n);
        }
    }

    fn start_unpack(&mut self, p: StorePath, ready: Ready) -> Result<(), InstallError> {
        let item = self.item(&p).clone();
        let info = item.info();
        let tmp = temp_name(&p);
        let fail = |err| InstallError::Nar { path: p.clone(), err };
        let parent = self
            .store
            .store_fd()
            .try_clone_to_owned()
            .map_err(|e| fail(PipelineError::Read { url: "store directory".into(), source: e }))?;
        let (file, url, spool) = match ready {
            Ready::InCache(path) => {
                let url = format!("file://{}", path.display());
                let f = File::open(&path).map_err(|e| fail(PipelineError::Read { url: url.clone(), source: e }))?;
                (f, url, None)
            }
            Ready::Spooled(spool) => {
                let url = self.url_of(item.cache, info.url);
                let read = |e| fail(PipelineError::Read { url: url.clone(), source: e });
                let mut f = spool.file.try_clone().map_err(read)?;
                f.rewind().map_err(read)?;
                (f, url, Some(spool))
            }
        };
        let pass = pipeline::Pass::new(file, &url, &info).map_err(fail)?;
        let unpacker = Unpacker::owned(parent, tmp.as_bytes());
        self.unpacking = Some(Unpacking { path: p, tmp, pass, unpacker, spool, nar_done: 0 });
        Ok(())
    }

    fn finish_unpack(&mut self) -> Result<(), InstallError> {
        let Some(u) = self.unpacking.take() else { return Ok(()) };
        let result = u.pass.finish();
        drop(u.unpacker);
        if u.spool.is_some() {
            self.release_spool(&u.path);
        }
        drop(u.spool);
        match result {
            Ok(stats) => {
                self.prog.paths_done += 1;
                self.prog.file_bytes += stats.file_bytes;
                self.unpacked.insert(u.path, u.tmp);
                Ok(())
            }
            Err(err) => {
                let _ = fsutil::remove_tree(self.store.store_fd(), u.tmp.as_bytes());
                Err(InstallError::Nar { path: u.path, err })
            }
        }
    }

    fn unpack_failed(&mut self, err: PipelineError) -> InstallError {
        let u = self.unpacking.take().expect("unpacking");
        drop(u.unpacker);
        let _ = fsutil::remove_tree(self.store.store_fd(), u.tmp.as_bytes());
        InstallError::Nar { path: u.path, err }
    }

    /// Commits the unpacked prefix of the plan by batches, as far as it
    /// can in a slice of time and without waiting; with `all`, whatever
    /// prefix there is (the end, or a failure). A batch: its records, then
    /// a flush of the contents; once that is done, the renames in plan
    /// order, then a flush of the names; once that is done, the batch
    /// counts as committed and the next may start. One batch at a time, so
    /// the order on disk is [`super::install`]'s.
    fn commit(&mut self, all: bool) -> Result<(), InstallError> {
        let store = self.store;
        let st = &mut *self.st;
        let Some(order) = &st.order else { return Ok(()) };
        let limits = BatchLimits::default();
        let start = Instant::now();
        let mut done = 0usize;
        let more = |done: &mut usize| {
            let go = *done == 0 || (*done < COMMIT_PER_STEP && start.elapsed() < COMMIT_TIME);
            *done += 1;
            go
        };
        loop {
            let Some(Committing { end, stage }) = st.committing.take() else {
                let mut end = st.committed;
                let mut bytes = 0u64;
                while end < order.len() && st.unpacked.contains_key(&order[end].path) {
                    bytes = bytes.saturating_add(order[end].nar_size);
                    end += 1;
                    if end - st.committed >= limits.paths || bytes >= limits.nar_bytes {
                        break;
                    }
                }
                let full = end - st.committed >= limits.paths || bytes >= limits.nar_bytes;
                if end == st.committed || !(full || all || end == order.len()) {
                    return Ok(());
                }
                st.committing = Some(Committing { end, stage: Stage::Records { next: st.committed } });
                continue;
            };
            let stage = match stage {
                Stage::Records { mut next } => {
                    while next < end && more(&mut done) {
                        commit_record(store, &order[next])?;
                        next += 1;
                    }
                    if next < end {
                        st.committing = Some(Committing { end, stage: Stage::Records { next } });
                        return Ok(());
                    }
                    Stage::Contents(
                        Flush::start(contents_what(store), &contents_durable(store), FLUSH_DEADLINE)
                            .map_err(InstallError::Flush)?,
                    )
                }
                Stage::Contents(mut flush) => {
                    if !flush.check().map_err(|e| {
                        st.flush_failed = true;
                        InstallError::Flush(e)
                    })? {
                        st.committing = Some(Committing { end, stage: Stage::Contents(flush) });
                        return Ok(());
                    }
                    Stage::Renames { next: st.committed }
                }
                Stage::Renames { mut next } => {
                    while next < end && more(&mut done) {
                        let item = &order[next];
                        let tmp = st.unpacked.get(&item.path).expect("unpacked");
                        rename_into_place(store, item, tmp)?;
                        next += 1;
                    }
                    if next < end {
                        st.committing = Some(Committing { end, stage: Stage::Renames { next } });
                        return Ok(());
                    }
                    Stage::Names(
                        Flush::start(names_what(store), &names_durable(store), FLUSH_DEADLINE)
                            .map_err(InstallError::Flush)?,
                    )
                }
                Stage::Names(mut flush) => {
                    if !flush.check().map_err(|e| {
                        st.flush_failed = true;
                        InstallError::Flush(e)
                    })? {
                        st.committing = Some(Committing { end, stage: Stage::Names(flush) });
                        return Ok(());
                    }
                    for i in &order[st.committed..end] {
                        st.unpacked.remove(&i.path);
                    }
                    st.committed = end;
                    continue;
                }
            };
            st.committing = Some(Committing { end, stage });
        }
    }

    /// The flush a commit waits for, if it waits for one.
    fn commit_flush(&self) -> Option<&Flush> {
        match &self.committing.as_ref()?.stage {
            Stage::Contents(f) | Stage::Names(f) => Some(f),
            Stage::Records { .. } | Stage::Renames { .. } => None,
        }
    }

    /// Whether a commit has records to write or temps to rename now.
    fn commit_busy(&self) -> bool {
        self.committing.is_some() && self.commit_flush().is_none()
    }

    /// [`Self::commit`] of whatever prefix there is, waiting for its
    /// flushes: after a failure, so what is complete stays.
    fn commit_now(&mut self) {
        loop {
            if self.flush_failed {
                return;
            }
            if self.commit(true).is_err() || self.committing.is_none() {
                return;
            }
            let Some(f) = self.commit_flush() else { continue };
            let Some(fd) = f.fd() else { continue };
            let left = f.deadline().saturating_duration_since(Instant::now());
            let ts = rustix::time::Timespec::try_from(left).unwrap_or(rustix::time::Timespec { tv_sec: 1, tv_nsec: 0 });
            let mut pfd = [rustix::event::PollFd::new(&fd, PollFlags::IN)];
            let _ = rustix::event::poll(&mut pfd, Some(&ts));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nar::write::{encode, Node};
    use crate::nix::keys::fingerprint;
    use crate::nix::{nixbase32, SecretKey, Sha256};
    use crate::store::Store;
    use sha2::{Digest, Sha256 as Hasher};
    use std::path::Path;

    /// A `file://` cache of `n` paths, path `i > 0` referencing path
    /// `(i - 1) / 2` (a heap: 8 deep for 200; resolution recurses once per
    /// level), with uncompressed NARs and signed narinfos.
    fn heap_cache(dir: &Path, n: usize, key: &SecretKey) -> Vec<StorePath> {
        shaped_cache(dir, n, key, |i| (i - 1) / 2)
    }

    /// A cache of `n` one-file paths; path `i > 0` refers to path `parent(i)`.
    fn shaped_cache(dir: &Path, n: usize, key: &SecretKey, parent: impl Fn(usize) -> usize) -> Vec<StorePath> {
        std::fs::create_dir_all(dir.join("nar")).unwrap();
        std::fs::write(dir.join("nix-cache-info"), "StoreDir: /nix/store\n").unwrap();
        let mut paths: Vec<StorePath> = Vec::new();
        for i in 0..n {
            let h: [u8; 20] = Hasher::digest(format!("heap-{i}").as_bytes())[..20].try_into().unwrap();
            let p = StorePath::from_base(&format!("{}-p{i}", nixbase32::encode(&h))).unwrap();
            let nar = encode(&Node::file(format!("path {i}").as_bytes()));
            let nar_hash = Sha256(Hasher::digest(&nar).into());
            let refs: Vec<StorePath> = if i == 0 { vec![] } else { vec![paths[parent(i)].clone()] };
            let sig = key.sign(fingerprint(&p, &nar_hash, nar.len() as u64, &refs).as_bytes());
            let url = format!("nar/{}.nar", nar_hash.to_nix32());
            std::fs::write(dir.join(&url), &nar).unwrap();
            let refs: Vec<&str> = refs.iter().map(StorePath::base).collect();
            let text = format!(
                "StorePath: {}\nURL: {url}\nCompression: none\nNarHash: sha256:{}\nNarSize: {}\nReferences: {}\nSig: {sig}\n",
                p.to_absolute(),
                nar_hash.to_nix32(),
                nar.len(),
                refs.join(" ")
            );
            std::fs::write(dir.join(format!("{}.narinfo", p.hash_part())), text).unwrap();
            paths.push(p);
        }
        paths
    }

    /// A commit larger than a step's slice renames over several steps, and
    /// in every state the caller's loop can see in between each path in the
    /// store has its reference and its record in place: the order on disk
    /// is the sequential install's, a step at a time. (Before, a batch's
    /// renames happened in one step: no partial state was ever seen.)
    #[test]
    fn a_large_commit_spans_steps_and_keeps_references_first() {
        const N: usize = 3 * COMMIT_PER_STEP + 10;
        let tmp = tempfile::tempdir().unwrap();
        let key = SecretKey::generate("heap-1").unwrap();
        let paths = heap_cache(&tmp.path().join("cache"), N, &key);
        let store = Store::open(&tmp.path().join("root"), &tmp.path().join("state")).unwrap();
        let lock = store.try_lock().unwrap().unwrap();
        let keys = TrustedKeys::new(vec![key.public()]);
        let store_dir = tmp.path().join("root/nix/store");
        let records = tmp.path().join("state/paths");
        let mut partial = 0;
        let caches = [CacheUrl::File(tmp.path().join("cache"))];
        let (plan, _) = install(&caches, NetOptions::default(), &lock, &keys, &paths, &mut |_| {
            let mut present = 0;
            for (i, p) in paths.iter().enumerate() {
                if !store_dir.join(p.base()).exists() {
                    continue;
                }
                present += 1;
                assert!(records.join(p.base()).exists(), "{p} is in the store before its record");
                if i > 0 {
                    let r = &paths[(i - 1) / 2];
                    assert!(store_dir.join(r.base()).exists(), "{p} is in the store before its reference {r}");
                }
            }
            if 0 < present && present < N {
                partial += 1;
            }
        })
        .unwrap();
        assert_eq!(plan.items.len(), N);
        assert!(paths.iter().all(|p| store_dir.join(p.base()).exists()));
        assert!(partial >= 2, "renames seen part done in {partial} steps");
        drop(lock);
        let _ = std::process::Command::new("chmod").arg("-R").arg("u+w").arg(tmp.path()).status();
    }

    /// Serves `dir` over HTTP/1.1 on loopback (a thread per connection,
    /// keep-alive, pipelined requests answered in order, 404 for what is
    /// missing); counts the NAR requests.
    fn serve_dir(dir: PathBuf) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use std::io::BufReader;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let nars = std::sync::Arc::new(AtomicUsize::new(0));
        let count = nars.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().take(64) {
                let Ok(mut conn) = conn else { return };
                let (dir, count) = (dir.clone(), count.clone());
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(conn.try_clone().unwrap());
                    loop {
                        let Some(target) = crate::net::testutil::read_request_target(&mut reader) else { return };
                        let path = target.trim_start_matches('/');
                        if path.starts_with("nar/") {
                            count.fetch_add(1, Ordering::SeqCst);
                        }
                        let reply = match std::fs::read(dir.join(path)) {
                            Ok(body) => {
                                let mut r =
                                    format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
                                r.extend_from_slice(&body);
                                r
                            }
                            Err(_) => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec(),
                        };
                        if conn.write_all(&reply).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (url, nars)
    }

    /// A held job stops at `Resolved` having requested no NAR and written
    /// nothing to the store (no spool, no temp, no path), so the agent's
    /// disk-space rule, and the collection it may run (which removes every
    /// temp), come first. Before, a NAR was requested as soon as its
    /// narinfo was verified, held or not, and over HTTP (narinfos coming
    /// over several steps) spools and temps were there at `Resolved`.
    #[test]
    fn a_held_job_fetches_no_nar_before_it_is_released() {
        let tmp = tempfile::tempdir().unwrap();
        let key = SecretKey::generate("held-1").unwrap();
        let paths = heap_cache(&tmp.path().join("cache"), 40, &key);
        let (url, nars) = serve_dir(tmp.path().join("cache"));
        let store = Store::open(&tmp.path().join("root"), &tmp.path().join("state")).unwrap();
        let lock = store.try_lock().unwrap().unwrap();
        let keys = TrustedKeys::new(vec![key.public()]);
        let caches = [CacheUrl::parse(&url).unwrap()];
        let mut job =
            InstallJob::new(&caches, NetOptions::default(), keys, &paths[30..], Provided::new(), true).unwrap();
        let store_dir = tmp.path().join("root/nix/store");
        let entries = || std::fs::read_dir(&store_dir).map(|d| d.count()).unwrap_or(0);
        let nar_requests = || nars.load(std::sync::atomic::Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(Instant::now() < deadline, "never resolved");
            match job.step(&lock, Duration::from_millis(10), &[]).unwrap() {
                Step::Working { .. } => {}
                Step::Resolved => break,
                Step::Done(..) => panic!("done while held"),
            }
        }
        assert_eq!((nar_requests(), entries()), (0, 0), "NARs requested or written before the release");
        // Paths 30..40 and their ancestors in the heap.
        assert_eq!(job.progress().paths_total, 25);
        job.release();
        let plan = loop {
            assert!(Instant::now() < deadline, "never done");
            if let Step::Done(plan, _) = job.step(&lock, Duration::from_millis(10), &[]).unwrap() {
                break plan;
            }
        };
        assert_eq!(nar_requests(), 25);
        assert!(plan.items.iter().all(|i| store_dir.join(i.path.base()).exists()));
        drop(lock);
        let _ = std::process::Command::new("chmod").arg("-R").arg("u+w").arg(tmp.path()).status();
    }

    /// A chain 3000 references deep, its narinfos all there at once (a
    /// `file://` cache), resolved on a thread with a 1 MiB stack: the
    /// discovery is a loop, not a recursion per level (which overflowed at
    /// 182 levels on a 2 MiB stack).
    #[test]
    fn a_deep_chain_does_not_grow_the_stack() {
        const N: usize = 3000;
        let tmp = tempfile::tempdir().unwrap();
        let key = SecretKey::generate("chain-1").unwrap();
        let paths = shaped_cache(&tmp.path().join("cache"), N, &key, |i| i - 1);
        let dir = tmp.path().to_owned();
        let top = paths[N - 1].clone();
        let installed = std::thread::Builder::new()
            .stack_size(1 << 20)
            .spawn(move || {
                let store = Store::open(&dir.join("root"), &dir.join("state")).unwrap();
                let lock = store.try_lock().unwrap().unwrap();
                let keys = TrustedKeys::new(vec![key.public()]);
                let caches = [CacheUrl::File(dir.join("cache"))];
                let (plan, _) = install(&caches, NetOptions::default(), &lock, &keys, &[top], &mut |_| {}).unwrap();
                plan.items.len()
            })
            .unwrap()
            .join()
            .expect("no stack overflow");
        assert_eq!(installed, N);
        assert!(paths.iter().all(|p| tmp.path().join("root/nix/store").join(p.base()).exists()));
        let _ = std::process::Command::new("chmod").arg("-R").arg("u+w").arg(tmp.path()).status();
    }
}
