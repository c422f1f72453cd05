//! Wall-clock time as the agent stores it: whole seconds since the Unix
//! epoch. Its own module so that everything below the agent (the console
//! commands, `admin`'s signed sequence numbers) reads the same clock
//! without importing the agent.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the epoch; 0 if the clock is set before 1970 (a device
/// without an RTC after a power cut), which every caller treats as "long ago".
pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
