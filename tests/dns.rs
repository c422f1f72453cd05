//! Names looked up by nixless's own resolver (`src/net/resolve.rs`), not
//! libc's, against a real nameserver: Debian's dnsmasq on port 53 of a
//! network namespace of our own, whose `/etc/resolv.conf` and `/etc/hosts`
//! are bind-mounted from the test's directory (a private mount namespace,
//! so the machine's own files are untouched), with nginx serving the
//! Nix-built cache in the same namespace. The static binary reads the same
//! two files musl's `getaddrinfo` would.

mod common;

use common::*;
use std::fs;
use std::process::Command;

const SCRIPT: &str = r#"
set -eu
ip link set lo up
mount --bind "$D/resolv.conf" /etc/resolv.conf
mount --bind "$D/hosts" /etc/hosts
dnsmasq --port=53 --listen-address=127.0.0.1 --bind-interfaces --no-resolv --no-hosts \
  --local=/nixless.test/ --cname=cache.nixless.test,origin.nixless.test \
  --host-record=origin.nixless.test,127.0.0.1 --user=root --pid-file="$D/dnsmasq.pid" \
  --log-queries --log-facility="$D/dnsmasq.log"
nginx -p "$D" -e "$D/error.log" -c "$D/nginx.conf"
trap 'kill $(cat "$D/dnsmasq.pid") $(cat "$D/nginx.pid") 2>/dev/null || true' EXIT
for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/8080) 2>/dev/null && break; sleep 0.05; done
set +e
"$BIN" install --root "$D/root" --cache http://cache.nixless.test:8080 --trusted-key "$PK" "$TOP" 2>"$D/ok.err"
echo "ok=$?"
"$BIN" install --root "$D/root2" --cache http://nowhere.nixless.test:8080 --trusted-key "$PK" "$TOP" 2>"$D/nowhere.err"
echo "nowhere=$?"
"#;

#[test]
fn install_finds_its_cache_through_a_real_nameserver() {
    let f = fixtures();
    for tool in ["unshare", "dnsmasq", "ip"] {
        let found = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().unwrap();
        assert!(found.status.success(), "{tool} is missing (tests/run.sh installs dnsmasq-base and iproute2)");
    }
    let dir = tempfile::Builder::new().prefix("nixless-dns-").tempdir().unwrap();
    let d = dir.path();
    fs::write(d.join("resolv.conf"), "nameserver 127.0.0.1\noptions timeout:5 attempts:2\n").unwrap();
    fs::write(d.join("hosts"), "127.0.0.1 localhost\n").unwrap();
    let user = if is_root() { "user root root;" } else { "" };
    fs::write(
        d.join("nginx.conf"),
        format!(
            "{user}\npid {d}/nginx.pid;\nevents {{ worker_connections 64; }}\nhttp {{\n  access_log {d}/access.log;\n\
             client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n\
             uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             server {{\n    listen 127.0.0.1:8080;\n    root {};\n  }}\n}}\n",
            f.path("CACHE_ZSTD").display(),
            d = d.display()
        ),
    )
    .unwrap();
    let out = Command::new("unshare")
        .args(["--net", "--mount", "--propagation", "private", "bash", "-c", SCRIPT])
        .env("D", d)
        .env("BIN", bin())
        .env("PK", f.get("PK_A"))
        .env("TOP", f.get("TOP"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let log = |name: &str| fs::read_to_string(d.join(name)).unwrap_or_default();
    let report = format!(
        "{stdout}\n--- stderr ---\n{}\n--- ok.err ---\n{}\n--- dnsmasq.log ---\n{}",
        stderr(&out),
        log("ok.err"),
        log("dnsmasq.log")
    );
    assert!(out.status.success() && stdout.contains("ok=0"), "{report}");
    assert_store_sound(&d.join("root"), &f.path("CACHE_ZSTD"));
    // It asked the nameserver (the hosts file does not know the name) and
    // followed its CNAME.
    let queries = log("dnsmasq.log");
    assert!(queries.contains("query[A] cache.nixless.test from 127.0.0.1"), "{report}");
    assert!(queries.contains("cache.nixless.test is <CNAME>"), "{report}");

    // A name the nameserver says does not exist: retried as any cache
    // error is, then one error line naming it; nothing written.
    assert!(stdout.contains("nowhere=1"), "{report}");
    let err = log("nowhere.err");
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("nixless: error: ") && last.contains("name lookup failed: nowhere.nixless.test: no such host"),
        "{err}"
    );
    assert!(!d.join("root2/nix/store").exists() || fs::read_dir(d.join("root2/nix/store")).unwrap().next().is_none());
}

/// The agent polls a URL whose name lookup hangs: its nameserver is a
/// UDP socket of this test's that reads the queries and never answers
/// (the agent runs in a mount namespace of its own whose
/// `/etc/resolv.conf` names it). While the lookup waits, status answers,
/// three times; then the poll fails with one line naming the lookup.
/// Before issue 11 the poll went through ureq, whose lookup is libc's
/// blocking `getaddrinfo`: the loop stood still for the resolver's whole
/// timeout and status went unanswered.
const HANGING_LOOKUP: &str = r#"
set -eu
mount --bind "$D/resolv.conf" /etc/resolv.conf
mount --bind "$D/hosts" /etc/hosts
exec "$BIN" agent --no-seccomp --config "$D/config.json"
"#;

#[test]
fn a_hanging_name_lookup_does_not_stop_the_agent_loop() {
    use std::io::{ErrorKind, Read, Write};
    use std::time::Duration;
    let found = Command::new("sh").arg("-c").arg("command -v unshare").output().unwrap();
    assert!(found.status.success(), "unshare is missing");
    // A loopback address of its own: port 53 of 127.0.0.1 may be taken.
    let silent = std::net::UdpSocket::bind("127.77.0.53:53").expect("binding a silent nameserver (needs root)");
    let dir = tempfile::Builder::new().prefix("nixless-dns-hang-").tempdir().unwrap();
    let d = dir.path();
    fs::write(d.join("resolv.conf"), "nameserver 127.77.0.53\noptions timeout:10 attempts:1\n").unwrap();
    fs::write(d.join("hosts"), "127.0.0.1 localhost\n").unwrap();
    let port = free_port();
    let key = "admin-1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    fs::write(
        d.join("config.json"),
        format!(
            r#"{{"host":"kiosk-7","listen":["127.0.0.1:{port}"],"caches":["file:///nonexistent"],"cache_keys":["{}"],"deploy_keys":["{key}"],"root":"{}","poll_url":"http://deploy.nixless.test:8080/kiosk-7.json","poll_interval_secs":1,"retries":0}}"#,
            fixtures().get("PK_A"),
            d.join("root").display()
        ),
    )
    .unwrap();
    fs::create_dir_all(d.join("root")).unwrap();
    let log = d.join("agent.log");
    let mut child = Server(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "bash", "-c", HANGING_LOOKUP])
            .env("D", d)
            .env("BIN", bin())
            .stdout(std::process::Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let report = || format!("--- agent log ---\n{}", fs::read_to_string(&log).unwrap_or_default());
    // The lookup has started: its first query arrived (and is never answered).
    silent.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut q = [0u8; 512];
    wait_until("a query for the poll URL's host", Duration::from_secs(30), || match silent.recv(&mut q) {
        Ok(n) => q[..n].windows(6).any(|w| w == b"deploy").then_some(()),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => None,
        Err(e) => panic!("the silent nameserver: {e:?}\n{}", report()),
    });
    let status = || -> Result<String, String> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.write_all(b"GET /v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").map_err(|e| e.to_string())?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).map_err(|e| e.to_string())?;
        Ok(buf)
    };
    for i in 0..3 {
        let s = status().unwrap_or_else(|e| panic!("status {i} unanswered during the lookup: {e}\n{}", report()));
        assert!(s.starts_with("HTTP/1.1 200") && s.contains("\"phase\":\"idle\""), "{s}");
    }
    let last = wait_until("the poll's lookup error", Duration::from_secs(60), || {
        status().ok().filter(|s| s.contains("name lookup failed"))
    });
    assert!(last.contains("name lookup failed: deploy.nixless.test"), "{last}");
    let _ = child.0.kill();
}
