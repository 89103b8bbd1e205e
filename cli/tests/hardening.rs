//! The node as a service under hostile or unlucky conditions: memory bounded in bytes, slow and
//! idle connections, a pool whose every worker thread is blocked, deadlines that hold, outcomes
//! readable after SIGTERM, one line per panic, batches.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Node, request};

fn dir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// Polls `f` every 10 ms for up to `limit`.
fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    f()
}

/// A small pool: echo (`reply`), io, and scripted faults.
fn catalogue(d: &std::path::Path) -> String {
    let path = d.join("pool.toml");
    std::fs::write(
        &path,
        "[[tiers]]\nname = \"t\"\n[[tiers.agents]]\nkind = \"echo\"\ncount = 4\ncapabilities = [\"reply\"]\n\
         [[tiers.agents]]\nkind = \"io\"\ncount = 4\n[[tiers.agents]]\nkind = \"faulty\"\ncount = 2\n",
    )
    .unwrap();
    format!("catalog = {:?}\n", path.display().to_string())
}

#[test]
fn task_records_are_bounded_in_bytes_and_say_when_they_dropped_an_output() {
    let d = dir();
    let node = Node::start(
        d.path(),
        &format!(
            "{}[http]\ntask_record_bytes = 33554432\nmax_record_output_bytes = 1048576\n",
            catalogue(d.path())
        ),
    );
    let mb = "x".repeat(1_000_000);
    let before = node.rss();
    let mut last = 0;
    for _ in 0..400 {
        let r = node.post(
            "/v1/tasks",
            &format!(r#"{{"kind":"reply","payload":"{mb}"}}"#),
        );
        assert_eq!(r.status, 202, "{}", r.body);
        last = r.json()["id"].as_u64().unwrap();
    }
    assert!(wait_for(Duration::from_secs(20), || {
        node.get("/stats").json()["records"]["pending"] == 0
    }));
    let stats = node.get("/stats").json();
    assert!(
        stats["records"]["bytes"].as_u64().unwrap() <= 32 << 20,
        "{}",
        stats["records"]
    );
    let grown = node.rss().saturating_sub(before);
    // 400 outputs of 1 MB: without the byte bound the records alone would hold 400 MB.
    assert!(grown < 160 << 20, "RSS grew by {} MiB", grown >> 20);
    // The newest record is whole; the oldest were forgotten.
    let r = node.get(&format!("/v1/tasks/{last}")).json();
    assert_eq!(r["detail"].as_str().map(str::len), Some(1_000_000));
    assert_eq!(node.get("/v1/tasks/1").status, 404);
    // An output over the per-record cap is dropped from the record, which says why; the
    // waiting response still carries it whole.
    let big = "y".repeat(1_100_000);
    let d2 = dir();
    drop(node);
    let node = Node::start(
        d2.path(),
        &format!(
            "{}[http]\nmax_record_output_bytes = 65536\nmax_payload_bytes = 2000000\n",
            catalogue(d2.path())
        ),
    );
    let r = node.post(
        "/v1/tasks?wait=true",
        &format!(r#"{{"kind":"reply","payload":"{big}"}}"#),
    );
    assert_eq!(r.json()["detail"].as_str().map(str::len), Some(1_100_000));
    let id = r.json()["id"].as_u64().unwrap();
    let stored = node.get(&format!("/v1/tasks/{id}")).json();
    assert_eq!(stored["outcome"], "ok");
    assert!(stored["detail"].is_null());
    assert!(
        stored["detail_dropped"]
            .as_str()
            .unwrap()
            .contains("max_record_output_bytes"),
        "{stored}"
    );
}

/// Reads until the peer closes; true if it closed within `limit`.
fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn slow_and_idle_connections_are_closed_and_past_the_limit_refused_while_clients_are_served() {
    let d = dir();
    let node = Node::start(
        d.path(),
        &format!(
            "{}[http]\nmax_connections = 64\nheader_read_timeout = \"500ms\"\nidle_timeout = \"500ms\"\n",
            catalogue(d.path())
        ),
    );
    // 25 connections sending their headers a byte at a time, 25 that send nothing, and 10
    // that finish one request and then sit idle.
    let mut slow: Vec<TcpStream> = (0..25)
        .map(|_| TcpStream::connect(node.addr).unwrap())
        .collect();
    let mut silent: Vec<TcpStream> = (0..25)
        .map(|_| TcpStream::connect(node.addr).unwrap())
        .collect();
    let mut idle: Vec<TcpStream> = (0..10)
        .map(|_| {
            let mut s = TcpStream::connect(node.addr).unwrap();
            s.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
                .unwrap();
            let mut buf = [0u8; 512];
            let n = s.read(&mut buf).unwrap();
            assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
            s
        })
        .collect();
    for s in &mut slow {
        let _ = s.write_all(b"GE");
    }
    // Meanwhile a normal client is served.
    let r = node.post("/v1/tasks?wait=true", r#"{"kind":"reply","payload":"hi"}"#);
    assert_eq!(r.status, 200, "{}", r.body);
    // Every slow, silent and idle connection is closed by the node, without help.
    for s in slow
        .iter_mut()
        .chain(silent.iter_mut())
        .chain(idle.iter_mut())
    {
        assert!(
            closed_within(s, Duration::from_secs(5)),
            "a connection was left open"
        );
    }
    drop((slow, silent, idle));
    // Past max_connections, one more is refused at once with a JSON 503.
    let held: Vec<TcpStream> = (0..64)
        .map(|_| TcpStream::connect(node.addr).unwrap())
        .collect();
    assert!(wait_for(Duration::from_secs(5), || {
        let mut s = TcpStream::connect(node.addr).unwrap();
        let _ = s.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n");
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out.starts_with("HTTP/1.1 503") && out.contains("too_many_connections")
    }));
    drop(held);
    // Once they are gone, clients are served again, and the refusals were counted.
    assert!(wait_for(Duration::from_secs(5), || node
        .get("/health")
        .status
        == 200));
    let metrics = node.get("/metrics").body;
    let refused: f64 = metrics
        .lines()
        .find(|l| l.starts_with("troupe_http_connections_refused_total"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(refused >= 1.0, "{metrics}");
}

#[test]
fn with_every_agent_thread_blocked_health_answers_and_sigterm_exits_by_its_deadline() {
    let d = dir();
    let node = Node::start(
        d.path(),
        &format!(
            "{}[threads]\nagents = 2\n[http]\nshutdown_grace = \"100ms\"\n[runtime.liveness]\nheartbeat = \"100ms\"\n\
             [runtime.shutdown]\ndrain_timeout = \"200ms\"\nstop_timeout = \"300ms\"\n",
            catalogue(d.path())
        ),
    );
    // Two handlers that block both agent worker threads for 60 s, with a 300 ms deadline.
    let ids: Vec<u64> = (0..2)
        .map(|_| {
            let r = node.post(
                "/v1/tasks",
                r#"{"kind":"faulty","payload":"spin:60000","timeout_ms":300}"#,
            );
            assert_eq!(r.status, 202, "{}", r.body);
            r.json()["id"].as_u64().unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_millis(50));
    // The control plane answers at once: health, metrics.
    for path in ["/health", "/metrics", "/health/ready"] {
        let t = Instant::now();
        let r = node.get(path);
        assert!(r.status == 200 || r.status == 503, "{path}: {}", r.status);
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{path} took {:?} with every agent thread blocked",
            t.elapsed()
        );
    }
    // The watchdog (on the control plane too) finds both, answers their tasks `timeout`, and
    // health shows them.
    assert!(wait_for(Duration::from_secs(10), || {
        ids.iter()
            .all(|id| node.get(&format!("/v1/tasks/{id}")).json()["outcome"] == "timeout")
    }));
    let ready = node.get("/health/ready").json();
    let unhealthy: u64 = ready["tiers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["unhealthy"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(unhealthy, 2, "{ready}");
    // SIGTERM exits by its deadlines although both threads stay blocked for a minute.
    let t = Instant::now();
    let (ok, out) = node.terminate();
    assert!(ok, "{out}");
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "exit took {:?}",
        t.elapsed()
    );
    assert!(out.contains("stopped:"), "{out}");
}

#[test]
fn a_deadline_holds_even_when_the_handler_spins_past_it() {
    let d = dir();
    let node = Node::start(d.path(), &catalogue(d.path()));
    for _ in 0..5 {
        let r = node.post(
            "/v1/tasks?wait=true",
            r#"{"kind":"faulty","payload":"spin:120","timeout_ms":30}"#,
        );
        assert_eq!(r.json()["outcome"], "timeout", "{}", r.body);
    }
    let metrics = node.get("/metrics").body;
    assert!(
        metrics.contains(r#"troupe_tasks_late_results_total{priority="normal"} 5"#),
        "{metrics}"
    );
}

#[test]
fn after_sigterm_clients_can_still_read_how_their_tasks_ended() {
    let d = dir();
    let node = Node::start(
        d.path(),
        &format!(
            "{}[http]\nshutdown_grace = \"3s\"\n[runtime.shutdown]\ndrain_timeout = \"100ms\"\nstop_timeout = \"200ms\"\n",
            catalogue(d.path())
        ),
    );
    let ids: Vec<u64> = (0..40)
        .map(|_| {
            let r = node.post("/v1/tasks", r#"{"kind":"io","payload":"latency=10000"}"#);
            assert_eq!(r.status, 202);
            r.json()["id"].as_u64().unwrap()
        })
        .collect();
    node.signal_term();
    // Every one of them is cancelled by the drain, and the node says so before it goes.
    assert!(wait_for(Duration::from_secs(5), || {
        ids.iter().all(|id| {
            let r = request(node.addr, "GET", &format!("/v1/tasks/{id}"), &[], None);
            r.status == 200 && r.json()["outcome"] == "cancelled"
        })
    }));
    let (ok, out) = node.wait();
    assert!(ok);
    assert!(out.contains("cancelled 40"), "{out}");
}

#[test]
fn a_caught_panic_is_one_json_line_without_a_backtrace_and_costs_no_memory() {
    let d = dir();
    let mut node = Node::start_with(
        d.path(),
        &format!("{}[log]\nformat = \"json\"\n", catalogue(d.path())),
        &[("RUST_BACKTRACE", "1"), ("RUST_LOG", "error")],
        Stdio::piped(),
    );
    let before = node.rss();
    for _ in 0..20 {
        let r = node.post(
            "/v1/tasks?wait=true",
            r#"{"kind":"faulty","payload":"panic"}"#,
        );
        assert_eq!(r.json()["outcome"], "panic");
    }
    let grown = node.rss().saturating_sub(before);
    assert!(
        grown < 30 << 20,
        "20 panics grew RSS by {} MiB",
        grown >> 20
    );
    let mut stderr = node.child.stderr.take().unwrap();
    let (ok, _) = node.terminate();
    assert!(ok);
    let mut err = String::new();
    stderr.read_to_string(&mut err).unwrap();
    assert!(!err.contains("stack backtrace"), "{err}");
    assert!(
        !err.contains("panicked at"),
        "the default hook stayed quiet: {err}"
    );
    let lines: Vec<serde_json::Value> = err
        .lines()
        .filter(|l| l.contains("troupe::panic"))
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 20, "{err}");
    assert_eq!(lines[0]["fields"]["panic"], "faulty: scripted panic");
}

#[test]
fn batches_answer_item_by_item() {
    let d = dir();
    let node = Node::start(d.path(), &catalogue(d.path()));
    let r = node.post(
        "/v1/tasks/batch",
        r#"[{"kind":"reply","payload":"a"},{"kind":"wizard"},{"kind":"reply","priority":"urgent"},{"kind":"io","payload":"latency=1"}]"#,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["accepted"], 2);
    let results = v["results"].as_array().unwrap();
    assert_eq!(results[0]["status"], "pending");
    assert_eq!(results[1]["error"], "unknown_kind");
    assert_eq!(results[1]["status"], 400);
    assert_eq!(results[2]["error"], "unknown_priority");
    let id = results[3]["id"].as_u64().unwrap();
    assert!(wait_for(Duration::from_secs(5), || {
        node.get(&format!("/v1/tasks/{id}")).json()["outcome"] == "ok"
    }));
    // Messages, as NDJSON: one line each.
    let r = request(
        node.addr,
        "POST",
        "/v1/messages/batch",
        &[("Content-Type", "application/x-ndjson")],
        Some(
            "{\"agent\":0,\"payload\":\"m\"}\n{\"topic\":\"\"}\n{\"agent\":1,\"payload\":\"n\"}\n",
        ),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(
        (v["delivered"].as_u64(), v["failed"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(v["results"][1]["error"], "invalid_topic");
    // Not an array: one error for the request.
    let r = node.post("/v1/tasks/batch", r#"{"kind":"reply"}"#);
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (400, Some("invalid_json"))
    );
}

#[test]
fn an_invented_http_method_does_not_grow_the_metric_labels() {
    let d = dir();
    let node = Node::start(d.path(), &catalogue(d.path()));
    for m in ["BREW", "WHEN", "PROPFIND"] {
        let r = request(node.addr, m, "/health", &[], None);
        assert_eq!(r.status, 405, "{m}: {}", r.body);
    }
    let metrics = node.get("/metrics").body;
    assert!(
        metrics.contains(r#"method="other""#),
        "unknown methods share one label value: {metrics}"
    );
    for m in ["BREW", "WHEN", "PROPFIND"] {
        assert!(
            !metrics.contains(&format!(r#"method="{m}""#)),
            "{m} became a label"
        );
    }
}
