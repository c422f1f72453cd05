//! Private caches end to end: a real Nix-published cache (fixtures.sh:
//! `nix copy --to file://…?compression=zstd&secret-key=…`) served
//!
//! - by moto's S3 server with authentication on (every request's SigV4
//!   signature recomputed with the user's secret and compared), uploaded
//!   with boto3 (tests/support/s3_publish.py), read as `s3://bucket?endpoint=…`;
//! - by nginx behind `auth_basic` (an htpasswd made with `openssl passwd`),
//!   read with a netrc file;
//! - by nginx requiring `Authorization: Bearer <token>`, read with a token file.
//!
//! Installed paths are checked with `nix hash path`; wrong credentials give
//! one error line naming the cache and the refusal, never the secret, and
//! install nothing.

mod common;

use common::*;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn root() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("nixless-root-").tempdir().unwrap()
}

/// `nixless install` with extra flags, in an environment without AWS
/// variables and with an empty HOME (no ~/.aws of the machine's).
fn install(root: &Path, cache: &str, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let f = fixtures();
    let home = tempfile::tempdir().unwrap();
    let mut args = vec!["install".to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(install_args(root, &[cache.to_owned()], f.get("PK_A"), &[f.get("TOP")], 0));
    let mut cmd = Command::new(bin());
    cmd.args(&args).env("HOME", home.path()).env_remove("NIXLESS_LOG");
    for k in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_SHARED_CREDENTIALS_FILE",
    ] {
        cmd.env_remove(k);
    }
    cmd.envs(env.iter().copied());
    cmd.output().unwrap()
}

fn assert_installed(out: &Output, root: &Path) {
    assert!(out.status.success(), "{}", stderr(out));
    let present = assert_store_sound(root, &fixtures().path("CACHE_ZSTD"));
    assert_eq!(present.len(), fixtures().closure().len());
}

/// One error line containing `needle` and none of `secrets`; nothing installed.
fn assert_refused(out: &Output, root: &Path, needle: &str, secrets: &[&str]) {
    let err = stderr(out);
    assert!(!out.status.success(), "expected failure: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.starts_with("nixless: warning:")).collect();
    assert_eq!(lines.len(), 1, "want one error line, got: {err}");
    assert!(lines[0].starts_with("nixless: error: ") && lines[0].contains(needle), "{err}");
    for s in secrets {
        assert!(!err.contains(s), "the secret {s:?} appears in: {err}");
    }
    assert!(!root.join("nix/store").exists() || std::fs::read_dir(root.join("nix/store")).unwrap().next().is_none());
}

/// A child process killed (by its own pid) when dropped. nginx runs
/// without a master process for this: a SIGKILLed master leaves its
/// workers running (holding the test's ports and every fd it inherited).
fn wait_for_port(port: u16, what: &str) {
    wait_until(what, Duration::from_secs(60), || std::net::TcpStream::connect(("127.0.0.1", port)).ok());
}

fn moto_available() -> bool {
    Command::new("python3")
        .args(["-c", "import moto.server, boto3"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn s3_cache_with_sigv4_against_moto() {
    if !moto_available() {
        eprintln!("SKIPPED: python3 with moto[server] and boto3 is not installed (tests/run.sh installs them)");
        return;
    }
    let f = fixtures();
    let port = free_port();
    let log = tempfile::NamedTempFile::new().unwrap();
    let _moto = Server(
        Command::new("python3")
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .env_remove("INITIAL_NO_AUTH_ACTION_COUNT")
            .stdout(log.reopen().unwrap())
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap(),
    );
    wait_for_port(port, "moto's S3 server");
    let endpoint = format!("http://127.0.0.1:{port}");
    let out = Command::new("python3")
        .arg(repo().join("tests/support/s3_publish.py"))
        .args([&endpoint, "nix-cache"])
        .arg(f.path("CACHE_ZSTD"))
        .output()
        .unwrap();
    assert!(out.status.success(), "s3_publish.py: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let (key_id, secret) = stdout.trim().split_once(' ').unwrap();
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("credentials");
    std::fs::write(
        &good,
        format!("[default]\naws_access_key_id = WRONG\naws_secret_access_key = WRONG\n\n[cache]\naws_access_key_id = {key_id}\naws_secret_access_key = {secret}\n"),
    )
    .unwrap();
    let cache = format!("s3://nix-cache?endpoint={endpoint}&region=us-east-1&profile=cache");

    // The profile named in the URL, from the credentials file.
    let r = root();
    let out = install(r.path(), &cache, &["--aws-credentials-file", good.to_str().unwrap()], &[]);
    assert_installed(&out, r.path());

    // The environment, as systemd's Environment= or a CI job sets it.
    let r = root();
    let bare = format!("s3://nix-cache?endpoint={endpoint}");
    let out = install(r.path(), &bare, &[], &[("AWS_ACCESS_KEY_ID", key_id), ("AWS_SECRET_ACCESS_KEY", secret)]);
    assert_installed(&out, r.path());

    // A wrong secret: moto answers 403 SignatureDoesNotMatch.
    let wrong_secret = "WrongSecretKey0123456789abcdefghijklmnopq";
    let bad = dir.path().join("bad");
    std::fs::write(&bad, format!("[cache]\naws_access_key_id = {key_id}\naws_secret_access_key = {wrong_secret}\n"))
        .unwrap();
    let r = root();
    let out = install(r.path(), &cache, &["--aws-credentials-file", bad.to_str().unwrap()], &[]);
    assert_refused(
        &out,
        r.path(),
        &format!("cache {cache}: 403 Forbidden (SignatureDoesNotMatch)"),
        &[wrong_secret, secret],
    );

    // No credentials at all: said before any request.
    let r = root();
    let out = install(r.path(), &bare, &[], &[]);
    assert_refused(&out, r.path(), "no AWS credentials", &[]);
}

/// nginx with a basic-auth location and a bearer-token location over the
/// same cache; run in the foreground as our child.
struct AuthNginx {
    _server: Server,
    port: u16,
    _dir: tempfile::TempDir,
}

fn auth_nginx(cache: &Path, user: &str, password: &str, token: &str) -> AuthNginx {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("www")).unwrap();
    for name in ["basic", "bearer"] {
        std::os::unix::fs::symlink(cache, d.join("www").join(name)).unwrap();
    }
    let hash = Command::new("openssl").args(["passwd", "-apr1", password]).output().unwrap();
    assert!(hash.status.success());
    std::fs::write(d.join("htpasswd"), format!("{user}:{}", String::from_utf8(hash.stdout).unwrap())).unwrap();
    let port = free_port();
    let server = format!(
        r#"    listen 127.0.0.1:{port};
    root {d}/www;
    location /basic/ {{
      auth_basic "cache";
      auth_basic_user_file {d}/htpasswd;
    }}
    location /bearer/ {{
      if ($http_authorization != "Bearer {token}") {{ return 401; }}
    }}"#,
        d = d.display()
    );
    let server = foreground_nginx(d, port, &server);
    AuthNginx { _server: server, port, _dir: dir }
}

#[test]
fn netrc_and_bearer_token_against_nginx() {
    let f = fixtures();
    let (password, token) = ("pa55-Word-basic", "tok-3f9a1c-bearer");
    let ng = auth_nginx(&f.path("CACHE_ZSTD"), "alice", password, token);
    let dir = tempfile::tempdir().unwrap();
    let netrc = dir.path().join("netrc");
    let basic = format!("http://127.0.0.1:{}/basic", ng.port);
    let bearer = format!("http://127.0.0.1:{}/bearer", ng.port);

    // netrc: curl's grammar, free-form across lines, host without port.
    std::fs::write(
        &netrc,
        format!("machine other.example login x password y\nmachine 127.0.0.1\n  login alice\n  password {password}\n"),
    )
    .unwrap();
    let r = root();
    let out = install(r.path(), &basic, &["--netrc-file", netrc.to_str().unwrap()], &[]);
    assert_installed(&out, r.path());

    let r = root();
    let out = install(r.path(), &basic, &[], &[]);
    assert_refused(&out, r.path(), &format!("cache {basic}: 401 Unauthorized"), &[]);

    std::fs::write(&netrc, "machine 127.0.0.1 login alice password not-the-password\n").unwrap();
    let r = root();
    let out = install(r.path(), &basic, &["--netrc-file", netrc.to_str().unwrap()], &[]);
    assert_refused(&out, r.path(), &format!("cache {basic}: 401 Unauthorized"), &["not-the-password", password]);

    // Bearer token from a file, for URLs under its prefix.
    let tok = dir.path().join("token");
    std::fs::write(&tok, format!("{token}\n")).unwrap();
    let r = root();
    let arg = format!("{bearer}={}", tok.display());
    let out = install(r.path(), &bearer, &["--bearer-token-file", &arg], &[]);
    assert_installed(&out, r.path());

    std::fs::write(&tok, "tok-wrong-value\n").unwrap();
    let r = root();
    let out = install(r.path(), &bearer, &["--bearer-token-file", &arg], &[]);
    assert_refused(&out, r.path(), &format!("cache {bearer}: 401 Unauthorized"), &["tok-wrong-value", token]);
}

// ---------------------------------------------------------------------------
// The agent: credentials from its config, through $CREDENTIALS_DIRECTORY.

/// One HTTP exchange with the agent: (status, body).
fn http(port: u16, req: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(req).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

fn agent_get(port: u16, path: &str) -> String {
    let (code, body) = http(port, format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes());
    assert_eq!(code, 200, "{body}");
    body
}

fn deploy(port: u16, key: &nixless::nix::SecretKey, seq: u64, system: &str) {
    use nixless::deploy::{render, sign};
    let body = render("kiosk-7", Some(system), seq, nixless::deploy::Action::Switch, &[], &[]).unwrap();
    let sig = sign(key, body.as_bytes());
    let req = format!(
        "POST /v1/deploy HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nNixless-Signature: {sig}\r\n\r\n{body}",
        body.len()
    );
    let (code, answer) = http(port, req.as_bytes());
    assert_eq!(code, 202, "{answer}");
}

fn spawn_agent(config: &Path, creds_dir: &Path, log: &Path) -> Server {
    let logf = std::fs::File::create(log).unwrap();
    Server(
        Command::new(bin())
            .args(["agent", "--config"])
            .arg(config)
            .env("CREDENTIALS_DIRECTORY", creds_dir)
            .env_remove("NIXLESS_LOG")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .unwrap(),
    )
}

/// Every file under `dir`, read whole (state, events, records).
fn all_text(dir: &Path) -> String {
    let mut out = String::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.push_str(&all_text(&p));
            } else if let Ok(b) = std::fs::read(&p) {
                out.push_str(&String::from_utf8_lossy(&b));
            }
        }
    }
    out
}

/// A wrong token: the deploy fails naming the cache and the 401; neither
/// status, metrics, the agent's log nor its state files carry the token.
/// The right one (a new agent, as after a credential rotation): installed.
#[test]
fn agent_reads_credentials_from_its_config_and_never_shows_them() {
    let f = fixtures();
    let token = "tok-9d41-right-bearer";
    let ng = auth_nginx(&f.path("CACHE_ZSTD"), "alice", "unused-pw", token);
    let cache = format!("http://127.0.0.1:{}/bearer", ng.port);
    let tmp = tempfile::Builder::new().prefix("nixless-agent-").tempdir().unwrap();
    let (root, creds) = (tmp.path().join("root"), tmp.path().join("creds"));
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(&creds).unwrap();
    let key = nixless::nix::SecretKey::generate("admin-1").unwrap();
    let port = free_port();
    let config = tmp.path().join("config.json");
    std::fs::write(
        &config,
        format!(
            r#"{{"host":"kiosk-7","listen":["127.0.0.1:{port}"],"caches":["{cache}"],"cache_keys":["{}"],"deploy_keys":["{}"],"root":"{}","retries":0,"bearer_token_files":[{{"url":"{cache}","file":"cache-token"}}]}}"#,
            f.get("PK_A"),
            key.public(),
            root.display()
        ),
    )
    .unwrap();
    let wrong = "tok-wrong-SECRET-0042";
    std::fs::write(creds.join("cache-token"), format!("{wrong}\n")).unwrap();
    let log = tmp.path().join("agent.log");
    {
        let _agent = spawn_agent(&config, &creds, &log);
        wait_for_port(port, "the agent");
        deploy(port, &key, 1, f.get("TOP"));
        let status = wait_until("the deploy to fail", Duration::from_secs(60), || {
            let s = agent_get(port, "/v1/status");
            s.contains("\"outcome\":\"failed\"").then_some(s)
        });
        assert!(status.contains(&format!("cache {cache}: 401 Unauthorized")), "{status}");
        let metrics = agent_get(port, "/metrics");
        let files = all_text(&root.join("var/lib/nixless"));
        let logged = std::fs::read_to_string(&log).unwrap();
        for (what, text) in [("status", &status), ("metrics", &metrics), ("state files", &files), ("log", &logged)] {
            assert!(!text.contains(wrong) && !text.contains(token), "the token appears in the {what}: {text}");
        }
    }
    std::fs::write(creds.join("cache-token"), format!("{token}\n")).unwrap();
    let _agent = spawn_agent(&config, &creds, &log);
    wait_for_port(port, "the agent");
    deploy(port, &key, 2, f.get("TOP"));
    // No switch helper runs here: the agent waits in "switching" once the
    // closure is installed.
    wait_until("the closure to be installed", Duration::from_secs(60), || {
        agent_get(port, "/v1/status").contains("\"phase\":\"switching\"").then_some(())
    });
    assert_eq!(assert_store_sound(&root, &f.path("CACHE_ZSTD")).len(), f.closure().len());
}
