//! The loop's small requests (issue 11 item 1): the polled deploy document
//! and its signature, the channel and key documents and theirs, the
//! network probe (health, and the net-before flag), the Pushgateway PUT.
//! They go through [`Oneshot`] on the loop's own `poll(2)`: submitted when
//! due, finished on a later turn. Nothing blocks, and nothing calls back
//! into the loop (a blocking fetcher with ticks did, before issue 11: a
//! POST was served from inside a poll's fetch).
//!
//! ```text
//! poll     GET poll_url → GET poll_url.sig → verify → accept     (one in flight; idle when started)
//! follow   [GET keys_url → .sig → apply] then [GET channel → .sig → decide]   (one round in flight)
//! probe    GET nix-cache-info of every cache and poll_url at once: reachable when any answers
//!          (a cache's 404 is no answer; the poll URL's is) → health round / net-before flag
//! push     PUT metrics (one in flight)
//! ```
//! A document's result is judged when it arrives, by the same rules as
//! before: a deploy accepted from a POST meanwhile makes the polled one
//! Busy (it waits for the next poll).

use super::*;
use crate::fetch::oneshot::{Done, Oneshot, Ticket};
use crate::fetch::FetchError;
use std::collections::BTreeMap;

/// Longest `nix-cache-info` read by the probe.
const CACHE_INFO_MAX: u64 = 64 << 10;

/// What a request in flight is for.
pub(super) enum Purpose {
    /// The polled deploy document (then its signature, with the document).
    Poll {
        url: String,
        doc: Option<Vec<u8>>,
    },
    /// A followed document (keys or channel), then its signature.
    Follow {
        kind: Follow,
        url: String,
        doc: Option<Vec<u8>>,
    },
    /// One URL of the network probe: its index, and whether any answer counts.
    Probe {
        idx: usize,
        url: String,
        any_answer: bool,
    },
    Push,
    /// A narinfo for a garbage collection ([`super::gc_run`]): the path, the cache asked.
    GcNarinfo {
        path: StorePath,
        cache: usize,
    },
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Follow {
    Keys,
    Channel,
}

/// What the network probe is for.
pub(super) enum ProbeFor {
    /// A health round's network check.
    Health,
    /// The net-before flag, then switch request `req` (written after it).
    NetBefore(protocol::Request),
}

pub(super) struct Probe {
    for_: ProbeFor,
    left: usize,
    /// Each URL's error (by index): the last one is reported.
    errors: BTreeMap<usize, String>,
    reachable: bool,
}

/// The requests in flight and what each is for.
pub(super) struct Requests {
    pub(super) client: Oneshot,
    purposes: BTreeMap<Ticket, Purpose>,
    probe: Option<Probe>,
}

impl Requests {
    pub(super) fn new(cfg: &Config) -> Requests {
        Requests { client: Oneshot::new(fetch_options(cfg)), purposes: BTreeMap::new(), probe: None }
    }

    fn any(&self, pred: impl Fn(&Purpose) -> bool) -> bool {
        self.purposes.values().any(pred)
    }

    pub(super) fn polling(&self) -> bool {
        self.any(|p| matches!(p, Purpose::Poll { .. }))
    }

    pub(super) fn following(&self) -> bool {
        self.any(|p| matches!(p, Purpose::Follow { .. }))
    }

    pub(super) fn pushing(&self) -> bool {
        self.any(|p| matches!(p, Purpose::Push))
    }

    pub(super) fn probing(&self) -> bool {
        self.probe.is_some()
    }

    pub(super) fn get(&mut self, url: &str, limit: u64, grow: bool, purpose: Purpose) {
        let t = self.client.get(url, limit, grow);
        self.purposes.insert(t, purpose);
    }
}

/// The poll URL's signature: `URL.sig`, as before (the channel's has its
/// own rule for `s3://`, [`follow::sig_url`]).
fn poll_sig_url(url: &str) -> String {
    format!("{url}.sig")
}

impl Agent {
    /// Starts a poll when due, while idle and none is in flight.
    pub(super) fn maybe_poll(&mut self) {
        let Some(url) = self.ctx.cfg.poll_url.clone() else { return };
        if self.reqs.polling() || !self.poll.due(Instant::now()) || self.shared.borrow().state.phase != Phase::Idle {
            return;
        }
        self.poll.ran(Instant::now(), self.ctx.cfg.poll_interval, &mut self.jitter);
        let limit = self.ctx.cfg.max_body_bytes as u64;
        self.reqs.get(&url.clone(), limit, true, Purpose::Poll { url, doc: None });
    }

    /// Starts a follow round (keys first, then the channel) when due, while
    /// idle and none is in flight.
    pub(super) fn maybe_follow(&mut self) {
        let cfg = &self.ctx.cfg;
        if cfg.channel.is_none() && cfg.keys_url.is_none() {
            return;
        }
        if self.reqs.following() || !self.follow.due(Instant::now()) || idle(&self.shared.borrow()).is_err() {
            return;
        }
        self.follow.ran(Instant::now(), cfg.poll_interval, &mut self.jitter);
        // Keys first: a rotation and a channel signed with the new key,
        // published together, take effect in one round.
        match (cfg.keys_url.clone(), cfg.channel.as_ref().map(|c| c.url.clone())) {
            (Some(url), _) => self.follow_get(Follow::Keys, url),
            (None, Some(url)) => self.follow_get(Follow::Channel, url),
            (None, None) => {}
        }
    }

    fn follow_get(&mut self, kind: Follow, url: String) {
        let limit = self.ctx.cfg.max_body_bytes as u64;
        self.reqs.get(&url.clone(), limit, true, Purpose::Follow { kind, url, doc: None });
    }

    /// Starts the network probe (unless one runs: then `for_` waits for
    /// the one running, whose result it shares when it is the same kind).
    pub(super) fn start_probe(&mut self, for_: ProbeFor) -> Result<(), String> {
        if let Some(p) = &mut self.reqs.probe {
            // A switch request must not be lost behind a health probe: it
            // takes the running probe over (its result serves both).
            if let ProbeFor::NetBefore(_) = for_ {
                p.for_ = for_;
            }
            return Ok(());
        }
        let mut urls: Vec<(String, bool)> =
            self.caches(&[]).iter().map(|c| (c.join("nix-cache-info"), false)).collect();
        if let Some(u) = &self.ctx.cfg.poll_url {
            urls.push((u.clone(), true));
        }
        let mut probe = Probe { for_, left: urls.len(), errors: BTreeMap::new(), reachable: false };
        if urls.is_empty() {
            probe.errors.insert(0, "no cache configured".into());
        }
        self.reqs.probe = Some(probe);
        let max_body = self.ctx.cfg.max_body_bytes as u64;
        for (idx, (url, any_answer)) in urls.into_iter().enumerate() {
            let limit = if any_answer { max_body } else { CACHE_INFO_MAX };
            self.reqs.get(&url.clone(), limit, any_answer, Purpose::Probe { idx, url, any_answer });
        }
        if self.reqs.probe.as_ref().is_some_and(|p| p.left == 0) {
            return self.probe_over();
        }
        Ok(())
    }

    /// Pushes the metrics when due and none is in flight (see `push`).
    pub(super) fn maybe_push(&mut self) {
        let trigger = push_trigger(&self.shared.borrow());
        if self.reqs.pushing() || !self.pusher.as_ref().is_some_and(|p| p.due(&trigger, Instant::now())) {
            return;
        }
        let t = now();
        let body = {
            let sh = self.shared.borrow();
            let mut snap = snapshot(&self.ctx, &sh);
            // The pushed copy says when it was pushed: a fleet view tells
            // silent hosts by it.
            if let Some(p) = snap.push.as_mut() {
                p.last_ok = Some(t);
            }
            status::metrics(&snap)
        };
        let Some(p) = self.pusher.as_mut() else { return };
        p.started(trigger, t);
        let ticket = self.reqs.client.put(p.url(), crate::agent::push::CONTENT_TYPE, body.into_bytes());
        self.reqs.purposes.insert(ticket, Purpose::Push);
    }

    /// One turn of the loop while no deploy fetch runs: one `poll(2)` over
    /// the requests' sockets and the HTTP server's (up to `wait`), then the
    /// server answers what arrived.
    pub(super) fn idle_turn(&mut self, wait: Duration) {
        if !self.reqs.client.busy() && !self.reqs.client.has_done() {
            return serve(&self.ctx, &self.shared, wait);
        }
        let server = self.shared.borrow_mut().server.take();
        match &server {
            Some(srv) => {
                let (fds, w) = srv.interest(wait);
                self.reqs.client.turn(w, &fds);
            }
            None => {
                self.reqs.client.turn(wait, &[]);
            }
        }
        // The server answers what its sockets brought.
        self.shared.borrow_mut().server = server;
        serve(&self.ctx, &self.shared, Duration::ZERO);
    }

    /// Handles every request that finished: a next request, or a result.
    pub(super) fn requests_done(&mut self) -> Result<(), String> {
        while let Some((ticket, res)) = self.reqs.client.take_done() {
            let Some(purpose) = self.reqs.purposes.remove(&ticket) else { continue };
            match purpose {
                Purpose::Poll { url, doc: None } => match res {
                    Ok(Done::Doc(Some(doc))) => {
                        let sig = poll_sig_url(&url);
                        self.reqs.get(&sig, MAX_SIG_BYTES, true, Purpose::Poll { url, doc: Some(doc) });
                    }
                    other => self.poll_failed(&url, other, false),
                },
                Purpose::Poll { url, doc: Some(doc) } => match res {
                    Ok(Done::Doc(Some(sig))) => self.poll_verify(&url, doc, sig)?,
                    other => self.poll_failed(&url, other, true),
                },
                Purpose::Follow { kind, url, doc: None } => match res {
                    Ok(Done::Doc(Some(doc))) => {
                        let sig = follow::sig_url(&url);
                        self.reqs.get(&sig, MAX_SIG_BYTES, true, Purpose::Follow { kind, url, doc: Some(doc) });
                    }
                    other => self.followed(kind, &url, Err(doc_error(&url, other)))?,
                },
                Purpose::Follow { kind, url, doc: Some(doc) } => match res {
                    Ok(Done::Doc(Some(sig))) => self.followed(kind, &url, Ok((doc, sig)))?,
                    other => {
                        let e = doc_error(&follow::sig_url(&url), other);
                        self.followed(kind, &url, Err(e))?
                    }
                },
                Purpose::Probe { idx, url, any_answer } => {
                    let answered = match res {
                        Ok(Done::Doc(Some(_))) => Ok(()),
                        Ok(Done::Doc(None)) if any_answer => Ok(()),
                        Ok(Done::Doc(None)) => Err(format!("GET {url}: HTTP 404")),
                        Ok(Done::Put(..)) => Ok(()),
                        Err(e) => Err(e.to_string()),
                    };
                    if let Some(p) = &mut self.reqs.probe {
                        p.left = p.left.saturating_sub(1);
                        match answered {
                            Ok(()) => p.reachable = true,
                            Err(e) => {
                                p.errors.insert(idx, e);
                            }
                        }
                        if p.left == 0 || p.reachable {
                            self.probe_over()?;
                        }
                    }
                }
                Purpose::GcNarinfo { path, cache } => self.gc_narinfo(path, cache, res),
                Purpose::Push => {
                    let res = match res {
                        Ok(Done::Put(status, answer)) => Ok((status, answer)),
                        Ok(Done::Doc(_)) => Ok((0, String::new())),
                        Err(e) => Err(e),
                    };
                    if let Some(p) = self.pusher.as_mut() {
                        p.finished(res);
                        self.shared.borrow_mut().push = Some(p.status.clone());
                    }
                }
            }
        }
        Ok(())
    }

    /// The probe has its answer: reachable once any URL answered, else the
    /// last URL's error. The other requests of a reachable probe run out
    /// on their own (their results are dropped).
    fn probe_over(&mut self) -> Result<(), String> {
        let Some(p) = self.reqs.probe.take() else { return Ok(()) };
        self.reqs.purposes.retain(|_, pur| !matches!(pur, Purpose::Probe { .. }));
        let result = if p.reachable {
            Ok(())
        } else {
            Err(p.errors.into_values().next_back().unwrap_or_else(|| "no answer".into()))
        };
        match p.for_ {
            ProbeFor::Health => {
                if let Some(run) = self.health.as_mut() {
                    run.network_checked(result);
                }
                Ok(())
            }
            ProbeFor::NetBefore(req) => self.net_before_known(req, result.is_ok()),
        }
    }

    fn poll_failed(&mut self, url: &str, res: Result<Done, FetchError>, sig: bool) {
        let what = if sig { poll_sig_url(url) } else { url.to_owned() };
        let e = doc_error(&what, res);
        let mut sh = self.shared.borrow_mut();
        sh.poll_last_check = Some(now());
        sh.poll_error = Some(e);
    }

    /// The polled document and its signature arrived: verified and
    /// accepted by the rules of a POST.
    fn poll_verify(&mut self, url: &str, doc: Vec<u8>, sig: Vec<u8>) -> Result<(), String> {
        let ctx = self.ctx.clone();
        let mut sh = self.shared.borrow_mut();
        sh.poll_last_check = Some(now());
        let verified = deploy::verify(&doc, Some(&sig), &sh.keys, &ctx.cfg.host, sh.state.highest_seq);
        let outcome = match verified {
            Ok(d) => accept(&ctx, &mut sh, &d, &doc, &sig),
            Err(rej) => Err(AcceptError::Refused(rej)),
        };
        match outcome {
            Ok(()) => sh.poll_error = None,
            // The document we already have (or an older one): nothing to do.
            Err(AcceptError::Refused(Rejection::Stale { .. })) => sh.poll_error = None,
            Err(AcceptError::Refused(rej)) => {
                let msg = format!("{url}: {rej}");
                reject(&ctx, &mut sh, &rej, "poll");
                sh.poll_error = Some(msg);
            }
            // A POST served while this poll was fetching started a deploy:
            // that one runs; the document is looked at again next poll.
            Err(AcceptError::Busy(_)) => {
                sh.poll_error = None;
                log::info!("poll: an update started meanwhile; the polled document waits for the next poll");
            }
            Err(AcceptError::NoSpace(e)) => sh.poll_error = Some(format!("{url}: cannot record the deploy: {e}")),
            Err(AcceptError::Fatal(e)) => return Err(e),
        }
        Ok(())
    }

    /// A followed document (and its signature), or why not: judged, then
    /// the round's next document (the channel after the keys).
    fn followed(&mut self, kind: Follow, url: &str, fetched: Result<(Vec<u8>, Vec<u8>), String>) -> Result<(), String> {
        match kind {
            Follow::Keys => {
                self.follow_keys(url, fetched);
                if let Some(ch) = self.ctx.cfg.channel.as_ref().map(|c| c.url.clone()) {
                    self.follow_get(Follow::Channel, ch);
                }
                Ok(())
            }
            Follow::Channel => match self.ctx.cfg.channel.clone() {
                Some(ch) => self.follow_channel(&ch, fetched),
                None => Ok(()),
            },
        }
    }
}

/// A document that did not come: one line, as the blocking fetcher said it.
fn doc_error(url: &str, res: Result<Done, FetchError>) -> String {
    match res {
        Ok(Done::Doc(None)) => format!("{url}: not found"),
        Ok(_) => format!("{url}: unexpected answer"),
        Err(e) => e.to_string(),
    }
}
