//! Shared by the crate's fixed-seed fuzz tests (HTTP heads, deploy and
//! channel documents, HTTP responses): a reproducible generator and one
//! mutator, so every fuzz run explores the same kinds of damage and a
//! failure is replayed by its seed alone.

/// xorshift64: reproducible pseudo-random numbers (a seed must not be 0).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform enough in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One to six edits of `seed`: a flipped byte, an inserted or deleted one,
/// a dictionary token spliced in, a piece duplicated, a truncation, or a run
/// of up to `max_run` copies of a token's first byte (deep nesting, long
/// lines). `dict` must not be empty.
pub fn mutate(rng: &mut Rng, seed: &[u8], dict: &[&[u8]], max_run: usize) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(6) {
        let at = rng.below(v.len() + 1);
        match rng.below(7) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next() as u8;
            }
            1 => v.insert(at, rng.next() as u8),
            2 if at < v.len() => {
                v.remove(at);
            }
            3 => {
                let d = dict[rng.below(dict.len())];
                v.splice(at..at, d.iter().copied());
            }
            4 if at < v.len() => {
                let end = (at + rng.below(64)).min(v.len());
                let piece = v[at..end].to_vec();
                v.splice(at..at, piece);
            }
            5 => v.truncate(at),
            _ => {
                let n = rng.below(max_run);
                let b = dict[rng.below(dict.len())].first().copied().unwrap_or(b'[');
                v.splice(at..at, std::iter::repeat_n(b, n));
            }
        }
    }
    v
}
