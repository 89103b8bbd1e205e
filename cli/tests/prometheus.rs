//! A real Prometheus (Debian package `prometheus`) scrapes the node: its target is up and a
//! catalogue series is queryable through its HTTP API.

mod common;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Node, request};

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs a PromQL instant query; returns the first sample's value, if any.
fn query(prom: std::net::SocketAddr, q: &str) -> Option<String> {
    let encoded: String = q
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let r = request(
        prom,
        "GET",
        &format!("/api/v1/query?query={encoded}"),
        &[],
        None,
    );
    if r.status != 200 {
        return None;
    }
    let v = r.json();
    v["data"]["result"][0]["value"][1]
        .as_str()
        .map(str::to_owned)
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_real_prometheus_scrapes_the_node() {
    if Command::new("prometheus")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install the `prometheus` package"
        );
        eprintln!("prometheus is not installed; skipping (CI runs it)");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let node = Node::start(d.path(), "");
    let config = d.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: troupe\n    static_configs:\n      - targets: ['{}']\n",
            node.addr
        ),
    )
    .unwrap();
    let port = free_port();
    let prom_addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let _prom = Killed(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                d.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={prom_addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("Prometheus to be ready", Duration::from_secs(60), || {
        std::net::TcpStream::connect(prom_addr).is_ok()
            && request(prom_addr, "GET", "/-/ready", &[], None).status == 200
    });
    // Some traffic, so request counters exist.
    for _ in 0..5 {
        node.post("/v1/tasks?wait=true", r#"{"kind":"reply","payload":"x"}"#);
    }
    wait_for("the node target to be up", Duration::from_secs(60), || {
        query(prom_addr, "up{job=\"troupe\"}").as_deref() == Some("1")
    });
    wait_for("a catalogue series", Duration::from_secs(30), || {
        query(prom_addr, "troupe_agents_capacity").as_deref() == Some("928")
    });
    assert_eq!(
        query(prom_addr, "sum(troupe_agents{state=\"running\"})").as_deref(),
        Some("928")
    );
    wait_for("task counters", Duration::from_secs(30), || {
        query(
            prom_addr,
            "sum(troupe_tasks_completed_total{outcome=\"ok\"})",
        )
        .and_then(|v| v.parse::<f64>().ok())
        .is_some_and(|v| v >= 5.0)
    });
}
