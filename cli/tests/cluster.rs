//! Nodes as one cluster over a real NATS JetStream server (`nats-server`, required in CI):
//! shared load, kill -9 of a node and of NATS, pull-based balance, the bus across nodes and
//! idempotent submission. Every test counts accepted ids against the outcome bucket itself
//! (read straight from JetStream, not through the nodes).

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::Node;
use common::nats::{self, Nats, eventually, metric_sum};
use futures_util::StreamExt;
use serde_json::{Value, json};

/// A pool of 8 echo agents (capability `work`) and 4 io agents of `latency_ms`.
fn pool(echo: usize, io_latency_ms: u64) -> String {
    format!(
        "[[tiers]]\nname = \"t\"\n\
         [[tiers.agents]]\nkind = \"echo\"\ncount = {echo}\ncapabilities = [\"work\"]\n\
         [[tiers.agents]]\nkind = \"io\"\ncount = 4\nparams = {{ latency_ms = {io_latency_ms} }}\n"
    )
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Every outcome record in the cluster's bucket, by task id, read from JetStream directly;
/// and whether the bucket's stream saw exactly one write per task (no outcome overwritten).
fn recorded(nats: &Nats) -> (HashMap<u64, Value>, bool) {
    rt().block_on(async {
        let client = async_nats::connect(nats.url()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let mut stream = js.get_stream("KV_troupe-outcomes").await.unwrap();
        let state = stream.info().await.unwrap().state.clone();
        let mut out = HashMap::new();
        if state.messages == 0 {
            return (out, true);
        }
        let consumer = stream
            .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
            .await
            .unwrap();
        let mut messages = consumer.messages().await.unwrap();
        let mut seen = 0u64;
        while seen < state.messages {
            let m = tokio::time::timeout(Duration::from_secs(10), messages.next())
                .await
                .expect("reading the outcome bucket")
                .unwrap()
                .unwrap();
            seen += 1;
            let id: u64 = m.subject.rsplit('.').next().unwrap().parse().unwrap();
            let v: Value = serde_json::from_slice(&m.payload).unwrap();
            assert!(out.insert(id, v).is_none(), "task {id} recorded twice");
        }
        // Outcomes are created, never replaced: one write per task since the bucket began.
        (out, state.last_sequence == state.messages)
    })
}

/// Submits `n` tasks in batches spread round-robin over `nodes`; returns the accepted ids.
fn submit(nodes: &[&Node], n: usize, body: &Value) -> Vec<u64> {
    let mut ids = Vec::with_capacity(n);
    let batch = 500;
    let mut turn = 0;
    let mut left = n;
    while left > 0 {
        let k = left.min(batch);
        let items: Vec<Value> = (0..k).map(|_| body.clone()).collect();
        let r = nodes[turn % nodes.len()].post("/v1/tasks/batch", &Value::from(items).to_string());
        turn += 1;
        assert_eq!(r.status, 200, "{}", r.body);
        for item in r.json()["results"].as_array().unwrap() {
            match item["id"].as_u64() {
                Some(id) => ids.push(id),
                None => panic!("a submission was refused: {item}"),
            }
        }
        left -= k;
    }
    ids
}

fn metric(node: &Node, name: &str) -> f64 {
    metric_sum(&node.get("/metrics").body, name)
}

#[test]
fn three_nodes_share_twenty_thousand_tasks_and_every_id_has_one_outcome() {
    let d = tempfile::tempdir().unwrap();
    let Some(nats) = nats::start(d.path()) else {
        return;
    };
    let nodes: Vec<Node> = ["a", "b", "c"]
        .iter()
        .map(|n| nats::node(d.path(), &nats, n, &pool(8, 5), ""))
        .collect();
    let refs: Vec<&Node> = nodes.iter().collect();
    let ids = submit(&refs, 20_000, &json!({ "kind": "work", "payload": "x" }));
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 20_000);
    assert!(
        eventually(Duration::from_secs(120), || recorded(&nats).0.len()
            >= 20_000),
        "every accepted task gets an outcome"
    );
    let (outcomes, once) = recorded(&nats);
    assert!(once, "an outcome was overwritten");
    let accepted: HashSet<u64> = ids.iter().copied().collect();
    let done: HashSet<u64> = outcomes.keys().copied().collect();
    assert_eq!(accepted, done, "outcomes are exactly the accepted ids");
    let mut by_node: HashMap<String, usize> = HashMap::new();
    for v in outcomes.values() {
        assert_eq!(v["outcome"], "ok", "{v}");
        *by_node
            .entry(v["node"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    assert_eq!(by_node.len(), 3, "every node ran some: {by_node:?}");
    // Any node answers for any task, wherever it ran.
    let some = ids[ids.len() / 2];
    let r = nodes[0].get(&format!("/v1/tasks/{some}"));
    assert_eq!((r.status, r.json()["status"].clone()), (200, json!("done")));
    let r = nodes[2].get("/v1/cluster");
    let view = r.json();
    assert_eq!(view["nodes"].as_array().unwrap().len(), 3, "{view}");
    assert!(
        view["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["state"] == "up")
    );
    // `?wait=true` gets the outcome from whichever node ran it.
    let r = nodes[1].post(
        "/v1/tasks?wait=true",
        &json!({ "kind": "work", "payload": "w" }).to_string(),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["detail"], "w");
    let recorded_total: f64 = nodes
        .iter()
        .map(|n| metric(n, "troupe_cluster_outcomes_recorded_total"))
        .sum();
    assert_eq!(recorded_total, 20_001.0);
}

#[test]
fn a_node_killed_mid_load_loses_no_accepted_task() {
    let d = tempfile::tempdir().unwrap();
    let Some(nats) = nats::start(d.path()) else {
        return;
    };
    // io tasks of 100 ms on 4 agents per node: the victim holds work when it dies.
    let a = nats::node(d.path(), &nats, "a", &pool(2, 100), "");
    let b = nats::node(d.path(), &nats, "b", &pool(2, 100), "");
    let mut c = nats::node(d.path(), &nats, "c", &pool(2, 100), "");
    let ids = submit(&[&a, &b], 600, &json!({ "kind": "io", "payload": "p" }));
    // Let the victim take some, then kill -9 it.
    assert!(eventually(Duration::from_secs(30), || {
        metric(&c, "troupe_cluster_outcomes_recorded_total") >= 20.0
    }));
    c.child.kill().unwrap();
    let _ = c.child.wait();
    let more = submit(&[&a, &b], 200, &json!({ "kind": "io", "payload": "q" }));
    let accepted: HashSet<u64> = ids.iter().chain(&more).copied().collect();
    assert!(
        eventually(Duration::from_secs(120), || recorded(&nats).0.len()
            >= accepted.len()),
        "every accepted task gets an outcome after the kill"
    );
    let (outcomes, once) = recorded(&nats);
    assert!(once, "an outcome was overwritten");
    assert_eq!(outcomes.keys().copied().collect::<HashSet<_>>(), accepted);
    assert!(outcomes.values().all(|v| v["outcome"] == "ok"));
    // What the victim held was redelivered to the survivors, with its attempt count.
    let redelivered = metric(&a, "troupe_cluster_redeliveries_total")
        + metric(&b, "troupe_cluster_redeliveries_total");
    assert!(redelivered >= 1.0, "the victim's tasks were redelivered");
    assert!(
        outcomes
            .values()
            .any(|v| v["attempts"].as_u64().unwrap() > 1 && v["node"] != "c"),
        "a redelivered task carries its attempt count"
    );
    // The survivors show the victim gone.
    assert!(eventually(Duration::from_secs(10), || {
        a.get("/v1/cluster").json()["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["node"] == "c" && n["state"] == "gone")
    }));
}

#[test]
fn a_deadline_counts_from_acceptance_across_a_redelivery() {
    let d = tempfile::tempdir().unwrap();
    let Some(nats) = nats::start(d.path()) else {
        return;
    };
    // The only node takes three 5 s io tasks with a 1.5 s deadline, and dies running them.
    let mut c = nats::node(d.path(), &nats, "c", &pool(2, 5000), "");
    let ids = submit(
        &[&c],
        3,
        &json!({ "kind": "io", "payload": "p", "timeout_ms": 1500 }),
    );
    assert!(eventually(Duration::from_secs(5), || {
        c.get("/health/ready").json()["outstanding"] == 3
    }));
    c.child.kill().unwrap();
    let _ = c.child.wait();
    // The redelivery (after the 2 s ack wait) reaches a fast node past the deadline: the task
    // is answered `timeout` there, on its second delivery, not run again with a fresh clock.
    let survivor = nats::node(d.path(), &nats, "d", &pool(2, 10), "");
    assert!(eventually(Duration::from_secs(30), || {
        recorded(&nats).0.len() >= ids.len()
    }));
    let (outcomes, once) = recorded(&nats);
    assert!(once);
    for id in &ids {
        let o = &outcomes[id];
        assert_eq!(o["outcome"], "timeout", "{o}");
        assert_eq!(o["node"], "d", "{o}");
        assert_eq!(o["attempts"], 2, "{o}");
    }
    assert!(metric(&survivor, "troupe_cluster_redeliveries_total") >= 3.0);
}

#[test]
fn a_slow_node_is_given_less_work_than_a_fast_one() {
    let d = tempfile::tempdir().unwrap();
    let Some(nats) = nats::start(d.path()) else {
        return;
    };
    // Both serve `io`; one answers in 1 ms, the other in 50 ms.
    let fast = nats::node(d.path(), &nats, "fast", &pool(1, 1), "");
    let slow = nats::node(d.path(), &nats, "slow", &pool(1, 50), "");
    let ids = submit(
        &[&fast, &slow],
        2000,
        &json!({ "kind": "io", "payload": "p" }),
    );
    assert!(eventually(Duration::from_secs(60), || {
        recorded(&nats).0.len() >= ids.len()
    }));
    let (outcomes, _) = recorded(&nats);
    let on = |n: &str| outcomes.values().filter(|v| v["node"] == n).count();
    let (f, s) = (on("fast"), on("slow"));
    assert_eq!(f + s, ids.len());
    assert!(
        f > 3 * s,
        "fast ran {f}, slow ran {s}: work goes to who asks for it"
    );
}

#[test]
fn the_bus_spans_nodes_request_reply_and_topics() {
    let d = tempfile::tempdir().unwrap();
    let Some(nats) = nats::start(d.path()) else {
        return;
    };
    let a = nats::node(d.path(), &nats, "a", &pool(2, 5), "");
    // b also runs an aggregator subscribed to `events` (agent 6: after 2 echo and 4 io).
    let b_pool = format!(
        "{}[[tiers.agents]]\nkind = \"aggregator\"\ncount = 1\n",
        pool(2, 5)
    );
    let _b = nats::node(d.path(), &nats, "b", &b_pool, "");
    assert!(eventually(Duration::from_secs(5), || {
        a.get("/v1/cluster").json()["nodes"]
            .as_array()
            .unwrap()
            .len()
            == 2
    }));
    // Request/reply to an agent on the other node.
    let r = a.post(
        "/v1/requests",
        &json!({ "node": "b", "agent": 0, "payload": "ping" }).to_string(),
    );
    assert_eq!(
        (r.status, r.json()["reply"].clone()),
        (200, json!("ping")),
        "{}",
        r.body
    );
    // The same timeout semantics as a local request: io agent 2 on b takes 500 ms.
    let r = a.post(
        "/v1/requests",
        &json!({ "node": "b", "agent": 2, "payload": "latency=500", "timeout_ms": 100 })
            .to_string(),
    );
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (504, json!("no_reply")),
        "{}",
        r.body
    );
    let r = a.post(
        "/v1/requests",
        &json!({ "node": "zz", "agent": 0, "payload": "x" }).to_string(),
    );
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (404, json!("unknown_node"))
    );
    // A direct send lands in the remote mailbox.
    let r = a.post(
        "/v1/messages",
        &json!({ "node": "b", "agent": 6, "payload": "direct" }).to_string(),
    );
    assert_eq!(
        (r.status, r.json()["delivered"].clone()),
        (202, json!(1)),
        "{}",
        r.body
    );
    // A topic published on a reaches b's subscriber.
    for i in 0..5 {
        let r = a.post(
            "/v1/messages",
            &json!({ "topic": "events", "payload": format!("e{i}") }).to_string(),
        );
        assert_eq!(r.status, 202, "{}", r.body);
    }
    let summary = || {
        let r = a.post(
            "/v1/requests",
            &json!({ "node": "b", "agent": 6, "payload": "?" }).to_string(),
        );
        serde_json::from_str::<Value>(r.json()["reply"].as_str().unwrap_or("{}")).unwrap()
    };
    assert!(
        eventually(Duration::from_secs(5), || summary()["messages"] == 6),
        "1 direct + 5 published reached b's aggregator: {}",
        summary()
    );
    assert_eq!(summary()["last"], "e4");
    assert!(metric(&a, "troupe_cluster_bus_messages_total") >= 8.0);
}

#[test]
fn nats_killed_and_restarted_mid_run_loses_no_accepted_task() {
    let d = tempfile::tempdir().unwrap();
    let Some(mut nats) = nats::start(d.path()) else {
        return;
    };
    let a = nats::node(d.path(), &nats, "a", &pool(2, 20), "");
    let b = nats::node(d.path(), &nats, "b", &pool(2, 20), "");
    let ids = submit(&[&a, &b], 800, &json!({ "kind": "io", "payload": "p" }));
    assert!(eventually(Duration::from_secs(30), || {
        recorded(&nats).0.len() >= 50
    }));
    nats.kill();
    // Not ready, with the reason; new work refused with a clear error; running work kept.
    assert!(eventually(Duration::from_secs(10), || a
        .get("/health/ready")
        .status
        == 503));
    let ready = a.get("/health/ready").json();
    assert!(
        ready["reasons"].to_string().contains("NATS is unreachable"),
        "{ready}"
    );
    let r = a.post(
        "/v1/tasks",
        &json!({ "kind": "io", "payload": "p" }).to_string(),
    );
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.json()["error"], "cluster_unavailable");
    std::thread::sleep(Duration::from_millis(500));
    nats.restart().expect("nats-server restarts");
    // They reconnect on their own and are ready again.
    assert!(eventually(Duration::from_secs(30), || {
        a.get("/health/ready").status == 200 && b.get("/health/ready").status == 200
    }));
    let more = submit(&[&a, &b], 100, &json!({ "kind": "io", "payload": "q" }));
    let accepted: HashSet<u64> = ids.iter().chain(&more).copied().collect();
    assert!(
        eventually(Duration::from_secs(120), || recorded(&nats).0.len()
            >= accepted.len()),
        "every accepted task ends with an outcome"
    );
    let (outcomes, once) = recorded(&nats);
    assert!(once, "an outcome was overwritten");
    assert_eq!(outcomes.keys().copied().collect::<HashSet<_>>(), accepted);
}

#[test]
fn a_resubmission_with_the_same_idempotency_key_runs_once() {
    let d = tempfile::tempdir().unwrap();
    let Some(nats) = nats::start(d.path()) else {
        return;
    };
    let a = nats::node(d.path(), &nats, "a", &pool(2, 5), "");
    let b = nats::node(d.path(), &nats, "b", &pool(2, 5), "");
    let body = json!({ "kind": "work", "payload": "once", "idempotency_key": "order-42" });
    let first = a.post("/v1/tasks", &body.to_string()).json();
    let again = b.post("/v1/tasks", &body.to_string()).json();
    assert_eq!(first["duplicate"], false);
    assert_eq!(again["duplicate"], true, "{again}");
    assert_eq!(first["id"], again["id"]);
    let other = a
        .post(
            "/v1/tasks",
            &json!({ "kind": "work", "payload": "other", "idempotency_key": "order-43" })
                .to_string(),
        )
        .json();
    assert_ne!(other["id"], first["id"]);
    assert!(eventually(Duration::from_secs(10), || recorded(&nats)
        .0
        .len()
        == 2));
    std::thread::sleep(Duration::from_millis(300));
    let ran: f64 = [&a, &b]
        .iter()
        .map(|n| metric(n, "troupe_cluster_outcomes_recorded_total"))
        .sum();
    assert_eq!(ran, 2.0, "two keys, two executions");
    let deduplicated: f64 = [&a, &b]
        .iter()
        .map(|n| metric(n, "troupe_cluster_tasks_deduplicated_total"))
        .sum();
    assert_eq!(deduplicated, 1.0);
    // Without a cluster the key is refused rather than ignored.
    let single = Node::start(d.path(), "");
    let r = single.post("/v1/tasks", &body.to_string());
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (400, json!("unsupported"))
    );
}

#[test]
fn clustered_submissions_refuse_what_cannot_be_durable() {
    let d = tempfile::tempdir().unwrap();
    let Some(nats) = nats::start(d.path()) else {
        return;
    };
    let a = nats::node(d.path(), &nats, "a", &pool(2, 5), "");
    let r = a.post(
        "/v1/tasks",
        &json!({ "agent": 0, "payload": "x" }).to_string(),
    );
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (400, json!("invalid_target"))
    );
    let r = a.post(
        "/v1/tasks",
        &json!({ "kind": "nobody", "payload": "x" }).to_string(),
    );
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (503, json!("unavailable")),
        "{}",
        r.body
    );
    let r = a.get("/v1/tasks/999999");
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (404, json!("unknown_task"))
    );
}

#[test]
fn the_load_tester_spreads_over_the_nodes_and_reports_each() {
    let d = tempfile::tempdir().unwrap();
    let Some(nats) = nats::start(d.path()) else {
        return;
    };
    let a = nats::node(d.path(), &nats, "a", &pool(4, 5), "");
    let b = nats::node(d.path(), &nats, "b", &pool(4, 5), "");
    let c = nats::node(d.path(), &nats, "c", &pool(4, 5), "");
    let urls = [&a, &b, &c]
        .iter()
        .map(|n| format!("http://{}", n.addr))
        .collect::<Vec<_>>()
        .join(",");
    let report = rt().block_on(async {
        let mix = troupe_loadtest::mix::Mix::from_toml_str(
            "name = \"cluster\"\n[[task]]\nname = \"work\"\nkind = \"echo\"\ncapability = \"work\"\nshare = 1\n\
             [[task]]\nname = \"io\"\nkind = \"io\"\npriority = \"high\"\nshare = 1\n",
        )
        .unwrap();
        let target = troupe_loadtest::target::Target::new_http(
            &urls,
            None,
            &mix,
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(target.nodes().len(), 3);
        let settings = troupe_loadtest::Settings {
            mix: mix.clone(),
            policy: troupe_loadtest::report::builtin_policy(),
            policy_source: "built-in".into(),
            plan: troupe_loadtest::run::Plan {
                mode: troupe_loadtest::run::Mode::Open { rate: 300.0 },
                warmup: Duration::ZERO,
                duration: Duration::from_secs(2),
                bus_rate: 0.0,
                max_in_flight: 10_000,
                drain: Duration::from_secs(20),
                progress: troupe_loadtest::run::Progress::Quiet,
            },
        };
        troupe_loadtest::run_once(std::sync::Arc::new(target), &settings).await
    });
    let t = &report.tasks.outcomes;
    assert_eq!((t.offered, t.ok), (600, 600), "{t:?}");
    assert_eq!(report.nodes.len(), 3);
    for n in &report.nodes {
        assert_eq!(n.outcomes.offered, 200, "round-robin: {}", n.url);
        assert_eq!(n.outcomes.ok, 200);
        assert!(n.latency.p50_ms > 0.0);
    }
    // The cluster recorded exactly what the load tester counted.
    assert!(eventually(Duration::from_secs(10), || recorded(&nats)
        .0
        .len()
        == 600));
    let text = troupe_loadtest::report::render_text(&report);
    assert!(text.contains("by node"), "{text}");
}
