//! HTTPS caches behind a private certificate authority, end to end: a CA
//! and a server certificate for 127.0.0.1 made with `openssl`, nginx
//! serving a real Nix-published cache (fixtures.sh) over TLS on loopback.
//!
//! - `nixless install --ssl-cert-file CA` (and `NIX_SSL_CERT_FILE`, as Nix
//!   reads it) installs the closure, checked with `nix hash path`;
//! - with the built-in webpki roots, or a CA file of another authority,
//!   the handshake is refused: one line naming the cache, nothing installed;
//! - a CA file with no certificate is one line naming the file;
//! - the agent's `ssl_cert_file` reaches its other client (ureq: the
//!   polled deploy document) the same way.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// Runs openssl, panicking with its stderr on failure.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").current_dir(dir).args(args).output().unwrap();
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA (`NAME.pem`, `NAME.key`) in `dir`.
fn make_ca(dir: &Path, name: &str) -> PathBuf {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    dir.join(format!("{name}.pem"))
}

/// A server certificate for 127.0.0.1 signed by `ca` (`server.pem`, `server.key`).
fn make_server_cert(dir: &Path, ca: &str) {
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    );
}

/// nginx serving `www` over TLS with `dir/server.{pem,key}`.
fn tls_nginx(dir: &Path, www: &Path) -> (Server, u16) {
    let port = free_port();
    let server = format!(
        "    listen 127.0.0.1:{port} ssl;\n    ssl_certificate {d}/server.pem;\n    ssl_certificate_key {d}/server.key;\n    root {www};",
        d = dir.display(),
        www = www.display()
    );
    (foreground_nginx(dir, port, &server), port)
}

/// A CA, a server certificate, nginx over the zstd fixture cache.
struct Setup {
    dir: tempfile::TempDir,
    ca: PathBuf,
    _nginx: Server,
    url: String,
}

fn setup() -> Setup {
    let dir = tempfile::Builder::new().prefix("nixless-tls-").tempdir().unwrap();
    let ca = make_ca(dir.path(), "nixless-test-ca");
    make_server_cert(dir.path(), "nixless-test-ca");
    let (nginx, port) = tls_nginx(dir.path(), &fixtures().path("CACHE_ZSTD"));
    Setup { dir, ca, _nginx: nginx, url: format!("https://127.0.0.1:{port}") }
}

fn install(root: &Path, cache: &str, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let f = fixtures();
    let mut args = vec!["install".to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(install_args(root, &[cache.to_owned()], f.get("PK_A"), &[f.get("TOP")], 0));
    Command::new(bin()).args(&args).env_remove("NIX_SSL_CERT_FILE").envs(env.iter().copied()).output().unwrap()
}

fn root() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("nixless-root-").tempdir().unwrap()
}

fn assert_installed(out: &Output, root: &Path) {
    assert!(out.status.success(), "{}", stderr(out));
    let present = assert_store_sound(root, &fixtures().path("CACHE_ZSTD"));
    assert_eq!(present.len(), fixtures().closure().len());
}

/// One error line containing every needle; nothing installed.
fn assert_refused(out: &Output, root: &Path, needles: &[&str]) {
    let err = stderr(out);
    assert!(!out.status.success(), "expected failure: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(lines.len(), 1, "want one error line, got: {err}");
    for n in needles {
        assert!(lines[0].contains(n), "{n:?} not in: {err}");
    }
    let store = root.join("nix/store");
    assert!(!store.exists() || std::fs::read_dir(&store).unwrap().next().is_none(), "something was installed");
}

#[test]
fn install_over_https_trusts_exactly_the_ca_file() {
    let s = setup();
    let ca = s.ca.to_str().unwrap();

    let r = root();
    assert_installed(&install(r.path(), &s.url, &["--ssl-cert-file", ca], &[]), r.path());

    // Nix's variable, for a CI job that already sets it.
    let r = root();
    assert_installed(&install(r.path(), &s.url, &[], &[("NIX_SSL_CERT_FILE", ca)]), r.path());

    // The built-in roots do not know a private CA.
    let r = root();
    assert_refused(&install(r.path(), &s.url, &[], &[]), r.path(), &[&s.url, "UnknownIssuer"]);

    // Another authority's file replaces the roots, it does not add to them.
    let other = make_ca(s.dir.path(), "another-ca");
    let r = root();
    let out = install(r.path(), &s.url, &["--ssl-cert-file", other.to_str().unwrap()], &[]);
    assert_refused(&out, r.path(), &[&s.url, "UnknownIssuer"]);

    // A file without a certificate: said before any request.
    let junk = s.dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    let r = root();
    let out = install(r.path(), &s.url, &["--ssl-cert-file", junk.to_str().unwrap()], &[]);
    assert_refused(&out, r.path(), &[&format!("CA file {}: no usable certificate in it", junk.display())]);
}

#[derive(serde::Deserialize)]
struct Poll {
    error: Option<String>,
}

#[derive(serde::Deserialize)]
struct Status {
    poll: Poll,
}

/// `GET /v1/status` of an agent on `port`, the body.
fn status(port: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(b"GET /v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    Some(buf.split_once("\r\n\r\n")?.1.to_owned())
}

/// An agent polling `poll_url` (a document the server does not have), with
/// `extra` config keys; returns the poll error it reports.
fn agent_poll_error(dir: &Path, poll_url: &str, extra: &str) -> String {
    let port = free_port();
    let root = dir.join(format!("agent-{port}"));
    std::fs::create_dir_all(&root).unwrap();
    let cfg = root.join("config.json");
    let key = "admin-1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    std::fs::write(
        &cfg,
        format!(
            r#"{{"host":"kiosk-7","listen":["127.0.0.1:{port}"],"caches":["file:///nonexistent"],"cache_keys":["{}"],"deploy_keys":["{key}"],"root":"{}","poll_url":"{poll_url}","poll_interval_secs":1,"retries":0{extra}}}"#,
            fixtures().get("PK_A"),
            root.display()
        ),
    )
    .unwrap();
    let mut child = Server(
        Command::new(bin())
            .args(["agent", "--no-seccomp", "--config"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let err = wait_until("the agent's first poll", Duration::from_secs(60), || {
        let body = status(port)?;
        let mut scratch = vec![0u8; body.len()];
        let (st, _) = serde_json_core::from_slice_escaped::<Status>(body.as_bytes(), &mut scratch).ok()?;
        st.poll.error
    });
    let _ = child.0.kill();
    err
}

#[test]
fn the_agent_polls_over_https_with_its_ssl_cert_file() {
    let s = setup();
    let url = format!("{}/kiosk-7.json", s.url);
    // Trusted: the handshake passes and the server's 404 is what fails.
    let e = agent_poll_error(s.dir.path(), &url, &format!(r#","ssl_cert_file":"{}""#, s.ca.display()));
    assert_eq!(e, format!("{url}: not found"));
    // Without it: the certificate is what fails.
    let e = agent_poll_error(s.dir.path(), &url, "");
    assert!(e.contains(&url) && e.contains("invalid peer certificate: UnknownIssuer"), "{e}");
}

#[test]
fn an_agent_with_a_bad_ssl_cert_file_stops_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "nothing here\n").unwrap();
    let cfg = dir.path().join("config.json");
    for (value, needle) in [
        (junk.display().to_string(), format!("CA file {}: no usable certificate in it", junk.display())),
        ("relative.pem".to_owned(), "ssl_cert_file \"relative.pem\": not an absolute path".to_owned()),
    ] {
        std::fs::write(
            &cfg,
            format!(
                r#"{{"host":"kiosk-7","listen":["127.0.0.1:{}"],"caches":["file:///nonexistent"],"cache_keys":["{}"],"deploy_keys":["admin-1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="],"root":"{}","ssl_cert_file":"{value}"}}"#,
                free_port(),
                fixtures().get("PK_A"),
                dir.path().display()
            ),
        )
        .unwrap();
        let out = Command::new(bin()).args(["agent", "--no-seccomp", "--config"]).arg(&cfg).output().unwrap();
        assert!(!out.status.success());
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(&needle), "{needle:?} not in {err}");
    }
}
