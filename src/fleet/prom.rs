//! A bounded reader for the answer of Prometheus's instant query API
//! (`GET /api/v1/query`), the only Prometheus answer the admin side reads.
//!
//! ```text
//! answer  = {"status": "success", "data": {"resultType": "vector", "result": [series…]}}
//!         | {"status": "error", "errorType": text, "error": text}
//! series  = {"metric": {label: text, …}, "value": [time, "number"]}
//! time    = JSON number, Unix seconds (the evaluation time)
//! number  = Go's float text: decimal, exponent, "NaN", "+Inf", "-Inf"
//! ```
//! Unknown fields (`warnings`, `stats`, …) are ignored. Bounds: at most
//! [`MAX_SERIES`] series and [`MAX_LABELS`] labels per series (more is an
//! error, not a silent cut: a fleet view missing hosts would lie), nesting
//! as [`crate::json::MAX_DEPTH`]; the body itself is bounded by the caller
//! ([`MAX_BODY`]). Label names and values are kept as sent; they are only
//! ever shown through [`crate::text::clip`] or JSON escaping.

use crate::channel::wire::{Capped, Entries};
use serde::Deserialize;

/// Largest answer read: ~6 series per host of a few hundred bytes each,
/// so about 20 000 hosts.
pub const MAX_BODY: u64 = 64 << 20;
/// Most series in one answer.
pub const MAX_SERIES: usize = 200_000;
/// Most labels on one series (ours carry at most 9).
pub const MAX_LABELS: usize = 32;

/// One series of an instant vector.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// In answer order; `__name__` included.
    pub labels: Vec<(String, String)>,
    /// Evaluation time, Unix seconds (finite).
    pub time: f64,
    /// May be NaN or infinite (Prometheus's own values).
    pub value: f64,
}

impl Sample {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    Malformed(String),
    /// Prometheus said `"status": "error"`.
    Query {
        kind: String,
        error: String,
    },
    NotSuccess(String),
    NotVector(String),
    TooMany {
        what: &'static str,
        max: usize,
    },
    BadTime {
        series: usize,
    },
    BadValue {
        series: usize,
        value: String,
    },
    Missing {
        series: usize,
        field: &'static str,
    },
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::text::{clip, FIELD_MAX};
        match self {
            Error::Malformed(e) => write!(f, "malformed answer: {}", clip(e, FIELD_MAX)),
            Error::Query { kind, error } => {
                write!(f, "query refused ({}): {}", clip(kind, FIELD_MAX), clip(error, 4 * FIELD_MAX))
            }
            Error::NotSuccess(s) => write!(f, "status \"{}\", expected \"success\"", clip(s, FIELD_MAX)),
            Error::NotVector(t) => write!(f, "result type \"{}\", expected \"vector\"", clip(t, FIELD_MAX)),
            Error::TooMany { what, max } => write!(f, "more than {max} {what}"),
            Error::BadTime { series } => write!(f, "series {series}: time is not a finite number"),
            Error::BadValue { series, value } => {
                write!(f, "series {series}: value \"{}\" is not a number", clip(value, FIELD_MAX))
            }
            Error::Missing { series, field } => write!(f, "series {series}: missing `{field}`"),
        }
    }
}

#[derive(Deserialize)]
struct WireSeries {
    #[serde(default)]
    metric: Option<Entries<String, MAX_LABELS>>,
    #[serde(default)]
    value: Option<(f64, String)>,
}

#[derive(Deserialize)]
struct WireData {
    #[serde(default, rename = "resultType")]
    result_type: Option<String>,
    #[serde(default)]
    result: Option<Capped<WireSeries, MAX_SERIES>>,
}

#[derive(Deserialize)]
struct Wire {
    #[serde(default)]
    status: Option<String>,
    #[serde(default, rename = "errorType")]
    error_type: Option<String>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    data: Option<WireData>,
}

/// Go's `strconv.FormatFloat(v, 'f', -1, 64)` text and the specials
/// Prometheus writes. Rust's parser also takes "inf"/"infinity" in any
/// case, which Go's does too; nothing else.
fn number(s: &str) -> Option<f64> {
    // Rust accepts "1." and ".5"; so does Go. Refuse what neither writes
    // and Rust would take: nothing known, but keep the text short.
    if s.is_empty() || s.len() > 64 {
        return None;
    }
    s.parse::<f64>().ok()
}

/// The series of an instant-vector answer (also for an error answer with
/// HTTP 4xx/5xx: Prometheus sends the same JSON).
pub fn parse(body: &[u8]) -> Result<Vec<Sample>, Error> {
    let w: Wire = crate::json::from_slice_bounded(body).map_err(|e| Error::Malformed(e.to_string()))?;
    let status = w.status.unwrap_or_default();
    if status == "error" {
        return Err(Error::Query { kind: w.error_type.unwrap_or_default(), error: w.error.unwrap_or_default() });
    }
    if status != "success" {
        return Err(Error::NotSuccess(status));
    }
    let data = w.data.ok_or(Error::Missing { series: 0, field: "data" })?;
    let kind = data.result_type.unwrap_or_default();
    if kind != "vector" {
        return Err(Error::NotVector(kind));
    }
    let result = data.result.unwrap_or_default();
    if result.total > MAX_SERIES {
        return Err(Error::TooMany { what: "series", max: MAX_SERIES });
    }
    let mut out = Vec::with_capacity(result.items.len());
    for (i, s) in result.items.into_iter().enumerate() {
        let metric = s.metric.ok_or(Error::Missing { series: i, field: "metric" })?;
        if metric.total > MAX_LABELS {
            return Err(Error::TooMany { what: "labels on a series", max: MAX_LABELS });
        }
        let (time, text) = s.value.ok_or(Error::Missing { series: i, field: "value" })?;
        if !time.is_finite() {
            return Err(Error::BadTime { series: i });
        }
        let value = number(&text).ok_or(Error::BadValue { series: i, value: text })?;
        out.push(Sample { labels: metric.items, time, value });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An answer as Prometheus 2.42 writes it (copied from a real one, with
    /// the `instance` label the Pushgateway adds).
    const REAL: &str = r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{"__name__":"nixless_channel_info","channel":"stable","decision":"deploy","group":"kiosk","host":"h-1","instance":"","job":"nixless","seq":"5","system":"/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-s","wave":"1"},"value":[1764730000.123,"1"]},{"metric":{"__name__":"nixless_last_push_timestamp_seconds","host":"h\"2\u00e9","job":"nixless"},"value":[1764730000.123,"1.7647299e+09"]}]}}"#;

    #[test]
    fn reads_a_real_answer() {
        let s = parse(REAL.as_bytes()).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].label("decision"), Some("deploy"));
        assert_eq!(s[0].label("wave"), Some("1"));
        assert_eq!((s[0].time, s[0].value), (1764730000.123, 1.0));
        assert_eq!(s[1].label("host"), Some("h\"2é"));
        assert_eq!(s[1].value, 1.7647299e9);
    }

    #[test]
    fn reads_specials_and_errors() {
        let one = |v: &str| {
            format!(
                r#"{{"status":"success","data":{{"resultType":"vector","result":[{{"metric":{{}},"value":[1,"{v}"]}}]}}}}"#
            )
        };
        assert!(parse(one("NaN").as_bytes()).unwrap()[0].value.is_nan());
        assert_eq!(parse(one("+Inf").as_bytes()).unwrap()[0].value, f64::INFINITY);
        assert_eq!(parse(one("-Inf").as_bytes()).unwrap()[0].value, f64::NEG_INFINITY);
        assert_eq!(
            parse(one("12abc").as_bytes()).unwrap_err().to_string(),
            "series 0: value \"12abc\" is not a number"
        );
        assert!(matches!(parse(one(&"9".repeat(65)).as_bytes()), Err(Error::BadValue { .. })));
        let e = parse(br#"{"status":"error","errorType":"bad_data","error":"1:5: parse error: unexpected \"}\""}"#);
        assert_eq!(e.unwrap_err().to_string(), "query refused (bad_data): 1:5: parse error: unexpected \"}\"");
        let scalar = br#"{"status":"success","data":{"resultType":"scalar","result":[1,"2"]}}"#;
        assert!(matches!(parse(scalar), Err(Error::Malformed(_))), "a scalar's result is no list of series");
        let matrix = br#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#;
        assert_eq!(parse(matrix).unwrap_err(), Error::NotVector("matrix".into()));
        let empty = br#"{"status":"success","data":{"resultType":"vector","result":[]},"warnings":["x"]}"#;
        assert_eq!(parse(empty).unwrap(), vec![]);
    }

    /// Hostile answers: every one is a one-line error, none a panic, none
    /// unbounded memory.
    #[test]
    fn hostile_answers_are_clean_errors() {
        let series = |labels: &str, value: &str| format!(r#"{{"metric":{{{labels}}},"value":{value}}}"#);
        let wrap =
            |result: &str| format!(r#"{{"status":"success","data":{{"resultType":"vector","result":[{result}]}}}}"#);
        // Too many series: counted, not kept.
        let many = vec![series("", r#"[1,"1"]"#); MAX_SERIES + 5].join(",");
        assert_eq!(parse(wrap(&many).as_bytes()).unwrap_err(), Error::TooMany { what: "series", max: MAX_SERIES });
        // Too many labels.
        let labels: Vec<String> = (0..MAX_LABELS + 1).map(|i| format!("\"l{i}\":\"v\"")).collect();
        let e = parse(wrap(&series(&labels.join(","), r#"[1,"1"]"#)).as_bytes()).unwrap_err();
        assert_eq!(e, Error::TooMany { what: "labels on a series", max: MAX_LABELS });
        // Deep nesting in an ignored field, and in the value.
        let deep = format!(r#"{{"status":"success","x":{}{}}}"#, "[".repeat(1_000_000), "]".repeat(1_000_000));
        assert!(matches!(parse(deep.as_bytes()), Err(Error::Malformed(_))));
        let deep_value = wrap(&series("", &format!("{}1{}", "[".repeat(40), "]".repeat(40))));
        assert!(matches!(parse(deep_value.as_bytes()), Err(Error::Malformed(_))));
        // Bad numbers and types.
        for v in [r#"[1e999,"1"]"#, r#"[1,"1","2"]"#, r#"["1","1"]"#, r#"[1,1]"#, r#"[1]"#, "null", r#"[-,"1"]"#] {
            let e = parse(wrap(&series("", v)).as_bytes()).unwrap_err();
            assert!(!e.to_string().contains('\n'), "{v}: {e}");
            assert!(matches!(e, Error::Malformed(_) | Error::BadTime { .. } | Error::Missing { .. }), "{v}: {e:?}");
        }
        for bad in [&b""[..], b"null", b"[]", b"{\"status\":1}", b"{\"status\":\"success\"", b"\xff\xfe"] {
            assert!(parse(bad).is_err());
        }
        // Label values that are not strings; duplicate label names are kept
        // (the first wins when read).
        assert!(parse(wrap(&series(r#""a":1"#, r#"[1,"1"]"#)).as_bytes()).is_err());
        let dup = parse(wrap(&series(r#""a":"x","a":"y""#, r#"[1,"1"]"#)).as_bytes()).unwrap();
        assert_eq!(dup[0].label("a"), Some("x"));
    }

    /// Mutated answers: never a panic, every error one line of bounded length.
    #[test]
    fn mutated_answers_never_panic() {
        use crate::testkit::{mutate, Rng};
        let err = br#"{"status":"error","errorType":"bad_data","error":"x"}"#;
        let seeds: &[&[u8]] = &[REAL.as_bytes(), err];
        let dict: &[&[u8]] =
            &[b"[", b"{", b"\"", b"\\u0000", b"\\n", b"1e999", b"NaN", b",", b":", "\u{e9}".as_bytes()];
        let mut rng = Rng(0xd1b5_4a32_d192_ed03);
        for round in 0..20_000 {
            let seed = seeds[rng.below(seeds.len())];
            let b = mutate(&mut rng, seed, dict, 200);
            match parse(&b) {
                Ok(samples) => assert!(samples.iter().all(|s| s.time.is_finite()), "round {round}"),
                Err(e) => {
                    let m = e.to_string();
                    assert!(m.len() < 1000 && !m.contains(['\n', '\r']), "round {round}: {m}");
                }
            }
        }
    }
}
