//! Which certificate authorities HTTPS trusts, for both HTTP clients (the
//! engine's rustls and ureq's).
//!
//! Default: the webpki roots (Mozilla's list, compiled in), so a device
//! without `/etc/ssl` still reaches public caches. With a CA file (Nix's
//! `ssl-cert-file`; NixOS's `/etc/ssl/certs/ca-certificates.crt` holds
//! Mozilla's list plus `security.pki.certificates`) exactly that file's
//! certificates are trusted, as Nix does: a private cache behind an
//! internal CA works, and an admin who pins a list gets only that list.
//!
//! ```text
//! file = *( anything  "-----BEGIN CERTIFICATE-----" base64 "-----END CERTIFICATE-----" )
//! ```
//! Other PEM sections (keys, CRLs) and text between sections are skipped,
//! as OpenSSL's bundle readers do. At most [`MAX_FILE`] bytes and
//! [`MAX_CERTS`] certificates; a file with none that rustls accepts is an
//! error naming the file, never a silent fallback to the defaults.

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::CertificateDer;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Mozilla's bundle is about 220 KB; 8 MiB leaves room for big private lists.
pub const MAX_FILE: u64 = 8 << 20;
/// Mozilla's list has about 150.
pub const MAX_CERTS: usize = 4096;

/// The authorities HTTPS trusts.
#[derive(Clone, Default)]
pub enum Trust {
    #[default]
    WebPki,
    /// The certificates of a CA file, already checked by rustls.
    File { path: PathBuf, roots: Arc<rustls::RootCertStore>, certs: Arc<Vec<CertificateDer<'static>>> },
}

impl fmt::Debug for Trust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Trust::WebPki => f.write_str("webpki roots"),
            Trust::File { path, certs, .. } => write!(f, "{} ({} certificates)", path.display(), certs.len()),
        }
    }
}

/// Why a CA file was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum CaFileError {
    Read(String),
    TooBig,
    TooMany,
    /// A BEGIN CERTIFICATE section whose base64 or framing is broken.
    Pem(String),
    /// No section rustls accepts as a trust anchor.
    NoCertificates,
}

impl fmt::Display for CaFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CaFileError::Read(e) => write!(f, "{e}"),
            CaFileError::TooBig => write!(f, "larger than {} bytes", MAX_FILE),
            CaFileError::TooMany => write!(f, "more than {MAX_CERTS} certificates"),
            CaFileError::Pem(e) => write!(f, "not a PEM certificate bundle: {e}"),
            CaFileError::NoCertificates => write!(f, "no usable certificate in it"),
        }
    }
}

/// Parses a PEM bundle (pure: the bytes of the file).
pub fn parse(bytes: &[u8]) -> Result<(rustls::RootCertStore, Vec<CertificateDer<'static>>), CaFileError> {
    let mut certs = Vec::new();
    for item in CertificateDer::pem_slice_iter(bytes) {
        match item {
            Ok(c) => {
                if certs.len() == MAX_CERTS {
                    return Err(CaFileError::TooMany);
                }
                certs.push(c);
            }
            Err(pem::Error::NoItemsFound) => break,
            Err(e) => return Err(CaFileError::Pem(pem_error(&e))),
        }
    }
    let mut roots = rustls::RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(certs.iter().cloned());
    if added == 0 {
        return Err(CaFileError::NoCertificates);
    }
    Ok((roots, certs))
}

/// What is wrong with a bundle, in a few words: the PEM reader's own
/// errors carry the offending line or label whole (a megabyte-long `BEGIN`
/// line would be a megabyte-long log line, in `Debug` a list of numbers).
fn pem_error(e: &pem::Error) -> String {
    match e {
        pem::Error::MissingSectionEnd { .. } => "a BEGIN section without its END line".into(),
        pem::Error::IllegalSectionStart { .. } => "a BEGIN line that does not end in five dashes".into(),
        pem::Error::Base64Decode(why) => format!("bad base64 ({})", crate::text::clip(why, 100)),
        other => crate::text::clip(&other.to_string(), 100),
    }
}

/// Reads and parses the CA file at `path`; the error names the file.
pub fn load(path: &Path) -> Result<Trust, String> {
    let fail = |e: CaFileError| format!("CA file {}: {e}", path.display());
    let f = std::fs::File::open(path).map_err(|e| fail(CaFileError::Read(e.to_string())))?;
    let mut bytes = Vec::new();
    f.take(MAX_FILE + 1).read_to_end(&mut bytes).map_err(|e| fail(CaFileError::Read(e.to_string())))?;
    if bytes.len() as u64 > MAX_FILE {
        return Err(fail(CaFileError::TooBig));
    }
    let (roots, certs) = parse(&bytes).map_err(fail)?;
    Ok(Trust::File { path: path.to_owned(), roots: Arc::new(roots), certs: Arc::new(certs) })
}

/// The engine's TLS client configuration: what ureq builds by default
/// (rustls with ring, TLS 1.2 and 1.3) over these roots.
pub fn client_config(trust: &Trust) -> Arc<rustls::ClientConfig> {
    let roots = match trust {
        Trust::WebPki => rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() },
        Trust::File { roots, .. } => (**roots).clone(),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(rustls::ALL_VERSIONS)
        .map(|b| b.with_root_certificates(roots).with_no_client_auth());
    match config {
        Ok(c) => Arc::new(c),
        // ring supports every version rustls has; this cannot happen.
        Err(e) => panic!("rustls rejected ring's protocol versions: {e}"),
    }
}

/// The same roots for ureq.
pub fn ureq_roots(trust: &Trust) -> ureq::tls::RootCerts {
    match trust {
        Trust::WebPki => ureq::tls::RootCerts::WebPki,
        Trust::File { certs, .. } => ureq::tls::RootCerts::Specific(Arc::new(
            certs.iter().map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned()).collect(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real certificate (ISRG Root X1, from Mozilla's list) in PEM.
    const ISRG_ROOT_X1: &str = include_str!("tls/isrg-root-x1.pem");

    #[test]
    fn a_bundle_with_comments_and_other_sections_parses() {
        let text = format!(
            "# a comment as in ca-certificates.crt\nISRG Root X1\n============\n{ISRG_ROOT_X1}\n-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n{ISRG_ROOT_X1}"
        );
        let (roots, certs) = parse(text.as_bytes()).unwrap();
        assert_eq!(certs.len(), 2);
        assert_eq!(roots.len(), 2);
    }

    #[test]
    fn refusals_name_what_is_wrong() {
        assert_eq!(parse(b"").unwrap_err(), CaFileError::NoCertificates);
        assert_eq!(parse(b"just text\n").unwrap_err(), CaFileError::NoCertificates);
        // Framing fine, contents not a certificate.
        let junk = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert_eq!(parse(junk.as_bytes()).unwrap_err(), CaFileError::NoCertificates);
        let broken = "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
        assert!(matches!(parse(broken.as_bytes()), Err(CaFileError::Pem(_))));
        let unterminated = "-----BEGIN CERTIFICATE-----\nAAAA\n";
        assert!(matches!(parse(unterminated.as_bytes()), Err(CaFileError::Pem(_))));
        // The reader's errors quote the broken line or label whole: not ours.
        let long = "x".repeat(100_000);
        for text in [format!("-----BEGIN {long}\n"), format!("-----BEGIN {long}\u{1b}[2J-----\nAAAA\n")] {
            let e = parse(text.as_bytes()).unwrap_err().to_string();
            assert!(
                e.len() < 200 && !e.contains(['\n', '\u{1b}']),
                "{} bytes: {}",
                e.len(),
                crate::text::clip(&e, 300)
            );
        }
        assert_eq!(
            parse(b"-----BEGIN CERTIFICATE\nAAAA\n-----END CERTIFICATE-----\n").unwrap_err().to_string(),
            "not a PEM certificate bundle: a BEGIN line that does not end in five dashes"
        );
        let many = ISRG_ROOT_X1.repeat(MAX_CERTS + 1);
        assert_eq!(parse(many.as_bytes()).unwrap_err(), CaFileError::TooMany);
    }

    #[test]
    fn load_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ca.pem");
        let e = load(&p).unwrap_err();
        assert!(e.starts_with(&format!("CA file {}: ", p.display())), "{e}");
        std::fs::write(&p, "nothing\n").unwrap();
        assert_eq!(load(&p).unwrap_err(), format!("CA file {}: no usable certificate in it", p.display()));
        std::fs::write(&p, ISRG_ROOT_X1).unwrap();
        let t = load(&p).unwrap();
        assert_eq!(format!("{t:?}"), format!("{} (1 certificates)", p.display()));
        let big = std::fs::File::create(&p).unwrap();
        big.set_len(MAX_FILE + 1).unwrap();
        assert!(load(&p).unwrap_err().ends_with(&format!("larger than {MAX_FILE} bytes")));
    }
}
