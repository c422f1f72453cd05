//! The JSON bodies of the agent's HTTP API, as the agent writes them and
//! `nixless deploy --wait` / `nixless status` (and tests, and the VM
//! scenarios) read them back. Below the agent, so the admin side reads
//! the very structs the agent writes.
//!
//! ```text
//! GET /v1/status   {"host":S,"version":S,"current_system":S|null,"booted_system":S|null,
//!                   "profile_system":S|null,"phase":S,"highest_seq":N,
//!                   "progress":{"paths_done":N,"paths_total":N,"bytes_done":N,"bytes_total":N},
//!                   "job":{"seq":N,"action":S,"system":S,"previous":S|null,"started":N,"failure":S|null,
//!                          "origin":"deploy"|"channel"}|null,
//!                   "health_deadline":N?,                        ; only while verifying
//!                   "last_result":{"seq":N,"action":S,"system":S,"outcome":S,"reason":S|null,"finished":N,
//!                                  "origin":"deploy"|"channel"}|null,
//!                   "last_error":S|null,"last_rejection":S|null,
//!                   "poll":{"url":S|null,"last_check":N|null,"error":S|null},"started":N,
//!                   "push":{"url":S,"last_ok":N|null,"error":S|null,"errors":N}?,  ; only with a pushgateway
//!                   "channel":{"url":S|null,"name":S|null,"seq":N|null,"decision":S|null,"group":S|null,
//!                              "wave":N|null,"system":S|null,"until":N|null,"expires":N|null,
//!                              "accepted_seq":N|null,"failed_system":S|null,"error":S|null,"last_check":N|null,
//!                              "keys_url":S|null,"keys_seq":N|null,"keys_error":S|null,"clock_floor":N}?}
//!                                                                ; only with channel_url or keys_url
//! POST /v1/deploy  202 {"seq":N,"status":"/v1/status","note":S?}
//! any refusal      {"error":S,"seq":N?}
//! ```
//! Readers take missing fields as their defaults, so an admin can read an
//! older or newer agent.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub host: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub current_system: Option<String>,
    #[serde(default)]
    pub booted_system: Option<String>,
    #[serde(default)]
    pub profile_system: Option<String>,
    pub phase: String,
    #[serde(default)]
    pub highest_seq: u64,
    #[serde(default)]
    pub progress: Progress,
    #[serde(default)]
    pub job: Option<Job>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_deadline: Option<u64>,
    #[serde(default)]
    pub last_result: Option<LastResult>,
    #[serde(default)]
    pub last_error: Option<String>,
    #[serde(default)]
    pub last_rejection: Option<String>,
    #[serde(default)]
    pub poll: Poll,
    #[serde(default)]
    pub started: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push: Option<Push>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<Channel>,
}

/// The channel followed (and the key rotation document polled with it).
/// `seq` … `until` describe the verified channel document held (the last
/// one accepted), all null until there is one; `error` is the last check's
/// refusal or failure, null once a check succeeds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Channel {
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub seq: Option<u64>,
    /// deploy, wait, not-in-plan, halted, not-for-me, already-running,
    /// failed-before.
    #[serde(default)]
    pub decision: Option<String>,
    /// The device's group (its first tag the document names).
    #[serde(default)]
    pub group: Option<String>,
    /// The device's 1-based wave in its group's plan; 0: not in the plan.
    #[serde(default)]
    pub wave: Option<u64>,
    /// The group's system.
    #[serde(default)]
    pub system: Option<String>,
    /// When the device's wave opens (decision wait).
    #[serde(default)]
    pub until: Option<u64>,
    /// When the document held expires (the device then refuses it).
    #[serde(default)]
    pub expires: Option<u64>,
    /// The sequence of the last document accepted, from the persisted
    /// record: known after a restart, before the first check.
    #[serde(default)]
    pub accepted_seq: Option<u64>,
    /// A system of this channel that failed here: not retried until a
    /// document names another.
    #[serde(default)]
    pub failed_system: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub last_check: Option<u64>,
    #[serde(default)]
    pub keys_url: Option<String>,
    /// The key rotation applied last.
    #[serde(default)]
    pub keys_seq: Option<u64>,
    #[serde(default)]
    pub keys_error: Option<String>,
    /// The time the device believes it is at least (Unix seconds).
    #[serde(default)]
    pub clock_floor: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub paths_done: u64,
    pub paths_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// The deploy in progress.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub seq: u64,
    pub action: String,
    pub system: String,
    #[serde(default)]
    pub previous: Option<String>,
    #[serde(default)]
    pub started: u64,
    #[serde(default)]
    pub failure: Option<String>,
    /// "deploy" (a deploy document) or "channel" (`seq` is the channel's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

/// How the last deploy ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastResult {
    pub seq: u64,
    #[serde(default)]
    pub action: String,
    #[serde(default)]
    pub system: String,
    pub outcome: String,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub finished: u64,
    /// "deploy" or "channel", as for [`Job`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Poll {
    pub url: Option<String>,
    pub last_check: Option<u64>,
    pub error: Option<String>,
}

/// Pushes of the metrics to a Prometheus Pushgateway.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Push {
    pub url: String,
    /// When the last push was accepted (Unix seconds).
    #[serde(default)]
    pub last_ok: Option<u64>,
    /// Why the last push failed; null once one succeeds again.
    #[serde(default)]
    pub error: Option<String>,
    /// Failed pushes since start.
    #[serde(default)]
    pub errors: u64,
}

/// `202 Accepted` to a deploy: where to follow it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    pub seq: u64,
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Accepted {
    pub const STATUS_PATH: &'static str = "/v1/status";
}

/// Every refusal's body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Error {
    pub error: String,
    /// The highest sequence accepted, when a deploy was stale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json::{from_slice_bounded, to_string, HOSTILE};

    fn back<T: Serialize + for<'a> Deserialize<'a> + PartialEq + std::fmt::Debug>(v: &T) -> String {
        let s = to_string(v).unwrap();
        assert!(!s.bytes().any(|b| b < 0x20), "one line: {s}");
        assert_eq!(&from_slice_bounded::<T>(s.as_bytes()).unwrap(), v, "{s}");
        s
    }

    #[test]
    fn status_roundtrips_with_hostile_strings() {
        let h = || Some(HOSTILE.to_owned());
        let full = Status {
            host: HOSTILE.into(),
            version: "0.1.0".into(),
            current_system: h(),
            booted_system: h(),
            profile_system: None,
            phase: "verifying".into(),
            highest_seq: (1 << 53) - 1,
            progress: Progress { paths_done: 1, paths_total: 2, bytes_done: u64::MAX, bytes_total: 0 },
            job: Some(Job {
                seq: 7,
                action: "switch".into(),
                system: HOSTILE.into(),
                previous: h(),
                started: 5,
                failure: h(),
                origin: Some("channel".into()),
            }),
            health_deadline: Some(99),
            last_result: Some(LastResult {
                seq: 6,
                action: "boot".into(),
                system: HOSTILE.into(),
                outcome: "failed".into(),
                reason: h(),
                finished: 4,
                origin: Some("deploy".into()),
            }),
            last_error: h(),
            last_rejection: h(),
            poll: Poll { url: h(), last_check: Some(3), error: h() },
            started: 1,
            push: Some(Push { url: HOSTILE.into(), last_ok: Some(2), error: h(), errors: 3 }),
            channel: Some(Channel {
                url: h(),
                name: h(),
                seq: Some((1 << 53) - 1),
                decision: Some("wait".into()),
                group: h(),
                wave: Some(16),
                system: h(),
                until: Some(u64::MAX),
                expires: Some(u64::MAX),
                accepted_seq: Some(0),
                failed_system: h(),
                error: h(),
                last_check: Some(1),
                keys_url: h(),
                keys_seq: Some(2),
                keys_error: h(),
                clock_floor: 3,
            }),
        };
        back(&full);
        let empty = Status { host: "h".into(), phase: "idle".into(), ..Status::default() };
        let s = back(&empty);
        // The field names and order tools and tests read.
        assert_eq!(
            s,
            r#"{"host":"h","version":"","current_system":null,"booted_system":null,"profile_system":null,"phase":"idle","highest_seq":0,"progress":{"paths_done":0,"paths_total":0,"bytes_done":0,"bytes_total":0},"job":null,"last_result":null,"last_error":null,"last_rejection":null,"poll":{"url":null,"last_check":null,"error":null},"started":0}"#
        );
    }

    #[test]
    fn a_reader_takes_an_agent_with_fewer_fields() {
        let s: Status = from_slice_bounded(br#"{"host":"h","phase":"idle","future":[1]}"#).unwrap();
        assert_eq!(s, Status { host: "h".into(), phase: "idle".into(), ..Status::default() });
    }

    #[test]
    fn bodies_roundtrip() {
        let a = Accepted { seq: 3, status: Accepted::STATUS_PATH.into(), note: None };
        assert_eq!(back(&a), r#"{"seq":3,"status":"/v1/status"}"#);
        back(&Accepted { note: Some(HOSTILE.into()), ..a });
        assert_eq!(back(&Error { error: "stale".into(), seq: Some(4) }), r#"{"error":"stale","seq":4}"#);
        assert_eq!(back(&Error { error: HOSTILE.into(), seq: None }).matches("\"seq\"").count(), 0);
    }
}
