//! The load generator against the real node over HTTP: every request is accounted for, the
//! node's own counters agree, sandboxed tasks and bus messages go through the HTTP API.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::Node;
use troupe_loadtest::mix::Mix;
use troupe_loadtest::report::builtin_policy;
use troupe_loadtest::run::{Mode, Plan, Progress};
use troupe_loadtest::target::Target;
use troupe_loadtest::{Settings, run_once};

const MIX: &str = r#"
name = "http"
[[task]]
name = "reply"
kind = "echo"
capability = "reply"
payload_bytes = 32
share = 3
[[task]]
name = "llm"
kind = "io"
capability = "llm"
priority = "high"
cost = 5
share = 1
[[task]]
name = "decide"
kind = "compute"
priority = "critical"
cost = 10
sandbox = true
share = 1
[bus]
rate = 200
publish_share = 0.5
"#;

fn completed_ok(node: &Node) -> u64 {
    let stats = node.get("/stats").json();
    stats["priorities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["completed"]["ok"].as_u64().unwrap())
        .sum()
}

/// The node as a load target, its mix checked against it.
async fn checked_target(node: &Node, mix: &Mix) -> Arc<Target> {
    let target = Target::new_http(
        &format!("http://{}", node.addr),
        None,
        mix,
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    target.check(mix).await.unwrap();
    Arc::new(target)
}

/// Open loop at `rate` for 2 s, no warm-up, with `bus_rate` bus messages/s.
fn two_seconds_at(mix: &Mix, rate: f64, bus_rate: f64) -> Settings {
    Settings {
        mix: mix.clone(),
        policy: builtin_policy(),
        policy_source: "built-in".into(),
        plan: Plan {
            mode: Mode::Open { rate },
            warmup: Duration::ZERO,
            duration: Duration::from_secs(2),
            bus_rate,
            max_in_flight: 10_000,
            drain: Duration::from_secs(20),
            progress: Progress::Quiet,
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_generator_drives_the_real_node_over_http() {
    let d = tempfile::tempdir().unwrap();
    let node = tokio::task::block_in_place(|| Node::start(d.path(), ""));
    let mix = Mix::from_toml_str(MIX).unwrap();
    let target = checked_target(&node, &mix).await;
    assert_eq!(target.agents(), 928);
    let before = tokio::task::block_in_place(|| completed_ok(&node));

    let settings = two_seconds_at(&mix, 300.0, 200.0);
    let report = run_once(target.clone(), &settings).await;
    let t = &report.tasks.outcomes;
    assert_eq!(t.offered, 600, "300/s for 2 s: {t:?}");
    assert_eq!(t.ok, 600, "nothing in this mix fails: {t:?}");
    assert_eq!(report.tasks.unfinished, 0);
    assert_eq!(
        report.entries[2].outcomes.ok, 120,
        "sandboxed tasks over HTTP"
    );
    assert!(report.latency.overall.p50_ms > 0.0);
    assert!(report.slo.pass, "{:?}", report.slo);

    let after = tokio::task::block_in_place(|| completed_ok(&node));
    assert_eq!(after - before, t.ok, "the node counted the same tasks");

    assert_eq!(report.bus.offered, 400);
    assert_eq!(report.bus.failed, 0, "{:?}", report.bus);
    assert!(report.bus.accepted >= 390, "{:?}", report.bus);
    let (clean, _) = tokio::task::block_in_place(|| node.terminate());
    assert!(clean, "the node shut down cleanly after the run");

    // With the node gone, a request is a failed exchange, not a task error, and the report
    // can say why.
    assert_eq!(target.first_transport_error(), None);
    assert_eq!(
        target.call(0).await,
        troupe_loadtest::record::Class::Transport
    );
    let why = target.first_transport_error().expect("the failure is kept");
    assert!(why.contains("Connect") || why.contains("connect"), "{why}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workflow_mix_registers_its_definition_and_runs_executions_on_the_node() {
    let d = tempfile::tempdir().unwrap();
    let config = format!(
        "[workflows]\nhistory = {:?}\n",
        d.path().join("history.sqlite")
    );
    let node = tokio::task::block_in_place(|| Node::start(d.path(), &config));
    std::fs::write(
        d.path().join("chain.toml"),
        "name = \"chain\"\n[[steps]]\nname = \"a\"\ntarget = \"reply\"\n\
         [[steps]]\nname = \"b\"\ntarget = \"llm\"\nafter = [\"a\"]\n",
    )
    .unwrap();
    let mix_path = d.path().join("mix.toml");
    std::fs::write(
        &mix_path,
        "[[workflow]]\ndefinition = \"chain.toml\"\ninput = \"latency=2\"\nshare = 1\n",
    )
    .unwrap();
    let mix = Mix::from_file(&mix_path).unwrap();
    let target = checked_target(&node, &mix).await;
    let settings = two_seconds_at(&mix, 100.0, 0.0);
    let report = run_once(target.clone(), &settings).await;
    let t = &report.tasks.outcomes;
    assert_eq!((t.offered, t.ok), (200, 200), "{t:?}");
    // The node holds them: the check's one and the run's 200, all succeeded.
    let listed = tokio::task::block_in_place(|| {
        node.get("/v1/executions?workflow=chain&status=succeeded&limit=1000")
            .json()
    });
    assert_eq!(
        listed["executions"].as_array().unwrap().len(),
        201,
        "{listed}"
    );
    tokio::task::block_in_place(|| node.terminate());
}
