//! Bounded readers for the JSON lists and objects of signed documents.
//!
//! serde's `Vec<T>` keeps every element a document lists: 16 MiB of
//! `{"percent":1},` is a million waves in RAM before any check can say "at
//! most 16". [`Capped`] keeps the first `N + 1` (enough to say "too many")
//! and only counts the rest. [`Entries`] reads an object with keys chosen by
//! the document (group tags) the same way; serde-json-core cannot read
//! `String` map keys at all (its key deserializer reaches `unreachable!()`
//! for them), so keys go through `deserialize_str`, which it supports.

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use std::marker::PhantomData;

/// A JSON array: the first `N + 1` elements, and how many there were.
#[derive(Debug)]
pub struct Capped<T, const N: usize> {
    pub items: Vec<T>,
    pub total: usize,
}

impl<T, const N: usize> Default for Capped<T, N> {
    fn default() -> Self {
        Capped { items: Vec::new(), total: 0 }
    }
}

impl<'de, T: Deserialize<'de>, const N: usize> Deserialize<'de> for Capped<T, N> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T, const N: usize>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>, const N: usize> Visitor<'de> for V<T, N> {
            type Value = Capped<T, N>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an array")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = Capped { items: Vec::new(), total: 0 };
                loop {
                    if out.items.len() <= N {
                        match seq.next_element::<T>()? {
                            Some(t) => out.items.push(t),
                            None => break,
                        }
                    } else if seq.next_element::<IgnoredAny>()?.is_none() {
                        break;
                    }
                    out.total += 1;
                }
                Ok(out)
            }
        }
        d.deserialize_seq(V::<T, N>(PhantomData))
    }
}

/// A JSON object with free keys, in document order: the first `N + 1`
/// entries, and how many there were. Duplicate keys are kept (the caller
/// refuses them by name).
#[derive(Debug)]
pub struct Entries<T, const N: usize> {
    pub items: Vec<(String, T)>,
    pub total: usize,
}

struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = String;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = String;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string key")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<String, E> {
                Ok(s.to_owned())
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de, T: Deserialize<'de>, const N: usize> Deserialize<'de> for Entries<T, N> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T, const N: usize>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>, const N: usize> Visitor<'de> for V<T, N> {
            type Value = Entries<T, N>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Entries { items: Vec::new(), total: 0 };
                while let Some(k) = map.next_key_seed(Key)? {
                    if out.items.len() <= N {
                        let v = map.next_value::<T>()?;
                        out.items.push((k, v));
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                    out.total += 1;
                }
                Ok(out)
            }
        }
        d.deserialize_map(V::<T, N>(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json::from_slice_bounded;

    #[test]
    fn capped_keeps_n_plus_one_and_counts_all() {
        let long = format!("[{}1]", "1,".repeat(99_999));
        let c: Capped<u64, 3> = from_slice_bounded(long.as_bytes()).unwrap();
        assert_eq!((c.items.len(), c.total), (4, 100_000));
        let c: Capped<u64, 3> = from_slice_bounded(b"[]").unwrap();
        assert_eq!((c.items.len(), c.total), (0, 0));
        // Skipped elements are still parsed: junk after the cap is an error.
        assert!(from_slice_bounded::<Capped<u64, 1>>(b"[1,2,3,{]").is_err());
    }

    #[test]
    fn entries_read_escaped_and_unicode_keys_in_order() {
        let e: Entries<u64, 8> = from_slice_bounded(r#"{"b":1,"a\u00e9\n":2,"€":3,"b":4}"#.as_bytes()).unwrap();
        let keys: Vec<&str> = e.items.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["b", "aé\n", "€", "b"]);
        assert_eq!(e.total, 4);
        let many = format!("{{{}\"z\":0}}", (0..500).map(|i| format!("\"k{i}\":{{\"x\":[1]}},")).collect::<String>());
        let e: Entries<IgnoredAny, 2> = from_slice_bounded(many.as_bytes()).unwrap();
        assert_eq!((e.items.len(), e.total), (3, 501));
        for bad in [&b"{1:2}"[..], b"{\"a\":1,}", b"{\"a\" 1}", b"[1]"] {
            assert!(from_slice_bounded::<Entries<u64, 8>>(bad).is_err());
        }
    }
}

#[cfg(test)]
mod upstream {
    use std::collections::BTreeMap;

    /// Why [`super::Entries`] reads keys itself: serde-json-core 0.7's map
    /// key deserializer has `unreachable!()` for `String` keys, so a plain
    /// `BTreeMap<String, _>` field would panic on any object — and a panic
    /// in the agent (panic = "abort") is a crash loop. If this starts to
    /// pass, upstream has fixed it and `Entries` could become a map.
    #[test]
    fn serde_json_core_panics_on_string_map_keys() {
        let r = std::panic::catch_unwind(|| crate::json::from_slice_bounded::<BTreeMap<String, u64>>(b"{\"a\":1}"));
        assert!(r.is_err());
    }
}
