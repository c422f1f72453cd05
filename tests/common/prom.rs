//! Debian's Pushgateway and a Prometheus scraping it every second (with
//! `honor_labels`, as README says to), on loopback ports, killed on drop.

use super::{free_port, http, wait_until, Server};
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

pub const PROMETHEUS: &str = "/usr/bin/prometheus";
pub const GATEWAY: &str = "/usr/bin/prometheus-pushgateway";

pub struct Stack {
    _gateway: Server,
    _prometheus: Server,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
    pub gateway: String,
    pub prometheus: String,
}

fn ready(url: &str) -> Option<()> {
    let r = http().get(url).call().ok()?;
    (r.status().as_u16() == 200).then_some(())
}

impl Stack {
    /// Both servers, ready; `None` (with a SKIP line) if they are not
    /// installed. `command` makes the `Command` for a program (a caller
    /// may want its children to die with it).
    pub fn start(command: impl Fn(&str) -> Command) -> Option<Stack> {
        for bin in [PROMETHEUS, GATEWAY] {
            if !Path::new(bin).exists() {
                eprintln!("SKIP: {bin} missing (apt-get install prometheus prometheus-pushgateway; tests/run.sh does)");
                return None;
            }
        }
        let gdir = tempfile::Builder::new().prefix("nixless-fleet-gw-").tempdir().unwrap();
        let gport = free_port();
        let gw = command(GATEWAY)
            .arg(format!("--web.listen-address=127.0.0.1:{gport}"))
            .arg(format!("--persistence.file={}", gdir.path().join("data").display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let gateway_server = Server(gw);
        let gateway = format!("http://127.0.0.1:{gport}");
        wait_until("the pushgateway to be ready", Duration::from_secs(30), || ready(&format!("{gateway}/-/ready")));
        let pdir = tempfile::Builder::new().prefix("nixless-fleet-prom-").tempdir().unwrap();
        let config = pdir.path().join("prometheus.yml");
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: pushgateway\n    \
                 honor_labels: true\n    static_configs:\n      - targets: ['127.0.0.1:{gport}']\n"
            ),
        )
        .unwrap();
        let pport = free_port();
        let log = fs::File::create(pdir.path().join("log")).unwrap();
        let prom = command(PROMETHEUS)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", pdir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{pport}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let prom_server = Server(prom);
        let prometheus = format!("http://127.0.0.1:{pport}");
        wait_until("prometheus to be ready", Duration::from_secs(60), || ready(&format!("{prometheus}/-/ready")));
        Some(Stack { _gateway: gateway_server, _prometheus: prom_server, _dirs: (gdir, pdir), gateway, prometheus })
    }

    /// Pushes `text` (metrics in the text format) as `host`'s group.
    pub fn push(&self, host: &str, text: &str) {
        let r = http()
            .put(&format!("{}/metrics/job/nixless/host/{host}", self.gateway))
            .header("Content-Type", "text/plain; version=0.0.4")
            .send(text.as_bytes())
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "push of {host}");
    }

    /// Waits until Prometheus's answer to `q` is `want`.
    pub fn wait_for(&self, q: &str, want: &str) {
        wait_until(&format!("prometheus: {q} == {want}"), Duration::from_secs(60), || {
            (self.value(q).as_deref() == Some(want)).then_some(())
        });
    }

    /// The value of a PromQL instant query returning one series, as text.
    pub fn value(&self, q: &str) -> Option<String> {
        let url = format!("{}/api/v1/query?query={}", self.prometheus, nixless::auth::sigv4::uri_encode(q, false));
        let mut r = http().get(&url).call().ok()?;
        let body = r.body_mut().read_to_string().ok()?;
        let s = nixless::fleet::prom::parse(body.as_bytes()).ok()?;
        s.first().map(|s| s.value.to_string())
    }
}
