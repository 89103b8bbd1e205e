//! OTLP export (feature `otel`): a loopback collector receives the node's spans, and the trace
//! context carried by bus messages links a router's request to the handler that answered it.
#![cfg(feature = "otel")]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use common::Node;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;

/// Accepts OTLP/HTTP posts on loopback and keeps their bodies.
fn collector() -> (String, Arc<Mutex<Vec<Vec<u8>>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let store = bodies.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let store = store.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut writer = conn;
                loop {
                    let mut len = 0usize;
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; len];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    store.lock().unwrap().push(body);
                    let _ = writer.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
                }
            });
        }
    });
    (format!("http://{addr}/v1/traces"), bodies)
}

/// The spans in every body the collector received.
fn spans_of(bodies: &Mutex<Vec<Vec<u8>>>) -> Vec<opentelemetry_proto::tonic::trace::v1::Span> {
    let mut spans = Vec::new();
    for body in bodies.lock().unwrap().iter() {
        let req = ExportTraceServiceRequest::decode(body.as_slice()).expect("OTLP protobuf");
        for rs in req.resource_spans {
            for ss in rs.scope_spans {
                spans.extend(ss.spans);
            }
        }
    }
    spans
}

#[test]
fn a_conversation_across_cluster_nodes_is_one_trace() {
    let (endpoint, bodies) = collector();
    let d = tempfile::tempdir().unwrap();
    let Some(nats) = common::nats::start(d.path()) else {
        return;
    };
    let pool = "[[tiers]]\nname = \"t\"\n[[tiers.agents]]\nkind = \"echo\"\ncount = 2\n";
    let node = |name: &str, pool: &str| {
        let dir = d.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("pool.toml"), pool).unwrap();
        Node::start(
            &dir,
            &format!(
                "catalog = {:?}\n[tracing]\notlp_endpoint = \"{endpoint}\"\n{}",
                dir.join("pool.toml").display().to_string(),
                common::nats::cluster_section(&nats, name, "")
            ),
        )
    };
    let a = node("a", pool);
    // b alone serves `io`, so a task submitted on a runs on b.
    let b = node(
        "b",
        &format!(
            "{pool}[[tiers.agents]]\nkind = \"io\"\ncount = 1\nparams = {{ latency_ms = 1 }}\n"
        ),
    );
    assert!(common::nats::eventually(
        std::time::Duration::from_secs(5),
        || {
            a.get("/v1/cluster").json()["nodes"]
                .as_array()
                .unwrap()
                .len()
                == 2
        }
    ));
    let r = a.post("/v1/requests", r#"{"node":"b","agent":0,"payload":"hi"}"#);
    assert_eq!(r.status, 200, "{}", r.body);
    let r = a.post("/v1/tasks?wait=true", r#"{"kind":"io","payload":"x"}"#);
    assert_eq!(
        (r.status, r.json()["node"].clone()),
        (200, "b".into()),
        "{}",
        r.body
    );
    assert!(a.terminate().0 && b.terminate().0); // flushes the exporters

    let spans = spans_of(&bodies);
    let named = |n: &str| spans.iter().filter(|s| s.name == n).collect::<Vec<_>>();
    // a's request span is the parent of b's message handler span: one trace, two processes.
    let requests = named("troupe.bus.request");
    let messages = named("troupe.bus.message");
    assert!(
        messages.iter().any(|m| requests
            .iter()
            .any(|r| r.trace_id == m.trace_id && r.span_id == m.parent_span_id)),
        "b's handler span is not a child of a's request span"
    );
    // a's submission span is the parent of the task's run on b.
    let submits = named("troupe.cluster.submit");
    let tasks = named("troupe.task");
    assert!(
        tasks.iter().any(|t| submits
            .iter()
            .any(|s| s.trace_id == t.trace_id && s.span_id == t.parent_span_id)),
        "the run on b is not a child of the submission on a"
    );
}

#[test]
fn spans_reach_the_collector_and_a_bus_conversation_is_one_trace() {
    let (endpoint, bodies) = collector();
    let d = tempfile::tempdir().unwrap();
    let node = Node::start(
        d.path(),
        &format!("[tracing]\notlp_endpoint = \"{endpoint}\"\n"),
    );
    let r = node.post("/v1/tasks?wait=true", r#"{"kind":"reply","payload":"x"}"#);
    assert_eq!(r.status, 200, "{}", r.body);
    // A router asks two echo agents over the bus.
    let r = node.post(
        "/v1/tasks?wait=true",
        r#"{"kind":"review","payload":"reply*2:hi"}"#,
    );
    assert_eq!(r.json()["outcome"], "ok", "{}", r.body);
    let (ok, _) = node.terminate(); // flushes the exporter
    assert!(ok);

    let spans = spans_of(&bodies);
    let named = |n: &str| spans.iter().filter(|s| s.name == n).collect::<Vec<_>>();
    assert!(
        named("troupe.task").len() >= 2,
        "{:?}",
        spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    // The router asks both agents in one fan-out; each answering handler's span is a child
    // of it, in the same trace.
    let fan_outs = named("troupe.bus.fan_out");
    let messages = named("troupe.bus.message");
    assert_eq!(fan_outs.len(), 1);
    assert_eq!(messages.len(), 2);
    for m in &messages {
        assert!(
            fan_outs
                .iter()
                .any(|r| r.trace_id == m.trace_id && r.span_id == m.parent_span_id),
            "message span not linked to its fan-out"
        );
    }
    let requests = fan_outs;
    // And the fan-out belongs to the router's task span.
    let tasks = named("troupe.task");
    for r in &requests {
        assert!(
            tasks
                .iter()
                .any(|t| t.trace_id == r.trace_id && t.span_id == r.parent_span_id)
        );
    }
}
