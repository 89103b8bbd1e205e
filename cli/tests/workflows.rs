//! The node's workflow API over HTTP: definitions refused with the step named, executions
//! started, read and streamed as Server-Sent Events, and kill -9 of the node mid-execution —
//! the restarted node resumes it from its SQLite history and it ends once.

mod common;

use std::time::{Duration, Instant};

use common::{Node, request};
use serde_json::{Value, json};

const POOL: &str = "[[tiers]]\nname = \"t\"\n\
    [[tiers.agents]]\nkind = \"echo\"\ncount = 2\n\
    [[tiers.agents]]\nkind = \"io\"\ncount = 2\nparams = { latency_ms = 10 }\n";

/// Step `first` echoes the input; `second` waits on io for what the input says
/// (`latency=MS`); `third` tags on after it.
const FLOW: &str = "name = \"relay\"\n\
    [[steps]]\nname = \"first\"\ntarget = \"echo\"\n\
    [[steps]]\nname = \"second\"\ntarget = \"io\"\nafter = [\"first\"]\ntimeout = \"60s\"\n\
    [[steps]]\nname = \"third\"\ntarget = \"echo\"\nafter = [\"second\"]\n";

fn node(dir: &std::path::Path) -> Node {
    std::fs::write(dir.join("pool.toml"), POOL).unwrap();
    std::fs::write(dir.join("relay.toml"), FLOW).unwrap();
    let config = format!(
        "catalog = {:?}\n[workflows]\nhistory = {:?}\ndefinitions = [{:?}]\n",
        dir.join("pool.toml"),
        dir.join("history.sqlite"),
        dir.join("relay.toml"),
    );
    Node::start(dir, &config)
}

fn until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn step<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap()
}

#[test]
fn the_api_registers_starts_reads_and_streams_and_refuses_bad_input() {
    let d = tempfile::tempdir().unwrap();
    let n = node(d.path());
    assert_eq!(
        n.get("/v1/workflows").json()["workflows"][0]["name"],
        "relay"
    );
    // A bad definition names the step and field.
    let bad = request(
        n.addr,
        "POST",
        "/v1/workflows",
        &[("Content-Type", "application/toml")],
        Some("name = \"w\"\n[[steps]]\nname = \"a\"\ntarget = \"nope\"\n"),
    );
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert_eq!(bad.json()["error"], "invalid_workflow");
    assert!(
        bad.json()["message"]
            .as_str()
            .unwrap()
            .contains("steps[0] (a).target")
    );
    let cycle = n.post(
        "/v1/workflows",
        &json!({"name": "c", "steps": [
            {"name": "a", "target": "echo", "after": ["b"]},
            {"name": "b", "target": "echo", "after": ["a"]}]})
        .to_string(),
    );
    assert_eq!(cycle.status, 400);
    assert!(
        cycle.json()["message"].as_str().unwrap().contains("cycle"),
        "{}",
        cycle.body
    );
    // A good one in YAML, then run it.
    let ok = request(
        n.addr,
        "POST",
        "/v1/workflows",
        &[("Content-Type", "application/yaml")],
        Some(
            "name: quick\nsteps:\n  - name: a\n    target: echo\n  - name: b\n    target: io\n    after: [a]\n",
        ),
    );
    assert_eq!(ok.status, 201, "{}", ok.body);
    assert_eq!(n.post("/v1/workflows/nope/executions", "{}").status, 404);
    let r = n.post("/v1/workflows/quick/executions", r#"{"input":"latency=5"}"#);
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.json()["id"].as_u64().unwrap();
    // The event stream: everything of the execution in order, ending with `finished`.
    let sse = n.get(&format!("/v1/executions/{id}/events"));
    assert_eq!(sse.status, 200);
    assert!(
        sse.headers["content-type"].starts_with("text/event-stream"),
        "{:?}",
        sse.headers
    );
    let events: Vec<Value> = sse
        .body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(
        seqs,
        (1..=events.len() as u64).collect::<Vec<_>>(),
        "{}",
        sse.body
    );
    assert_eq!(events.first().unwrap()["kind"], "started");
    assert_eq!(events.last().unwrap()["kind"], "finished");
    let v = n.get(&format!("/v1/executions/{id}")).json();
    assert_eq!(v["status"], "succeeded", "{v}");
    assert_eq!(step(&v, "b")["output"], "latency=5");
    assert_eq!(v["progress"]["done"], 2);
    let listed = n
        .get("/v1/executions?workflow=quick&status=succeeded")
        .json();
    assert_eq!(listed["executions"][0]["id"], id);
    // Metrics per registered workflow, in the node's exposition.
    let metrics = n.get("/metrics").body;
    for line in [
        r#"troupe_workflow_executions_started_total{workflow="quick"} 1"#,
        r#"troupe_workflow_executions_finished_total{workflow="quick",status="succeeded"} 1"#,
        r#"troupe_workflow_steps_finished_total{workflow="quick",status="succeeded"} 2"#,
        r#"troupe_workflow_executions_running{workflow="quick"} 0"#,
        r#"troupe_workflow_step_duration_seconds_count{workflow="quick"} 2"#,
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    assert_eq!(n.get("/v1/executions/999").status, 404);
    assert_eq!(
        n.post(&format!("/v1/executions/{id}/cancel"), "").status,
        409
    );
    let bad_query = n.get("/v1/executions?limit=x");
    assert_eq!(bad_query.status, 400);
    assert_eq!(bad_query.json()["error"], "invalid_query");
}

#[test]
fn a_node_killed_mid_execution_resumes_it_after_restart_and_it_ends_once() {
    let d = tempfile::tempdir().unwrap();
    let mut n = node(d.path());
    let r = n.post(
        "/v1/workflows/relay/executions",
        r#"{"input":"latency=3000"}"#,
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.json()["id"].as_u64().unwrap();
    // Kill -9 while `second` runs (its io agent waits 3 s).
    assert!(until(Duration::from_secs(10), || {
        step(&n.get(&format!("/v1/executions/{id}")).json(), "second")["status"] == "running"
    }));
    n.child.kill().unwrap();
    let _ = n.child.wait();
    // Restarted on the same history: it resumes, `first` is not run again, `second` is.
    let n = node(d.path());
    assert!(
        until(Duration::from_secs(30), || {
            n.get(&format!("/v1/executions/{id}")).json()["status"] == "succeeded"
        }),
        "{}",
        n.get(&format!("/v1/executions/{id}")).body
    );
    let v = n.get(&format!("/v1/executions/{id}")).json();
    assert_eq!(step(&v, "first")["attempts"], 1, "{v}");
    assert_eq!(step(&v, "second")["status"], "succeeded");
    assert_eq!(step(&v, "third")["output"], "latency=3000");
    let sse = n.get(&format!("/v1/executions/{id}/events"));
    let kinds: Vec<String> = sse
        .body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["kind"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert!(kinds.contains(&"resumed".to_owned()), "{kinds:?}");
    assert_eq!(
        kinds.iter().filter(|k| *k == "finished").count(),
        1,
        "{kinds:?}"
    );
    // Ends once: it is listed once, as succeeded.
    let all = n.get("/v1/executions").json();
    assert_eq!(all["executions"].as_array().unwrap().len(), 1);
}

#[test]
fn troupe_workflow_run_follows_an_execution_and_prints_the_step_table() {
    let d = tempfile::tempdir().unwrap();
    let n = node(d.path());
    let file = d.path().join("pair.yaml");
    std::fs::write(
        &file,
        "name: pair\nsteps:\n  - name: fetch\n    target: io\n    timeout: 5s\n  - name: answer\n    target: echo\n    after: [fetch]\n",
    )
    .unwrap();
    let out = std::process::Command::new(common::TROUPE)
        .args(["workflow", "run"])
        .arg(&file)
        .args([
            "--input",
            "latency=50",
            "--node",
            &format!("http://{}", n.addr),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Not a terminal: one line per event, then the table.
    assert!(
        stdout.contains("step_queued") && stdout.contains("finished: succeeded"),
        "{stdout}"
    );
    let table = stdout.split("\nexecution ").nth(1).unwrap();
    assert!(table.starts_with("1 succeeded"), "{stdout}");
    for step in ["fetch", "answer"] {
        let row = table
            .lines()
            .find(|l| l.trim_start().starts_with(step))
            .unwrap();
        assert!(row.contains("succeeded"), "{row}");
    }
    // A failing run exits 1; a refused definition exits 2 with the reason.
    let bad = d.path().join("bad.toml");
    std::fs::write(
        &bad,
        "name = \"x\"\n[[steps]]\nname = \"a\"\ntarget = \"nope\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(common::TROUPE)
        .args(["workflow", "run"])
        .arg(&bad)
        .args(["--node", &format!("http://{}", n.addr)])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("steps[0] (a).target"));
    let failing = d.path().join("failing.toml");
    std::fs::write(
        &failing,
        "name = \"f\"\n[[steps]]\nname = \"a\"\ntarget = \"io\"\ntimeout = \"100ms\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(common::TROUPE)
        .args(["workflow", "run"])
        .arg(&failing)
        .args([
            "--input",
            "latency=2000",
            "--node",
            &format!("http://{}", n.addr),
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
