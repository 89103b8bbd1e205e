//! Dashboards, alerts and SLO rules against the metrics the node really exports.
//!
//! * Structure (always): every dashboard is importable Grafana JSON (schemaVersion, uid, a
//!   `datasource` variable, no hard-coded datasource uid), and every PromQL expression in
//!   dashboards/, alerts/ and slo/ parses.
//! * End to end (with the Debian `prometheus` package; required in CI): a node under a short
//!   load of every priority, bus traffic, sandboxed tasks and failures; a real Prometheus scrapes
//!   it with slo/rules.yaml and alerts/*.yaml loaded; every dashboard expression must return
//!   data, every alert expression must evaluate, and every metric any of them names must exist.
//!   A metric renamed in code breaks this test.

mod common;

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Node, request};
use promql_parser::parser::{self, Expr};
use serde_json::Value as Json;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn dashboards() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![repo().join("dashboards")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "json") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Every panel, including those nested in collapsed rows.
fn panels(dashboard: &Json) -> Vec<&Json> {
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().into_iter().flatten() {
        out.push(p);
        out.extend(p["panels"].as_array().into_iter().flatten());
    }
    out
}

/// Grafana's interval macros, replaced as Grafana would before sending a query.
fn expand_macros(expr: &str) -> String {
    expr.replace("$__rate_interval", "30s")
        .replace("$__interval", "15s")
        .replace("$__range", "5m")
}

/// (where, expression) for every dashboard target.
fn dashboard_exprs() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for path in dashboards() {
        let d: Json = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        for p in panels(&d) {
            for t in p["targets"].as_array().into_iter().flatten() {
                let expr = t["expr"].as_str().unwrap_or("");
                out.push((
                    format!(
                        "{} panel `{}`",
                        path.display(),
                        p["title"].as_str().unwrap_or("")
                    ),
                    expand_macros(expr),
                ));
            }
        }
    }
    out
}

/// (where, expression, is an alert) for every rule in alerts/*.yaml and slo/rules.yaml.
fn rule_exprs() -> Vec<(String, String, bool)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("alerts"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.push(repo().join("slo/rules.yaml"));
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let y: yaml_serde::Value =
            yaml_serde::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
        for g in y["groups"].as_sequence().unwrap() {
            for r in g["rules"].as_sequence().unwrap() {
                let name = r["alert"].as_str().or(r["record"].as_str()).unwrap_or("");
                out.push((
                    format!("{} rule {name}", f.display()),
                    r["expr"].as_str().unwrap_or("").to_owned(),
                    r["alert"].as_str().is_some(),
                ));
            }
        }
    }
    out
}

/// Metric names an expression reads.
fn metric_names(e: &Expr, out: &mut BTreeSet<String>) {
    match e {
        Expr::Aggregate(a) => {
            metric_names(&a.expr, out);
            if let Some(p) = &a.param {
                metric_names(p, out);
            }
        }
        Expr::Unary(u) => metric_names(&u.expr, out),
        Expr::Binary(b) => {
            metric_names(&b.lhs, out);
            metric_names(&b.rhs, out);
        }
        Expr::Paren(p) => metric_names(&p.expr, out),
        Expr::Subquery(s) => metric_names(&s.expr, out),
        Expr::VectorSelector(v) => out.extend(v.name.clone()),
        Expr::MatrixSelector(m) => out.extend(m.vs.name.clone()),
        Expr::Call(c) => c.args.args.iter().for_each(|a| metric_names(a, out)),
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
    }
}

#[test]
fn dashboards_are_importable_grafana_json() {
    let paths = dashboards();
    let names: Vec<String> = paths
        .iter()
        .map(|p| {
            p.strip_prefix(repo().join("dashboards"))
                .unwrap()
                .display()
                .to_string()
        })
        .collect();
    for want in ["sla.json", "perf/throughput.json", "capacity/overview.json"] {
        assert!(
            names.iter().any(|n| n == want),
            "missing dashboards/{want}: {names:?}"
        );
    }
    let mut uids = BTreeSet::new();
    for path in &paths {
        let at = path.display();
        let d: Json = serde_json::from_slice(&std::fs::read(path).unwrap())
            .unwrap_or_else(|e| panic!("{at}: not JSON: {e}"));
        assert!(
            d["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
            "{at}: schemaVersion"
        );
        let uid = d["uid"].as_str().unwrap_or("");
        assert!(!uid.is_empty() && uid.len() <= 40, "{at}: uid `{uid}`");
        assert!(uids.insert(uid.to_owned()), "{at}: uid `{uid}` used twice");
        assert!(
            d["title"].as_str().is_some_and(|t| !t.is_empty()),
            "{at}: title"
        );
        assert!(
            d.get("id").is_none_or(Json::is_null),
            "{at}: an `id` ties it to one Grafana"
        );
        let vars = d["templating"]["list"].as_array().expect("templating.list");
        assert!(
            vars.iter().any(|v| v["name"] == "datasource"
                && v["type"] == "datasource"
                && v["query"] == "prometheus"),
            "{at}: needs a `datasource` variable of type datasource (prometheus)"
        );
        let expected = serde_json::json!({"type": "prometheus", "uid": "${datasource}"});
        let mut targets = 0;
        for p in panels(&d) {
            let title = p["title"].as_str().unwrap_or("");
            let g = &p["gridPos"];
            let (x, w) = (g["x"].as_u64().unwrap(), g["w"].as_u64().unwrap());
            assert!(
                x + w <= 24 && g["h"].as_u64().is_some() && g["y"].as_u64().is_some(),
                "{at} `{title}`: gridPos"
            );
            if p["type"] == "row" {
                continue;
            }
            assert_eq!(
                p["datasource"], expected,
                "{at} `{title}`: datasource must be the variable"
            );
            for t in p["targets"].as_array().expect("targets") {
                assert_eq!(
                    t["datasource"], expected,
                    "{at} `{title}`: target datasource"
                );
                assert!(
                    t["expr"].as_str().is_some_and(|e| !e.trim().is_empty()),
                    "{at} `{title}`: expr"
                );
                targets += 1;
            }
        }
        assert!(targets >= 10, "{at}: only {targets} queries");
    }
}

#[test]
fn every_query_in_dashboards_alerts_and_rules_parses() {
    let all = dashboard_exprs()
        .into_iter()
        .chain(rule_exprs().into_iter().map(|(w, e, _)| (w, e)));
    let mut n = 0;
    for (at, expr) in all {
        parser::parse(&expr).unwrap_or_else(|e| panic!("{at}: {e}\n{expr}"));
        n += 1;
    }
    assert!(n > 100, "only {n} expressions found");
}

const LOAD_MIX: &str = r#"
name = "e2e"
[[task]]
kind = "compute"
priority = "critical"
cost = 20
sandbox = true
share = 2
[[task]]
kind = "echo"
capability = "reply"
priority = "high"
share = 4
[[task]]
name = "llm"
kind = "io"
capability = "llm"
priority = "normal"
cost = 2
share = 4
[[task]]
name = "flaky"
kind = "io"
capability = "fetch"
priority = "low"
payload = "latency=1,fail=0.5"
share = 2
[[task]]
name = "late"
kind = "io"
capability = "fetch"
priority = "background"
payload = "latency=300"
timeout = "20ms"
share = 1
[bus]
rate = 300
publish_share = 0.3
"#;

/// A PromQL instant query; the JSON body.
fn query(prom: SocketAddr, q: &str) -> Json {
    let encoded: String = q
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    request(
        prom,
        "GET",
        &format!("/api/v1/query?query={encoded}"),
        &[],
        None,
    )
    .json()
}

fn first_value(v: &Json) -> Option<f64> {
    v["data"]["result"][0]["value"][1]
        .as_str()
        .and_then(|s| s.parse().ok())
}

#[test]
fn a_real_prometheus_evaluates_every_dashboard_and_alert_query_against_the_node() {
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
    // Two clustered nodes (so the cluster row and alerts have their series, the bus crosses
    // between them) beside the single node that takes the main load.
    let Some(nats) = common::nats::start(d.path()) else {
        return;
    };
    let small = "[[tiers]]\nname = \"t\"\n[[tiers.agents]]\nkind = \"echo\"\ncount = 4\n";
    let ca = common::nats::node(d.path(), &nats, "ca", small, "");
    let cb = common::nats::node(d.path(), &nats, "cb", small, "");
    let single = d.path().join("single");
    std::fs::create_dir_all(&single).unwrap();
    // The single node also runs workflows, so the workflow row and alerts have their series:
    // one that succeeds, one whose step passes its deadline (warned, escalated, failed).
    std::fs::write(
        single.join("flows.yaml"),
        "name: relay\nsteps:\n  - name: a\n    target: reply\n  - name: b\n    target: fetch\n    after: [a]\n",
    )
    .unwrap();
    std::fs::write(
        single.join("late.yaml"),
        "name: late\nsteps:\n  - name: a\n    target: fetch\n    timeout: 60ms\n",
    )
    .unwrap();
    let node = Node::start(
        &single,
        &format!(
            "[workflows]\nhistory = {:?}\ndefinitions = [{:?}, {:?}]\n",
            single.join("history.sqlite"),
            single.join("flows.yaml"),
            single.join("late.yaml")
        ),
    );
    let workflow_load = {
        let addr = node.addr;
        std::thread::spawn(move || {
            for i in 0..20 {
                let (flow, input) = if i % 4 == 3 {
                    ("late", "latency=200")
                } else {
                    ("relay", "latency=5")
                };
                let r = request(
                    addr,
                    "POST",
                    &format!("/v1/workflows/{flow}/executions"),
                    &[("Content-Type", "application/json")],
                    Some(&serde_json::json!({ "input": input }).to_string()),
                );
                assert_eq!(r.status, 202, "{}", r.body);
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    };
    let cluster_load = {
        let (a, b) = (ca.addr, cb.addr);
        std::thread::spawn(move || {
            for i in 0..20 {
                let batch: Vec<serde_json::Value> = (0..20)
                    .map(|_| serde_json::json!({ "kind": "echo", "payload": "x" }))
                    .collect();
                let to = if i % 2 == 0 { a } else { b };
                let r = request(
                    to,
                    "POST",
                    "/v1/tasks/batch",
                    &[("Content-Type", "application/json")],
                    Some(&serde_json::Value::from(batch).to_string()),
                );
                assert_eq!(r.status, 200, "{}", r.body);
                let r = request(
                    a,
                    "POST",
                    "/v1/messages",
                    &[("Content-Type", "application/json")],
                    Some(
                        &serde_json::json!({ "node": "cb", "agent": 0, "payload": "m" })
                            .to_string(),
                    ),
                );
                assert_eq!(r.status, 202, "{}", r.body);
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    };

    // Load in the background: every priority, bus, sandbox, errors and timeouts.
    let addr = node.addr;
    let load = std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let mix = troupe_loadtest::mix::Mix::from_toml_str(LOAD_MIX).unwrap();
            let target = troupe_loadtest::target::Target::new_http(
                &format!("http://{addr}"),
                None,
                &mix,
                Duration::from_secs(5),
            )
            .await
            .unwrap();
            let settings = troupe_loadtest::Settings {
                mix: mix.clone(),
                policy: troupe_loadtest::report::builtin_policy(),
                policy_source: "built-in".into(),
                plan: troupe_loadtest::run::Plan {
                    mode: troupe_loadtest::run::Mode::Open { rate: 150.0 },
                    warmup: Duration::ZERO,
                    duration: Duration::from_secs(25),
                    bus_rate: 300.0,
                    max_in_flight: 10_000,
                    drain: Duration::from_secs(20),
                    progress: troupe_loadtest::run::Progress::Quiet,
                },
            };
            troupe_loadtest::run_once(Arc::new(target), &settings).await
        })
    });

    let config = d.path().join("prometheus.yml");
    let rule_files: Vec<String> = [
        "slo/rules.yaml",
        "alerts/slo.yaml",
        "alerts/performance.yaml",
        "alerts/backpressure.yaml",
        "alerts/cluster.yaml",
        "alerts/workflows.yaml",
    ]
    .iter()
    .map(|f| format!("  - '{}'\n", repo().join(f).display()))
    .collect();
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n{}scrape_configs:\n  - job_name: troupe\n    static_configs:\n      - targets: ['{}', '{}', '{}']\n",
            rule_files.concat(),
            node.addr,
            ca.addr,
            cb.addr
        ),
    )
    .unwrap();
    let prom: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _prom = Killed(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                d.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={prom}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("Prometheus to be ready", Duration::from_secs(60), || {
        std::net::TcpStream::connect(prom).is_ok()
            && request(prom, "GET", "/-/ready", &[], None).status == 200
    });
    // Prometheus loaded every rule file (a bad one would leave a group missing).
    let rules = request(prom, "GET", "/api/v1/rules", &[], None).json();
    let groups = rules["data"]["groups"].as_array().map_or(0, Vec::len);
    assert!(groups >= 15, "Prometheus loaded {groups} rule groups");
    wait_for("the node targets to be up", Duration::from_secs(60), || {
        first_value(&query(prom, "sum(up{job=\"troupe\"})")) == Some(3.0)
    });
    let single = format!("instance=\"{}\"", node.addr);
    assert_eq!(
        first_value(&query(prom, &format!("troupe_agents_capacity{{{single}}}"))),
        Some(928.0)
    );
    assert_eq!(
        first_value(&query(
            prom,
            &format!("sum(troupe_agents{{state=\"running\", {single}}})")
        )),
        Some(928.0)
    );

    let report = load.join().expect("the load ran");
    cluster_load.join().expect("the cluster load ran");
    workflow_load.join().expect("the workflow load ran");
    let t = &report.tasks.outcomes;
    assert!(
        t.ok > 0 && t.error > 0 && t.timeout > 0,
        "the load had successes and failures: {t:?}"
    );
    assert!(report.bus.accepted > 0);
    // Three more scrapes after the last request (so rates and rules see the whole load):
    // wait until Prometheus's newest sample of the node is that much younger than the load.
    let load_end = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let newest_scrape = || {
        query(prom, "max(timestamp(up{job=\"troupe\"}))")["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let waited = std::time::Instant::now();
    while newest_scrape() < load_end + 3.0 {
        assert!(
            waited.elapsed() < Duration::from_secs(60),
            "Prometheus stopped scraping the node"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let mut names = BTreeSet::new();
    let mut failures = Vec::new();
    for (at, expr) in dashboard_exprs() {
        metric_names(&parser::parse(&expr).unwrap(), &mut names);
        let v = query(prom, &expr);
        if v["status"] != "success" {
            failures.push(format!("{at}: {}\n  {expr}", v["error"]));
        } else if v["data"]["result"].as_array().is_none_or(Vec::is_empty) {
            failures.push(format!("{at}: no data\n  {expr}"));
        }
    }
    for (at, expr, alert) in rule_exprs() {
        metric_names(&parser::parse(&expr).unwrap(), &mut names);
        let v = query(prom, &expr);
        if v["status"] != "success" {
            failures.push(format!("{at}: {}\n  {expr}", v["error"]));
        } else if !alert && v["data"]["result"].as_array().is_none_or(Vec::is_empty) {
            // Recording rules aggregate series that exist after this load; alerts are
            // conditions and are rightly empty while nothing is wrong.
            failures.push(format!("{at}: no data\n  {expr}"));
        }
    }
    for name in &names {
        let v = query(prom, &format!("count({{__name__=\"{name}\"}})"));
        if first_value(&v).is_none_or(|n| n < 1.0) {
            failures.push(format!(
                "metric `{name}` is named in a query but Prometheus has no series of it"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} problems:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        names.len() >= 25,
        "only {} metric names found: {names:?}",
        names.len()
    );
    let (clean, _) = node.terminate();
    assert!(clean);
    for n in [ca, cb] {
        let (clean, _) = n.terminate();
        assert!(clean, "a clustered node leaves cleanly");
    }
}
