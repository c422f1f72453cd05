//! Where a signed document goes, and reading the current one back.
//!
//! ```text
//! dest = "s3://" bucket "/" key [ "?" params ]    ; PUT, AWS SigV4 (crate::auth::s3)
//!      | "http://" … | "https://" …               ; PUT, netrc/bearer as for caches
//!      | [ "file://" ] path                         ; a local file
//! signature = dest with ".sig" appended to the path (before any "?")
//! ```
//! The signature goes first, then the document: a poller that sees the
//! new document finds its signature already there (a poller between the
//! two reads the old document with the new signature, refuses it once and
//! reads both anew at its next poll). A file is written to a temporary
//! name in the same directory and renamed over, so a reader sees the old
//! bytes or the new, never a part.

use crate::fetch::Fetcher;
use std::path::{Path, PathBuf};

/// The signature's location for a document at `dest`.
pub fn sig_of(dest: &str) -> String {
    if is_url(dest) {
        if let Some((path, query)) = dest.split_once('?') {
            return format!("{path}.sig?{query}");
        }
    }
    format!("{dest}.sig")
}

fn is_url(s: &str) -> bool {
    ["s3://", "http://", "https://"].iter().any(|p| s.starts_with(p))
}

/// Replaces `path` whole and durably (a reader sees the old bytes or the
/// new). The temporary file is created exclusively and never through a
/// link, so a link planted at its predictable name in a shared directory
/// cannot redirect the write to another file.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), String> {
    crate::store::fsutil::write_atomic_path(path, bytes, true).map_err(|e| format!("{}: {e}", path.display()))
}

fn put(f: &mut Fetcher, url: &str, content_type: &str, body: &[u8]) -> Result<(), String> {
    match f.put_url(url, content_type, body) {
        Ok((200..=299, _)) => Ok(()),
        Ok((status, answer)) => {
            let answer = answer.trim();
            let shown = crate::text::clip(url.split('?').next().unwrap_or(url), 256);
            Err(format!("PUT {shown}: HTTP {status}{}{answer}", if answer.is_empty() { "" } else { ": " }))
        }
        Err(e) => Err(format!("PUT {}", e.to_string().trim_start_matches("GET "))),
    }
}

/// Publishes `doc` and its signature line `sig` at `dest`.
pub fn publish(f: &mut Fetcher, dest: &str, doc: &[u8], sig: &str) -> Result<(), String> {
    let dest = dest.strip_prefix("file://").unwrap_or(dest);
    let sig_line = format!("{sig}\n");
    if is_url(dest) {
        put(f, &sig_of(dest), "text/plain", sig_line.as_bytes())?;
        return put(f, dest, "application/json", doc);
    }
    write_atomic(&PathBuf::from(sig_of(dest)), sig_line.as_bytes())?;
    write_atomic(Path::new(dest), doc)
}

/// `nixless sign --publish DEST`: publishes a freshly signed document with
/// the admin side's fetcher (credentials from the environment and the AWS
/// files; each request bounded to [`PUBLISH_DEADLINE`]).
pub fn publish_signed(dest: &str, doc: &[u8], sig: &str) -> Result<(), String> {
    let mut f = super::fetcher(PUBLISH_DEADLINE)?;
    publish(&mut f, dest, doc, sig)?;
    eprintln!(
        "nixless: published {} and its signature",
        crate::text::clip(dest.split('?').next().unwrap_or(dest), 256)
    );
    Ok(())
}

/// Longest one PUT of `sign --publish` may take (a channel document is at
/// most 16 MiB; a slow uplink from CI still makes it).
pub const PUBLISH_DEADLINE: std::time::Duration = std::time::Duration::from_secs(120);

/// Reads a document and its signature from a path or URL (as [`publish`]
/// names them), each at most `limit` bytes. A missing signature is `None`
/// (the verifier says so).
pub fn read(f: &mut Fetcher, src: &str, limit: u64) -> Result<(Vec<u8>, Option<Vec<u8>>), String> {
    let src = src.strip_prefix("file://").unwrap_or(src);
    if is_url(src) {
        let shown = crate::text::clip(src.split('?').next().unwrap_or(src), 256);
        let doc = f.get_url(src, limit).map_err(|e| e.to_string())?.ok_or_else(|| format!("{shown}: not found"))?;
        let sig = f.get_url(&sig_of(src), 4096).map_err(|e| e.to_string())?;
        return Ok((doc, sig));
    }
    let read = |p: &str, limit: u64| -> Result<Option<Vec<u8>>, String> {
        use std::io::Read;
        let file = match std::fs::File::open(p) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{p}: {e}")),
        };
        let mut buf = Vec::new();
        file.take(limit + 1).read_to_end(&mut buf).map_err(|e| format!("{p}: {e}"))?;
        if buf.len() as u64 > limit {
            return Err(format!("{p}: larger than {limit} bytes"));
        }
        Ok(Some(buf))
    };
    let doc = read(src, limit)?.ok_or_else(|| format!("{src}: not found"))?;
    Ok((doc, read(&sig_of(src), 4096)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_sit_next_to_their_document() {
        assert_eq!(
            sig_of("s3://b/ch/stable.json?endpoint=http://x:9&region=r"),
            "s3://b/ch/stable.json.sig?endpoint=http://x:9&region=r"
        );
        assert_eq!(sig_of("https://c/stable.json"), "https://c/stable.json.sig");
        assert_eq!(sig_of("/srv/ch/stable.json"), "/srv/ch/stable.json.sig");
        assert_eq!(sig_of("odd?name.json"), "odd?name.json.sig", "a file path keeps its question mark");
    }

    #[test]
    fn files_are_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("stable.json");
        std::fs::write(&dest, "old").unwrap();
        let mut f = crate::fleet::fetcher(std::time::Duration::from_secs(5)).unwrap();
        publish(&mut f, dest.to_str().unwrap(), b"{new}", "k:sig").unwrap();
        let (doc, sig) = read(&mut f, &format!("file://{}", dest.display()), 1 << 20).unwrap();
        assert_eq!((doc.as_slice(), sig.as_deref()), (&b"{new}"[..], Some(&b"k:sig\n"[..])));
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "no temporary left: {names:?}");
        let e = publish(&mut f, dir.path().join("no/such/dir/x").to_str().unwrap(), b"x", "s").unwrap_err();
        assert!(e.contains("no/such/dir") && e.contains("No such file"), "{e}");
        assert!(read(&mut f, dir.path().join("missing").to_str().unwrap(), 10).unwrap_err().ends_with("not found"));
    }

    /// The temporary names are predictable; a link planted at one (in a
    /// directory others can write) must not make the publisher write
    /// through it.
    #[test]
    fn a_link_at_the_temporary_name_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        for tmp in [".stable.json.tmp", ".stable.json.sig.tmp"] {
            std::os::unix::fs::symlink(&victim, dir.path().join(tmp)).unwrap();
        }
        let mut f = crate::fleet::fetcher(std::time::Duration::from_secs(5)).unwrap();
        let dest = dir.path().join("stable.json");
        publish(&mut f, dest.to_str().unwrap(), b"{new}", "k:sig").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), "{new}");
        assert_eq!(std::fs::read_to_string(dir.path().join("stable.json.sig")).unwrap(), "k:sig\n");
        assert!(std::fs::symlink_metadata(dir.path().join(".stable.json.tmp")).is_err(), "the planted link is gone");
        assert!(read(&mut f, dest.to_str().unwrap(), 2).unwrap_err().ends_with("larger than 2 bytes"));
    }
}
