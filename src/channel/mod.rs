//! Channel documents: one signed document names, per group of hosts, the
//! system to run and a rollout plan in waves. Devices decide for
//! themselves ([`decide`]); no server keeps state.
//!
//! Wire format: a JSON object, signed as raw bytes with a deploy key exactly
//! like a deploy document (detached ed25519, `name:base64(64 bytes)`, the
//! same [`crate::deploy::check_signature`]), polled from any URL
//! with its signature at `URL.sig`.
//! ```text
//! channel  = {"channel": name, "seq": seq, "issued": time, "expires": time,
//!             "halt": bool?,                    ; default false
//!             "groups": {tag: group, …}}        ; at most MAX_GROUPS
//! group    = {"system": store-path, "action": "switch" | "boot",
//!             "caches": [url…]?,                ; at most MAX_CACHES
//!             "halt": bool?,                    ; this group only
//!             "waves": [wave…]}                 ; 1..=MAX_WAVES
//! wave     = {"percent": p, "start": time?, "soak_secs": secs?}
//! name, tag = 1*64 (ALPHA / DIGIT / "." / "_" / "-")
//! seq      = 0..=2^53-1
//! time     = 0..=MAX_TIME (Unix seconds)       ; issued < expires <= issued + MAX_VALIDITY_SECS
//! p        = number, 0 < p <= 100, at most 2 decimals, strictly increasing
//! secs     = 0..=MAX_SOAK_SECS
//! ```
//! Unknown fields are ignored (later versions may add some); a missing
//! required field (`null` counts as missing) is refused by name, duplicate
//! groups by name, duplicate fields as a malformed document. Percents grow
//! strictly: a wave with the previous one's share would hold no hosts, and
//! a pause is a longer soak.
//! A wave starts at its `start`, or `soak_secs` after the previous wave's
//! start (the first: after `issued`), or — the first wave with neither — at
//! `issued`; a later wave needs exactly one of the two. Starts never go
//! backwards and none is after `expires`.
//!
//! Checks, cheapest first and the signature before anything reads the JSON:
//! signature ([`crate::deploy::check_signature`]) → JSON depth →
//! fields → ranges → channel is the one this agent follows. What depends on
//! the device (sequence, expiry, wave) is [`decide`]'s.
//!
//! A deploy document cannot pass for a channel document or the reverse:
//! each lacks the other's required fields (`host`; `channel`, `issued`,
//! `expires`, `groups`), and a key rotation nests everything under
//! `rotate_keys`. Tests check all three pairs.

pub mod decide;
pub mod fresh;
pub mod keys;
pub mod sign;
pub mod wave;
pub(crate) mod wire;

pub use decide::{decide, Decision, Device, Record};

use crate::deploy::{self as signed, MAX_SEQ};
use crate::nix::{SecretKey, StorePath, TrustedKeys};
use crate::text::{clip, FIELD_MAX};
use serde::Deserialize;
use sha2::Digest;
use wire::{Capped, Entries};

pub const MAX_GROUPS: usize = 64;
pub const MAX_WAVES: usize = 16;
pub const MAX_CACHES: usize = 8;
/// Longest channel name or tag, in bytes.
pub const MAX_NAME: usize = 64;
/// Longest cache URL, in bytes.
pub const MAX_URL: usize = 1024;
/// 9999-12-31T23:59:59Z: every time is a plain date, and sums of two stay
/// far inside u64.
pub const MAX_TIME: u64 = 253_402_300_799;
/// 90 days. A frozen mirror (or an attacker replaying a captured document)
/// can hold a device on a release for at most this long after it was
/// issued. A CI that re-signs daily or weekly stays far inside it; 90 days
/// is the longest an admin may be away (holidays) without devices refusing
/// the channel, the same horizon as a Let's Encrypt certificate.
pub const MAX_VALIDITY_SECS: u64 = 90 * 86_400;
/// Longest soak between two waves: also 90 days.
pub const MAX_SOAK_SECS: u64 = MAX_VALIDITY_SECS;

/// What a channel group asks a device to do (a channel never rolls back or
/// collects garbage: those are per-device deploy documents).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupAction {
    Switch,
    Boot,
}

impl GroupAction {
    pub fn parse(s: &str) -> Option<GroupAction> {
        match s {
            "switch" => Some(GroupAction::Switch),
            "boot" => Some(GroupAction::Boot),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            GroupAction::Switch => "switch",
            GroupAction::Boot => "boot",
        }
    }
}

/// How a wave's start was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Neither `start` nor `soak_secs` (first wave only): at `issued`.
    Issued,
    At(u64),
    Soak(u64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wave {
    /// Share of the group's hosts in this wave and all before it, in
    /// hundredths of a percent: 1..=10 000.
    pub basis_points: u16,
    pub from: Start,
    /// Absolute start, resolved from `from`.
    pub start: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub tag: String,
    pub system: StorePath,
    pub action: GroupAction,
    pub caches: Vec<String>,
    pub halt: bool,
    pub waves: Vec<Wave>,
}

/// The signed content of a channel document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Doc {
    pub channel: String,
    pub seq: u64,
    pub issued: u64,
    pub expires: u64,
    pub halt: bool,
    /// In document order.
    pub groups: Vec<Group>,
}

/// A document whose signature verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub doc: Doc,
    /// The deploy key that signed it.
    pub key: String,
    /// sha256 of the signed bytes: a sequence reused for other content is
    /// refused ([`decide`]).
    pub digest: [u8; 32],
}

/// Why a channel document was refused. Every variant prints as one
/// bounded line: strings from the document are clipped and escaped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Missing, malformed, unknown-key or invalid signature.
    Signature(signed::Rejection),
    Malformed(String),
    /// A required field is absent (`at`: "document", "group \"kiosk\"", …).
    Missing {
        at: String,
        field: &'static str,
    },
    OtherChannel {
        doc: String,
        me: String,
    },
    SeqTooLarge(u64),
    TimeOutOfRange {
        field: &'static str,
        value: u64,
    },
    NotAfterIssued {
        issued: u64,
        expires: u64,
    },
    ValidityTooLong {
        secs: u64,
    },
    BadName {
        what: &'static str,
        value: String,
    },
    TooMany {
        what: &'static str,
        got: usize,
        max: usize,
    },
    DuplicateGroup(String),
    NotStorePath {
        tag: String,
        system: String,
    },
    UnknownAction {
        tag: String,
        action: String,
    },
    BadCache {
        tag: String,
        error: String,
    },
    NoWaves(String),
    BadPercent {
        tag: String,
        wave: usize,
        value: String,
    },
    PercentNotIncreasing {
        tag: String,
        wave: usize,
    },
    BadStart {
        tag: String,
        wave: usize,
        why: &'static str,
    },
    /// At the effective time `now` ([`fresh`]), the document has expired.
    Expired {
        expires: u64,
        now: u64,
    },
    /// A lower sequence than the one last accepted from this channel.
    Stale {
        seq: u64,
        accepted: u64,
    },
    /// The sequence last accepted, but other bytes: two documents signed
    /// with one sequence, and the device cannot tell which is newer.
    SeqReused(u64),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = |s: &str| clip(s, FIELD_MAX);
        match self {
            Refusal::Signature(r) => write!(f, "{r}"),
            Refusal::Malformed(e) => write!(f, "malformed channel document: {}", clip(e, 4 * FIELD_MAX)),
            Refusal::Missing { at, field } => write!(f, "{at}: missing field `{field}`"),
            Refusal::OtherChannel { doc, me } => {
                write!(f, "document is for channel \"{}\", this agent follows \"{}\"", c(doc), c(me))
            }
            Refusal::SeqTooLarge(s) => write!(f, "sequence {s} is above the largest allowed, {MAX_SEQ} (2^53-1)"),
            Refusal::TimeOutOfRange { field, value } => {
                write!(f, "{field} {value} is outside 0..={MAX_TIME} (9999-12-31)")
            }
            Refusal::NotAfterIssued { issued, expires } => {
                write!(f, "expires {expires} is not after issued {issued}")
            }
            Refusal::ValidityTooLong { secs } => {
                write!(
                    f,
                    "valid for {secs} s (expires - issued), more than the {MAX_VALIDITY_SECS} s (90 days) allowed"
                )
            }
            Refusal::BadName { what, value } => {
                write!(f, "{what} \"{}\" is not 1 to {MAX_NAME} of A-Z a-z 0-9 . _ -", clip(value, FIELD_MAX))
            }
            Refusal::TooMany { what, got, max } => write!(f, "{got} {what}, at most {max} allowed"),
            Refusal::DuplicateGroup(t) => write!(f, "group \"{}\" appears twice", c(t)),
            Refusal::NotStorePath { tag, system } => {
                write!(f, "group \"{}\": system \"{}\" is not a store path", c(tag), clip(system, 2 * FIELD_MAX))
            }
            Refusal::UnknownAction { tag, action } => {
                write!(f, "group \"{}\": unknown action \"{}\" (switch, boot)", c(tag), c(action))
            }
            Refusal::BadCache { tag, error } => write!(f, "group \"{}\": {}", c(tag), clip(error, 2 * FIELD_MAX)),
            Refusal::NoWaves(t) => write!(f, "group \"{}\" has no waves", c(t)),
            Refusal::BadPercent { tag, wave, value } => write!(
                f,
                "group \"{}\" wave {wave}: percent {} is not a number in (0, 100] with at most 2 decimals",
                c(tag),
                c(value)
            ),
            Refusal::PercentNotIncreasing { tag, wave } => {
                write!(f, "group \"{}\" wave {wave}: percent is not above the previous wave's", c(tag))
            }
            Refusal::BadStart { tag, wave, why } => write!(f, "group \"{}\" wave {wave}: {why}", c(tag)),
            Refusal::Expired { expires, now } => write!(f, "document expired at {expires} (now {now})"),
            Refusal::Stale { seq, accepted } => {
                write!(f, "sequence {seq} is below the one last accepted from this channel, {accepted}")
            }
            Refusal::SeqReused(s) => {
                write!(f, "sequence {s} was accepted before with other content (sign every change with a new sequence)")
            }
        }
    }
}

#[derive(Deserialize)]
struct WireWave {
    // Required fields are Options checked by name: serde-json-core reports
    // a missing field only as "does not match the expected format".
    #[serde(default)]
    percent: Option<f64>,
    #[serde(default)]
    start: Option<u64>,
    #[serde(default)]
    soak_secs: Option<u64>,
}

#[derive(Deserialize)]
struct WireGroup {
    #[serde(default)]
    system: Option<String>,
    #[serde(default)]
    action: Option<String>,
    #[serde(default)]
    caches: Capped<String, MAX_CACHES>,
    #[serde(default)]
    halt: bool,
    #[serde(default)]
    waves: Option<Capped<WireWave, MAX_WAVES>>,
}

#[derive(Deserialize)]
struct Wire {
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    issued: Option<u64>,
    #[serde(default)]
    expires: Option<u64>,
    #[serde(default)]
    halt: bool,
    #[serde(default)]
    groups: Option<Entries<WireGroup, MAX_GROUPS>>,
}

/// A required field, or a refusal naming it (`at`: where, for a message).
pub(crate) fn need<T>(v: Option<T>, at: &str, field: &'static str) -> Result<T, Refusal> {
    v.ok_or_else(|| Refusal::Missing { at: at.to_owned(), field })
}

/// A channel name or tag: short, and plain ASCII, so it is the same text in
/// a config, a file name, a metric label and a log line.
pub fn valid_name(s: &str) -> bool {
    (1..=MAX_NAME).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn time(field: &'static str, value: u64) -> Result<u64, Refusal> {
    match value <= MAX_TIME {
        true => Ok(value),
        false => Err(Refusal::TimeOutOfRange { field, value }),
    }
}

/// `issued < expires <= issued + MAX_VALIDITY_SECS`, both in range. Shared
/// with key rotations.
pub(crate) fn validity(issued: u64, expires: u64) -> Result<(), Refusal> {
    time("issued", issued)?;
    time("expires", expires)?;
    if expires <= issued {
        return Err(Refusal::NotAfterIssued { issued, expires });
    }
    if expires - issued > MAX_VALIDITY_SECS {
        return Err(Refusal::ValidityTooLong { secs: expires - issued });
    }
    Ok(())
}

/// A percentage with at most two decimals, as basis points (1..=10 000).
fn basis_points(p: f64) -> Option<u16> {
    if !p.is_finite() || p <= 0.0 || p > 100.0 {
        return None;
    }
    let bp = (p * 100.0).round();
    // 0.07 * 100 is 7.000000000000001: allow the float's own error, not a
    // third decimal.
    if (p * 100.0 - bp).abs() > 1e-6 || bp < 1.0 {
        return None;
    }
    Some(bp as u16)
}

fn waves(tag: &str, wire: Vec<WireWave>, issued: u64, expires: u64) -> Result<Vec<Wave>, Refusal> {
    let bad = |wave: usize, why: &'static str| Refusal::BadStart { tag: tag.to_owned(), wave, why };
    let mut out: Vec<Wave> = Vec::with_capacity(wire.len());
    for (i, w) in wire.into_iter().enumerate() {
        let n = i + 1;
        let percent = need(w.percent, &format!("group \"{}\" wave {n}", clip(tag, FIELD_MAX)), "percent")?;
        let bp = basis_points(percent).ok_or_else(|| Refusal::BadPercent {
            tag: tag.to_owned(),
            wave: n,
            value: percent.to_string(),
        })?;
        let prev = out.last();
        if prev.is_some_and(|p| bp <= p.basis_points) {
            return Err(Refusal::PercentNotIncreasing { tag: tag.to_owned(), wave: n });
        }
        let base = prev.map_or(issued, |p| p.start);
        let (from, start) = match (w.start, w.soak_secs) {
            (Some(_), Some(_)) => return Err(bad(n, "give start or soak_secs, not both")),
            (None, None) if prev.is_some() => return Err(bad(n, "needs start or soak_secs")),
            (None, None) => (Start::Issued, issued),
            (Some(t), None) => {
                if t > MAX_TIME {
                    return Err(bad(n, "start is after 9999-12-31"));
                }
                (Start::At(t), t)
            }
            (None, Some(s)) => {
                if s > MAX_SOAK_SECS {
                    return Err(bad(n, "soak_secs is above 7776000 (90 days)"));
                }
                // Both operands are at most MAX_TIME.
                (Start::Soak(s), base + s)
            }
        };
        if start < base && prev.is_some() {
            return Err(bad(n, "starts before the previous wave"));
        }
        if start >= expires {
            return Err(bad(n, "does not start before the document expires"));
        }
        out.push(Wave { basis_points: bp, from, start });
    }
    Ok(out)
}

fn group(tag: String, w: WireGroup, issued: u64, expires: u64) -> Result<Group, Refusal> {
    if !valid_name(&tag) {
        return Err(Refusal::BadName { what: "group tag", value: tag });
    }
    let at = format!("group \"{}\"", clip(&tag, FIELD_MAX));
    let (system, action) = (need(w.system, &at, "system")?, need(w.action, &at, "action")?);
    let waves_in = need(w.waves, &at, "waves")?;
    let system = StorePath::from_absolute(&system).map_err(|_| Refusal::NotStorePath { tag: tag.clone(), system })?;
    let action = GroupAction::parse(&action).ok_or_else(|| Refusal::UnknownAction { tag: tag.clone(), action })?;
    if w.caches.total > MAX_CACHES {
        return Err(Refusal::TooMany { what: "caches in a group", got: w.caches.total, max: MAX_CACHES });
    }
    for c in &w.caches.items {
        if c.len() > MAX_URL {
            let error = format!("cache URL of {} bytes, at most {MAX_URL}", c.len());
            return Err(Refusal::BadCache { tag, error });
        }
        crate::fetch::CacheUrl::parse(c).map_err(|error| Refusal::BadCache { tag: tag.clone(), error })?;
    }
    if waves_in.total > MAX_WAVES {
        return Err(Refusal::TooMany { what: "waves in a group", got: waves_in.total, max: MAX_WAVES });
    }
    if waves_in.items.is_empty() {
        return Err(Refusal::NoWaves(tag));
    }
    let waves = waves(&tag, waves_in.items, issued, expires)?;
    Ok(Group { tag, system, action, caches: w.caches.items, halt: w.halt, waves })
}

/// The JSON and every rule that does not depend on the device; no
/// signature check (the admin side checks what it is about to sign).
pub fn parse(body: &[u8]) -> Result<Doc, Refusal> {
    let w: Wire = crate::json::from_slice_bounded(body).map_err(|e| Refusal::Malformed(e.to_string()))?;
    let channel = need(w.channel, "document", "channel")?;
    let seq = need(w.seq, "document", "seq")?;
    let (issued, expires) = (need(w.issued, "document", "issued")?, need(w.expires, "document", "expires")?);
    let wire_groups = need(w.groups, "document", "groups")?;
    if !valid_name(&channel) {
        return Err(Refusal::BadName { what: "channel", value: channel });
    }
    if seq > MAX_SEQ {
        return Err(Refusal::SeqTooLarge(seq));
    }
    validity(issued, expires)?;
    if wire_groups.total > MAX_GROUPS {
        return Err(Refusal::TooMany { what: "groups", got: wire_groups.total, max: MAX_GROUPS });
    }
    let mut groups: Vec<Group> = Vec::with_capacity(wire_groups.items.len());
    for (tag, g) in wire_groups.items {
        if groups.iter().any(|have| have.tag == tag) {
            return Err(Refusal::DuplicateGroup(tag));
        }
        groups.push(group(tag, g, issued, expires)?);
    }
    Ok(Doc { channel, seq, issued, expires, halt: w.halt, groups })
}

/// Signature (with the deploy keys, through the deploy documents' own
/// check), then [`parse`], then the channel name.
pub fn verify(body: &[u8], sig: Option<&[u8]>, keys: &TrustedKeys, channel: &str) -> Result<Verified, Refusal> {
    let key = signed::check_signature(body, sig, keys).map_err(Refusal::Signature)?;
    let doc = parse(body)?;
    if doc.channel != channel {
        return Err(Refusal::OtherChannel { doc: doc.channel, me: channel.to_owned() });
    }
    Ok(Verified { doc, key, digest: sha2::Sha256::digest(body).into() })
}

/// A percent as the shortest JSON number ("1", "0.5", "12.34"): whole
/// percents as integers, the rest as exact decimals written by hand.
/// serde-json-core (the only serializer here, [`crate::json::to_string`])
/// writes `serialize_bytes` as raw JSON text; `serialize_f64` would link
/// ryu's 10 KiB of f64 tables for two decimals.
struct Percent(u16);

impl serde::Serialize for Percent {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (whole, frac) = (self.0 / 100, self.0 % 100);
        match (frac, frac % 10) {
            (0, _) => s.serialize_u16(whole),
            (_, 0) => s.serialize_bytes(format!("{whole}.{}", frac / 10).as_bytes()),
            _ => s.serialize_bytes(format!("{whole}.{frac:02}").as_bytes()),
        }
    }
}

#[derive(serde::Serialize)]
struct WaveOut {
    percent: Percent,
    #[serde(skip_serializing_if = "Option::is_none")]
    start: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    soak_secs: Option<u64>,
}

#[derive(serde::Serialize)]
struct GroupOut<'a> {
    system: String,
    action: &'a str,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    caches: &'a [String],
    #[serde(skip_serializing_if = "core::ops::Not::not")]
    halt: bool,
    waves: Vec<WaveOut>,
}

/// The groups in document order, as a JSON object keyed by tag.
struct GroupsOut<'a>(&'a [Group]);

impl serde::Serialize for GroupsOut<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for g in self.0 {
            let waves = g
                .waves
                .iter()
                .map(|w| {
                    let (start, soak_secs) = match w.from {
                        Start::Issued => (None, None),
                        Start::At(t) => (Some(t), None),
                        Start::Soak(s) => (None, Some(s)),
                    };
                    WaveOut { percent: Percent(w.basis_points), start, soak_secs }
                })
                .collect();
            let out = GroupOut {
                system: g.system.to_absolute(),
                action: g.action.as_str(),
                caches: &g.caches,
                halt: g.halt,
                waves,
            };
            m.serialize_entry(g.tag.as_str(), &out)?;
        }
        m.end()
    }
}

#[derive(serde::Serialize)]
struct DocOut<'a> {
    channel: &'a str,
    seq: u64,
    issued: u64,
    expires: u64,
    halt: bool,
    groups: GroupsOut<'a>,
}

/// The document's JSON (the admin side). Only a [`Doc`] that [`parse`]
/// accepts should be signed: [`issue`] checks.
pub fn render(d: &Doc) -> Result<String, crate::json::TooLarge> {
    crate::json::to_string(&DocOut {
        channel: &d.channel,
        seq: d.seq,
        issued: d.issued,
        expires: d.expires,
        halt: d.halt,
        groups: GroupsOut(&d.groups),
    })
}

/// How far ahead of the signer's clock `issued` may be. Devices take a
/// verified `issued` as a floor for their clock ([`fresh`]), so a document
/// from an admin whose clock runs a year ahead would make every device
/// refuse correct documents as expired for a year.
///
/// One hour covers any clock an admin's CI keeps with NTP; devices may
/// then believe a time up to an hour ahead, so a validity well above an
/// hour (a day or more) is never cut short by it.
pub const MAX_ISSUED_AHEAD_SECS: u64 = 3600;

/// The admin side: checks `body` as a device would (every rule of
/// [`parse`], plus `issued` at most [`MAX_ISSUED_AHEAD_SECS`] ahead of
/// `now`) and signs exactly those bytes.
pub fn issue(body: &[u8], key: &SecretKey, now: u64) -> Result<(Doc, String), String> {
    let doc = parse(body).map_err(|e| e.to_string())?;
    if doc.issued > now.saturating_add(MAX_ISSUED_AHEAD_SECS) {
        return Err(format!(
            "issued {} is more than {MAX_ISSUED_AHEAD_SECS} s ahead of this machine's clock ({now}): devices would \
             take it as the time and refuse every earlier-dated document as expired",
            doc.issued
        ));
    }
    if fresh::expired(doc.expires, now) {
        return Err(format!(
            "expires {} is not after this machine's clock ({now}): devices would refuse it",
            doc.expires
        ));
    }
    Ok((doc, signed::sign(key, body)))
}

#[cfg(test)]
mod tests;
