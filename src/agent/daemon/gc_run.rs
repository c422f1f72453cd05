//! Garbage collection as the loop's work, a step per turn: the store lock
//! is tried (not waited for), and the narinfos of live paths without a
//! record (paths that were on the device before nixless) are asked of the
//! caches through [`docs`]' requests, [`WINDOW`] at a time. Nothing
//! blocks and nothing calls back into the loop (before issue 11 the lock
//! wait and the look-ups ran a blocking fetcher that ticked it).
//!
//! ```text
//! Locking   try the store lock each turn (every LOCK_RETRY at most), up to STORE_LOCK_WAIT
//! Learning  each live path without a record: GET {hash}.narinfo of cache 0, 1, … until one
//!           parses, is for the path and is signed by a cache key → its record is written
//!           (a path no cache vouches for keeps no record: collect then deletes nothing)
//! Collect   gc::collect under the lock, old generations deleted → the result
//! ```
//! The disk-space rule's collection, in the middle of a deploy's fetch,
//! starts at Learning with the fetch's own lock (the fetch waits,
//! `FetchRun::Collecting`). Besides the configured generations it keeps the
//! system being fetched and every path of its closure the fetch found
//! present (the fetch will not fetch those again: collected, they would
//! leave a hole in the closure), and it asks the deploy's own caches too.
//!
//! The result goes where it is awaited: a signed gc deploy's `GcDone`, the
//! pending gc document's accept, or the waiting fetch, which gets its lock
//! back ([`Agent::space_collected`]).

use super::docs::Purpose;
use super::*;
use crate::fetch::oneshot::Done;
use crate::nix::NarInfo;
use crate::store::record::Record;
use crate::store::{gc, HeldLock};

/// Narinfo look-ups in flight at once.
pub(super) const WINDOW: usize = 16;

/// What the collection is for.
pub(super) enum GcFor {
    /// A signed gc deploy (phase collecting): its `GcDone`.
    Deploy,
    /// The gc document that could not be recorded for lack of space.
    Pending,
    /// The disk-space rule of a deploy's fetch, which holds the lock;
    /// `keep`: the system and the closure paths the fetch found present.
    Space { keep: Vec<StorePath> },
}

impl GcFor {
    /// Roots besides the configured generations.
    fn extra_roots(&self) -> Vec<StorePath> {
        match self {
            GcFor::Space { keep } => keep.clone(),
            GcFor::Deploy | GcFor::Pending => Vec::new(),
        }
    }
}

pub(super) enum GcRun {
    Locking {
        for_: GcFor,
        wait: crate::store::LockWait,
    },
    Learning {
        for_: GcFor,
        lock: HeldLock,
        /// Asked in this order for the narinfos.
        caches: Vec<crate::fetch::CacheUrl>,
        /// Paths not asked for yet.
        queue: VecDeque<StorePath>,
        in_flight: usize,
        learnt: usize,
        unknown: usize,
    },
}

impl GcRun {
    /// Learning under `lock`: `unknown` to ask `caches` about, none asked yet.
    fn learning(for_: GcFor, lock: HeldLock, caches: Vec<crate::fetch::CacheUrl>, unknown: Vec<StorePath>) -> GcRun {
        let n = unknown.len();
        GcRun::Learning { for_, lock, caches, queue: unknown.into(), in_flight: 0, learnt: 0, unknown: n }
    }
}

impl Agent {
    /// Starts a collection (unless one runs).
    pub(super) fn start_gc(&mut self, for_: GcFor) {
        if self.gc.is_none() {
            let wait = crate::store::LockWait::new(STORE_LOCK_WAIT, Instant::now());
            self.gc = Some(GcRun::Locking { for_, wait });
        }
    }

    /// Starts the disk-space rule's collection under the fetch's `lock`
    /// (no collection runs: the fetch checked, and waits as
    /// `FetchRun::Collecting`).
    pub(super) fn start_space_gc(&mut self, lock: HeldLock, keep: Vec<StorePath>) {
        let for_ = GcFor::Space { keep };
        let ctx = self.ctx.clone();
        let (lock, unknown) = match ctx.store.reattach(lock) {
            Ok(store) => {
                let unknown = self.unrecorded_live(&store, &for_);
                (store.detach(), unknown)
            }
            Err(lock) => (lock, Vec::new()),
        };
        // The deploy's (or channel group's) caches first, as the fetch asks them.
        let caches = self.caches(&self.job_sources().0);
        // The loop's next `gc_turn` sends the look-ups (or collects at once).
        self.gc = Some(GcRun::learning(for_, lock, caches, unknown));
    }

    /// The live paths without a record under `store`, for `for_`'s roots.
    /// A roots error leaves none to learn: the collection meets it again
    /// ([`Agent::finish_gc`]) and reports it, deleting nothing.
    fn unrecorded_live(&self, store: &StoreLock, for_: &GcFor) -> Vec<StorePath> {
        match gc::roots(&self.ctx.cfg.root, self.ctx.cfg.generations_to_keep) {
            Ok((mut roots, _)) => {
                roots.extend(for_.extra_roots());
                gc::live_set(store, &roots).1
            }
            Err(_) => Vec::new(),
        }
    }

    /// When the collection wants a turn at the latest (the lock's retry).
    pub(super) fn gc_due(&self) -> Option<Duration> {
        matches!(self.gc, Some(GcRun::Locking { .. })).then_some(LOCK_RETRY)
    }

    /// Advances the collection without blocking; an error is fatal (as a
    /// failed state write was before).
    pub(super) fn gc_turn(&mut self) -> Result<(), String> {
        let ctx = self.ctx.clone();
        match self.gc.take() {
            None => Ok(()),
            Some(GcRun::Locking { for_, mut wait }) => match wait.poll(&ctx.store, Instant::now()) {
                Ok(Some(lock)) => {
                    let unknown = self.unrecorded_live(&lock, &for_);
                    self.gc = Some(GcRun::learning(for_, lock.detach(), self.caches(&[]), unknown));
                    self.gc_refill()
                }
                Ok(None) => {
                    self.gc = Some(GcRun::Locking { for_, wait });
                    Ok(())
                }
                // Busy past the wait, or the lock file's I/O error.
                Err(e) => self.gc_over(for_, Err(e.to_string())),
            },
            Some(run) => {
                self.gc = Some(run);
                self.gc_refill()
            }
        }
    }

    /// Asks for narinfos while the window has room; collects once all are answered.
    fn gc_refill(&mut self) -> Result<(), String> {
        let Some(GcRun::Learning { queue, in_flight, caches, .. }) = &mut self.gc else { return Ok(()) };
        while *in_flight < WINDOW {
            let Some(path) = queue.pop_front() else { break };
            if caches.is_empty() {
                continue;
            }
            *in_flight += 1;
            let url = caches[0].join(&format!("{}.narinfo", path.hash_part()));
            self.reqs.get(&url, crate::fetch::MAX_NARINFO, false, Purpose::GcNarinfo { path, cache: 0 });
        }
        let done = matches!(&self.gc, Some(GcRun::Learning { queue, in_flight: 0, .. }) if queue.is_empty());
        if !done {
            return Ok(());
        }
        let Some(GcRun::Learning { for_, lock, learnt, unknown, .. }) = self.gc.take() else { return Ok(()) };
        if unknown > 0 {
            log::info!("learnt the references of {learnt} of {unknown} paths from narinfos");
        }
        let ctx = self.ctx.clone();
        let extra = for_.extra_roots();
        let (res, lock) = match ctx.store.reattach(lock) {
            Ok(lock) => (self.finish_gc(&lock, &extra), lock.detach()),
            Err(lock) => (Err("the store lock is not this store's".into()), lock),
        };
        if let GcFor::Space { .. } = for_ {
            // The fetch's lock goes back to the fetch, never released.
            self.gc = None;
            return match self.space_collected(lock, res) {
                Some(ev) => self.apply(ev),
                None => Ok(()),
            };
        }
        drop(lock);
        self.gc_over(for_, res)
    }

    /// A narinfo look-up of the collection answered: a record, or the next cache.
    pub(super) fn gc_narinfo(&mut self, path: StorePath, cache: usize, res: Result<Done, crate::fetch::FetchError>) {
        let keys = &self.ctx.cfg.cache_keys;
        let record = match &res {
            Ok(Done::Doc(Some(bytes))) => std::str::from_utf8(bytes)
                .ok()
                .and_then(|text| NarInfo::parse(text, Some(&path)).ok().filter(|ni| ni.verify(keys).is_ok()))
                .map(|ni| Record::of(&ni)),
            _ => None,
        };
        let Some(GcRun::Learning { for_, lock, caches, queue, mut in_flight, mut learnt, unknown }) = self.gc.take()
        else {
            return;
        };
        // Records are written under the collection's lock.
        let lock = match self.ctx.store.reattach(lock) {
            Ok(l) => {
                if let Some(r) = &record {
                    learnt += usize::from(l.write_record(r).is_ok());
                }
                l.detach()
            }
            Err(l) => l,
        };
        let next = caches.get(cache + 1).filter(|_| record.is_none());
        let retry = next.map(|c| c.join(&format!("{}.narinfo", path.hash_part())));
        if retry.is_none() {
            in_flight -= 1;
        }
        self.gc = Some(GcRun::Learning { for_, lock, caches, queue, in_flight, learnt, unknown });
        if let Some(url) = retry {
            self.reqs.get(&url, crate::fetch::MAX_NARINFO, false, Purpose::GcNarinfo { path, cache: cache + 1 });
        }
    }

    /// The collection is over: its result goes where it is awaited.
    fn gc_over(&mut self, for_: GcFor, res: Result<crate::store::gc::Report, String>) -> Result<(), String> {
        self.gc = None;
        match for_ {
            GcFor::Deploy => self.apply(Event::GcDone(res.map(|r| r.to_string()))),
            GcFor::Pending => self.accept_pending_gc(res),
            // Not reached: a Space run starts with its lock and ends in
            // `space_collected`. Were it reached, the fetch ends (it
            // holds no temps before its NARs come).
            GcFor::Space { .. } => {
                self.fetching = None;
                let e = res.err().unwrap_or_default();
                self.apply(Event::FetchFailed(format!("collecting garbage for space: {e}")))
            }
        }
    }
}
