//! The `troupe` node over HTTP on loopback: every endpoint, every bad input, auth, graceful
//! shutdown with tasks in flight, and the `pool` / `check` commands.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Node, TROUPE, request};

fn dir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn every_endpoint_answers() {
    let d = dir();
    let node = Node::start(d.path(), "");
    let r = node.get("/health");
    assert_eq!(
        (r.status, r.json()["status"].as_str()),
        (200, Some("alive"))
    );
    let r = node.get("/health/ready");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["ready"], true);
    assert_eq!(r.json()["agents"], 928);

    // Submit and wait.
    let r = node.post(
        "/v1/tasks?wait=true",
        r#"{"kind":"reply","payload":"hi","priority":"high"}"#,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(
        (
            v["status"].as_str(),
            v["outcome"].as_str(),
            v["detail"].as_str()
        ),
        (Some("done"), Some("ok"), Some("hi"))
    );
    // Submit, then poll the status.
    let r = node.post(
        "/v1/tasks",
        r#"{"kind":"llm","payload":"latency=20","timeout_ms":2000}"#,
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.json()["id"].as_u64().unwrap();
    let t = Instant::now();
    loop {
        let s = node.get(&format!("/v1/tasks/{id}")).json();
        if s["status"] == "done" {
            assert_eq!(s["outcome"], "ok");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(5));
    }
    // A sandboxed task and a task to one agent.
    let r = node.post(
        "/v1/tasks?wait=true",
        r#"{"kind":"compute","payload":"50|x","sandbox":true}"#,
    );
    assert_eq!(r.json()["outcome"], "ok", "{}", r.body);
    let r = node.post("/v1/tasks?wait=true", r#"{"agent":927,"payload":"x"}"#);
    assert_eq!(r.status, 200, "{}", r.body);
    // Messages.
    let r = node.post("/v1/messages", r#"{"topic":"events","payload":"e1"}"#);
    assert_eq!(
        (r.status, r.json()["delivered"].as_u64()),
        (202, Some(5)),
        "5 aggregators listen"
    );
    let r = node.post("/v1/messages", r#"{"agent":0,"payload":"m"}"#);
    assert_eq!((r.status, r.json()["delivered"].as_u64()), (202, Some(1)));
    // Agents, stats, metrics.
    let v = node.get("/v1/agents").json();
    assert_eq!(v["agents"], 928);
    assert_eq!(v["tiers"].as_array().unwrap().len(), 6);
    assert_eq!(v["tiers"][5]["name"], "micro");
    let v = node.get("/stats").json();
    assert!(v["priorities"][1]["latency"]["count"].as_u64().unwrap() >= 1);
    let r = node.get("/metrics");
    assert_eq!(r.status, 200);
    assert!(r.headers["content-type"].starts_with("text/plain; version=0.0.4"));
    assert!(r.body.contains("troupe_agents_capacity 928"));
    assert!(r.body.contains(
        "troupe_http_requests_total{route=\"/v1/tasks\",method=\"POST\",status=\"200\"}"
    ));
    assert!(
        r.body
            .contains("troupe_http_request_duration_seconds_bucket{route=\"/health\",le=\"0.05\"}")
    );
    let (ok, out) = node.terminate();
    assert!(ok);
    assert!(out.contains("stopped: drained"), "{out}");
}

#[test]
fn an_empty_topic_and_a_non_utf8_path_get_a_4xx_with_a_json_error() {
    let d = dir();
    let node = Node::start(d.path(), "");
    let r = node.post("/v1/messages", r#"{"topic":"","payload":"x"}"#);
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["error"], "invalid_topic");
    let r = request(node.addr, "GET", "/v1/tasks/%FF", &[], None);
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["error"], "invalid_id");
    assert!(!r.json()["message"].as_str().unwrap().is_empty());
    let (ok, _) = node.terminate();
    assert!(ok);
}

#[test]
fn bad_input_gets_a_4xx_with_a_json_error_never_a_500() {
    let d = dir();
    let node = Node::start(
        d.path(),
        "[http]\nmax_payload_bytes = 64\n[runtime.queues]\ncapacity = { critical = 1, high = 1, normal = 1, low = 1, background = 1 }\n",
    );
    let cases: &[(&str, &str, &str, u16, &str)] = &[
        (
            "POST",
            "/v1/tasks",
            "{\"kind\":\"reply\",",
            400,
            "invalid_json",
        ),
        (
            "POST",
            "/v1/tasks",
            r#"{"kind":"reply","colour":"red"}"#,
            400,
            "invalid_json",
        ),
        (
            "POST",
            "/v1/tasks",
            r#"{"kind":"wizard"}"#,
            400,
            "unknown_kind",
        ),
        (
            "POST",
            "/v1/tasks",
            r#"{"kind":"reply","priority":"urgent"}"#,
            400,
            "unknown_priority",
        ),
        (
            "POST",
            "/v1/tasks",
            r#"{"kind":"reply","agent":1}"#,
            400,
            "invalid_target",
        ),
        (
            "POST",
            "/v1/tasks",
            r#"{"agent":5000}"#,
            404,
            "unknown_agent",
        ),
        (
            "POST",
            "/v1/tasks",
            r#"{"kind":"reply","timeout_ms":0}"#,
            400,
            "invalid_task",
        ),
        (
            "POST",
            "/v1/tasks",
            r#"{"kind":"reply","sandbox":true}"#,
            400,
            "invalid_task",
        ),
        (
            "POST",
            "/v1/tasks?wait=maybe",
            r#"{"kind":"reply"}"#,
            400,
            "invalid_query",
        ),
        (
            "POST",
            "/v1/messages",
            r#"{"agent":5000,"payload":"x"}"#,
            404,
            "unknown_agent",
        ),
        (
            "POST",
            "/v1/messages",
            r#"{"payload":"x"}"#,
            400,
            "invalid_target",
        ),
        ("GET", "/v1/tasks/abc", "", 400, "invalid_id"),
        ("GET", "/v1/tasks/999999", "", 404, "unknown_task"),
        ("GET", "/nowhere", "", 404, "not_found"),
        ("DELETE", "/v1/tasks", "", 405, "method_not_allowed"),
    ];
    for (method, path, body, status, code) in cases {
        let r = request(
            node.addr,
            method,
            path,
            &[("Content-Type", "application/json")],
            Some(body),
        );
        assert_eq!(r.status, *status, "{method} {path} {body}: {}", r.body);
        assert_eq!(r.json()["error"], *code, "{method} {path} {body}");
        assert!(!r.json()["message"].as_str().unwrap().is_empty());
    }
    // Payload over the limit: 413, naming the limit.
    let big = format!(r#"{{"kind":"reply","payload":"{}"}}"#, "x".repeat(65));
    let r = node.post("/v1/tasks", &big);
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (413, Some("payload_too_large"))
    );
    assert!(r.json()["message"].as_str().unwrap().contains("64"));
    // Not JSON: 415.
    let r = request(
        node.addr,
        "POST",
        "/v1/tasks",
        &[("Content-Type", "text/plain")],
        Some("hi"),
    );
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (415, Some("unsupported_media_type"))
    );
    // A full queue: 429 with Retry-After. The `fetch` io agents are busy for 2 s each.
    let mut statuses = Vec::new();
    for _ in 0..205 {
        statuses.push(node.post(
            "/v1/tasks",
            r#"{"kind":"fetch","payload":"latency=2000","priority":"low"}"#,
        ));
    }
    let full = statuses
        .iter()
        .find(|r| r.status == 429)
        .expect("the low queue (1) fills up");
    assert_eq!(full.json()["error"], "queue_full");
    assert_eq!(
        full.headers.get("retry-after").map(String::as_str),
        Some("1")
    );
    assert!(
        full.json()["message"]
            .as_str()
            .unwrap()
            .contains("low queue is full (1 of 1")
    );
    let metrics = node.get("/metrics").body;
    assert!(
        !metrics.contains("status=\"500\""),
        "no 500 was ever served"
    );
}

#[test]
fn a_token_guards_every_endpoint_but_liveness_readiness_and_metrics() {
    let d = dir();
    let node = Node::start(
        d.path(),
        "[http]\ntoken = \"s3cret\"\nread_token = \"peek\"\n",
    );
    let body = Some(r#"{"kind":"reply","payload":"x"}"#);
    let json = ("Content-Type", "application/json");
    let r = request(node.addr, "POST", "/v1/tasks", &[json], body);
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (401, Some("unauthorized"))
    );
    assert_eq!(
        r.headers.get("www-authenticate").map(String::as_str),
        Some("Bearer")
    );
    let r = request(
        node.addr,
        "POST",
        "/v1/tasks",
        &[json, ("Authorization", "Bearer nope")],
        body,
    );
    assert_eq!(r.status, 401);
    let r = request(
        node.addr,
        "POST",
        "/v1/tasks",
        &[json, ("Authorization", "Bearer s3cret")],
        body,
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let r = request(
        node.addr,
        "POST",
        "/v1/messages",
        &[json],
        Some(r#"{"topic":"t"}"#),
    );
    assert_eq!(r.status, 401);
    // Reads need a token too (the read token is enough for them, not for writes)...
    for path in ["/stats", "/v1/agents", "/v1/tasks/1"] {
        let r = node.get(path);
        assert_eq!(
            (r.status, r.json()["error"].as_str()),
            (401, Some("unauthorized")),
            "{path}: {}",
            r.body
        );
        for token in ["Bearer s3cret", "Bearer peek"] {
            let r = request(node.addr, "GET", path, &[("Authorization", token)], None);
            assert_ne!(r.status, 401, "{path} with {token}: {}", r.body);
        }
    }
    let r = request(
        node.addr,
        "POST",
        "/v1/tasks",
        &[json, ("Authorization", "Bearer peek")],
        body,
    );
    assert_eq!(r.status, 401, "the read token does not write");
    // ...but liveness, readiness and metrics stay open to probes and scrapers, and an invalid
    // path still gets the JSON error.
    assert_eq!(node.get("/health").status, 200);
    assert_eq!(node.get("/health/ready").status, 200);
    assert_eq!(node.get("/metrics").status, 200);
    let r = request(
        node.addr,
        "GET",
        "/v1/tasks/%FF",
        &[("Authorization", "Bearer s3cret")],
        None,
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"], "invalid_id");
}

#[test]
fn without_a_token_the_node_refuses_a_non_loopback_address() {
    let d = dir();
    let path = d.path().join("open.toml");
    std::fs::write(&path, "[http]\nlisten = \"0.0.0.0:0\"\n").unwrap();
    let out = Command::new(TROUPE)
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refusing to listen on 0.0.0.0:0 without `http.token`"),
        "{err}"
    );
}

#[test]
fn sigterm_drains_tasks_in_flight_and_exits_zero() {
    let d = dir();
    let node = Node::start(d.path(), "");
    let addr = node.addr;
    // 40 requests each waiting on a 300 ms task.
    let waiters: Vec<_> = (0..40)
        .map(|_| {
            std::thread::spawn(move || {
                request(
                    addr,
                    "POST",
                    "/v1/tasks?wait=true",
                    &[("Content-Type", "application/json")],
                    Some(r#"{"kind":"llm","payload":"latency=300"}"#),
                )
            })
        })
        .collect();
    // SIGTERM once all 40 are accepted (the node's own counters say so).
    let accepted = |node: &Node| {
        node.get("/stats").json()["priorities"]
            .as_array()
            .map_or(0, |ps| {
                ps.iter()
                    .map(|p| p["submitted"].as_u64().unwrap_or(0))
                    .sum::<u64>()
            })
    };
    assert!(
        wait_for(|| accepted(&node) == 40),
        "the 40 requests were not all accepted"
    );
    node.signal_term();
    // While it drains it is not ready, and says why; new work is refused with 503.
    assert!(wait_for(|| node.get("/health/ready").status == 503));
    let r = node.get("/health/ready");
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.json()["reasons"][0], "shutting down");
    let r = node.post("/v1/tasks", r#"{"kind":"reply"}"#);
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (503, Some("shutting_down"))
    );
    let (ok, out) = node.wait();
    assert!(ok, "exit status 0");
    for w in waiters {
        let r = w.join().unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(
            r.json()["outcome"],
            "ok",
            "drained, not cancelled: {}",
            r.body
        );
    }
    assert!(
        out.contains("stopped: drained 40 cancelled 0 abandoned 0"),
        "{out}"
    );
}

/// Polls `f` every 5 ms for up to 10 s.
fn wait_for(mut f: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    f()
}

#[test]
fn pool_and_check_validate_and_report() {
    let out = Command::new(TROUPE).arg("pool").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("pool default: 928 agents of 928 allowed, 6 tiers"),
        "{text}"
    );
    assert!(
        text.contains("micro          one_for_one   transient     635"),
        "{text}"
    );

    let d = dir();
    let bad = d.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[tiers]]\nname = \"a\"\n[[tiers.agents]]\nkind = \"wizard\"\ncount = 1\n",
    )
    .unwrap();
    let out = Command::new(TROUPE)
        .args(["pool", "--catalog"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("`tiers[0].agents[0].kind`: unknown agent kind `wizard`")
    );

    let good = d.path().join("node.toml");
    std::fs::write(&good, "[http]\nlisten = \"127.0.0.1:9999\"\n").unwrap();
    let out = Command::new(TROUPE)
        .args(["check", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("ok (928 agents in 6 tiers, listening on 127.0.0.1:9999)")
    );
    for (text, needle) in [
        ("[http]\nport = 1\n", "unknown field `port`"),
        (
            "[http]\nmax_payload_bytes = 0\n",
            "invalid field `http.max_payload_bytes`: must be at least 1",
        ),
        (
            "[runtime.mailbox]\ncapacity = 0\n",
            "invalid config field `mailbox.capacity`: must be at least 1",
        ),
        (
            &format!("catalog = \"{}\"\n", bad.display()),
            "unknown agent kind `wizard`",
        ),
    ] {
        std::fs::write(&good, text).unwrap();
        let out = Command::new(TROUPE)
            .args(["check", "--config"])
            .arg(&good)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{text}: {err}");
    }
}

/// The README's TOML block that starts with `first_line`, after `fix`, passes `troupe check`.
fn readme_block_checks(first_line: &str, fix: impl Fn(&str) -> String) {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let start = readme
        .find(&format!("```toml\n{first_line}"))
        .unwrap_or_else(|| panic!("README has a block starting {first_line}"))
        + "```toml\n".len();
    let len = readme[start..].find("```").unwrap();
    let d = dir();
    let path = d.path().join("readme.toml");
    std::fs::write(&path, fix(&readme[start..start + len])).unwrap();
    let out = Command::new(TROUPE)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_readme_node_config_is_valid() {
    let pool = concat!(env!("CARGO_MANIFEST_DIR"), "/../agents/pool.toml");
    readme_block_checks("catalog =", |text| {
        text.replace("\"agents/pool.toml\"", &format!("{pool:?}"))
    });
}

#[test]
fn the_readme_workflows_config_is_valid() {
    // Its paths are examples: point the history somewhere writable and drop the definitions.
    let d = dir();
    let history = d.path().join("w.sqlite");
    readme_block_checks("[workflows]", |text| {
        text.replace(
            "\"/var/lib/troupe/workflows.sqlite\"",
            &format!("{history:?}"),
        )
        .replace("[\"workflows/research.toml\"]", "[]")
    });
}

#[test]
fn the_readme_cluster_config_is_valid() {
    readme_block_checks("[cluster]", str::to_owned);
}

#[test]
fn past_its_load_limit_the_node_sheds_with_429_overloaded_lowest_priority_first() {
    let d = dir();
    // A bound of 20 tasks in flight: background may hold 12, normal 18, critical is never shed.
    let node = Node::start(
        d.path(),
        "[http]\nmax_in_flight_tasks = 20\n[runtime.shutdown]\ndrain_timeout = \"100ms\"\n",
    );
    let slow = |priority: &str| {
        format!(
            r#"{{"kind":"llm","payload":"latency=30000","priority":"{priority}","timeout_ms":60000}}"#
        )
    };
    for _ in 0..12 {
        assert_eq!(node.post("/v1/tasks", &slow("background")).status, 202);
    }
    let r = node.post("/v1/tasks", &slow("background"));
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.json()["error"], "overloaded");
    assert_eq!(r.headers.get("retry-after").map(String::as_str), Some("1"));
    // Normal work still has room above background's share, up to 18 in flight.
    for _ in 0..6 {
        assert_eq!(node.post("/v1/tasks", &slow("normal")).status, 202);
    }
    assert_eq!(node.post("/v1/tasks", &slow("normal")).status, 429);
    // Critical is never shed by the bound.
    let r = node.post(
        "/v1/tasks?wait=true",
        r#"{"kind":"reply","payload":"urgent","priority":"critical"}"#,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let admission = node.get("/stats").json()["admission"].clone();
    assert_eq!(admission["in_flight"], 18, "{admission}");
    assert_eq!(admission["max"], 20);
    // The refusals are counted with the runtime's, under their own reason.
    let metrics = node.get("/metrics").body;
    assert!(
        metrics.contains(
            r#"troupe_tasks_rejected_total{priority="background",reason="overloaded"} 1"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"troupe_tasks_rejected_total{priority="normal",reason="overloaded"} 1"#)
    );
    let _ = node.terminate();
}
