//! Test servers' shared piece: reading one request head off a connection.

use std::io::BufRead;

/// Reads one request head (line and headers, no body) and returns the
/// request target; `None` once the client has closed.
pub(crate) fn read_request_target(reader: &mut impl BufRead) -> Option<String> {
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return None;
    }
    let target = line.split(' ').nth(1).unwrap_or("/").to_owned();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            return Some(target);
        }
    }
}
