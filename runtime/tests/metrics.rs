//! The Prometheus exposition after a real workload: every catalogue metric is present with its
//! type and labels, counts agree with what the workload did, and `promtool check metrics`
//! accepts the text.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use troupe::sandbox::{LaneMode, SandboxKindConfig};
use troupe::{AgentId, MetricsExporter, Priority, RuntimeConfig, Task, TierConfig};

/// (name, type) of every metric in the DESIGN.md catalogue.
const CATALOGUE: [(&str, &str); 23] = [
    ("troupe_tasks_submitted_total", "counter"),
    ("troupe_tasks_completed_total", "counter"),
    ("troupe_tasks_rejected_total", "counter"),
    ("troupe_task_queue_depth", "gauge"),
    ("troupe_task_queue_capacity", "gauge"),
    ("troupe_task_queue_wait_seconds", "histogram"),
    ("troupe_task_duration_seconds", "histogram"),
    ("troupe_task_latency_seconds", "histogram"),
    ("troupe_bus_messages_total", "counter"),
    ("troupe_bus_messages_dropped_total", "counter"),
    ("troupe_bus_delivery_seconds", "histogram"),
    ("troupe_agents", "gauge"),
    ("troupe_agents_capacity", "gauge"),
    ("troupe_agents_unhealthy", "gauge"),
    ("troupe_agent_starts_total", "counter"),
    ("troupe_agent_restarts_total", "counter"),
    ("troupe_agent_startup_seconds", "histogram"),
    ("troupe_supervisor_escalations_total", "counter"),
    ("troupe_sandbox_lane_executions_total", "counter"),
    ("troupe_sandbox_votes_total", "counter"),
    ("troupe_sandbox_lanes_available", "gauge"),
    ("troupe_sandbox_lanes_capacity", "gauge"),
    ("process_resident_memory_bytes", "gauge"),
];

/// Parses the exposition into `series → value` and `name → type`.
fn parse(text: &str) -> (HashMap<String, f64>, HashMap<String, String>) {
    let mut samples = HashMap::new();
    let mut types = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').unwrap();
            types.insert(name.to_owned(), ty.to_owned());
        } else if !line.starts_with('#') && !line.is_empty() {
            let (series, value) = line.rsplit_once(' ').unwrap();
            samples.insert(series.to_owned(), value.parse().unwrap());
        }
    }
    (samples, types)
}

fn value(samples: &HashMap<String, f64>, series: &str) -> f64 {
    *samples
        .get(series)
        .unwrap_or_else(|| panic!("series {series} missing"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_catalogue_metric_is_exported_and_agrees_with_the_workload() {
    let mut config = RuntimeConfig::default()
        .tier(TierConfig::new("workers").agents("s", 4))
        .tier(TierConfig::new("spare").agents("s", 1));
    config.queues.capacity.0[Priority::Background.index()] = 1;
    config.sandbox.kinds = vec![SandboxKindConfig {
        kind: "s".into(),
        lanes: LaneMode::Threads,
        instances: 1,
    }];
    let (rt, _) = common::start(config).await;
    let exporter = MetricsExporter::new(&rt.handle());

    // Tasks of every priority; one of each failing outcome on `high`.
    for p in Priority::ALL.into_iter().take(4) {
        for _ in 0..3 {
            assert!(
                rt.try_submit(Task::new("s", "ok").priority(p))
                    .unwrap()
                    .await
                    .is_ok()
            );
        }
    }
    // On agent 0, so the restart is in tier `workers`.
    let t = |payload: &'static str| {
        rt.try_submit(
            Task::new(AgentId(0), payload)
                .priority(Priority::High)
                .timeout(Duration::from_millis(30)),
        )
        .unwrap()
    };
    t("error").await;
    t("hang").await;
    t("panic").await; // a restart
    assert!(
        common::eventually(Duration::from_secs(2), || rt.health().tiers[0].restarts
            == 1)
        .await
    );
    // Rejections: invalid, and a full background queue behind a busy agent.
    assert!(rt.try_submit(Task::new("nobody", "x")).is_err());
    let busy = rt
        .try_submit(Task::new(AgentId(4), "sleep:50").priority(Priority::Background))
        .unwrap();
    common::picked(&rt).await;
    let queued = rt
        .try_submit(Task::new(AgentId(4), "ok").priority(Priority::Background))
        .unwrap();
    assert!(
        rt.try_submit(Task::new(AgentId(4), "ok").priority(Priority::Background))
            .is_err()
    );
    // Bus: 2 direct, a publication to 2 subscribers, a request, a send to nobody.
    let bus = rt.bus();
    bus.send(AgentId(0), "a").await.unwrap();
    bus.send(AgentId(1), "b").await.unwrap();
    bus.subscribe("news", AgentId(2)).unwrap();
    bus.subscribe("news", AgentId(3)).unwrap();
    assert_eq!(bus.publish("news", "n").await.unwrap().delivered, 2);
    bus.request(AgentId(0), "q", Duration::from_secs(1))
        .await
        .unwrap();
    assert!(bus.send(AgentId(99), "x").await.is_err());
    // Sandboxed tasks.
    for _ in 0..2 {
        rt.run_sandboxed(Task::new("s", "ok")).await.unwrap();
    }
    assert!(common::eventually(Duration::from_secs(2), || rt.stats().sandbox.unanimous == 2).await);
    assert!(busy.await.is_ok());
    assert!(queued.await.is_ok());
    // A task that shutdown cancels, and a refusal while shutting down.
    let handle = rt.handle();
    let stuck = rt
        .try_submit(
            Task::new("s", "hang")
                .priority(Priority::Low)
                .timeout(Duration::from_secs(3600)),
        )
        .unwrap();
    rt.shutdown_with(Duration::from_millis(20)).await;
    assert_eq!(stuck.await, troupe::Outcome::Cancelled);
    assert!(handle.try_submit(Task::new("s", "late")).is_err());

    let text = exporter.render();
    let (samples, types) = parse(&text);
    for (name, ty) in CATALOGUE {
        assert_eq!(
            types.get(name).map(String::as_str),
            Some(ty),
            "{name} missing or mistyped"
        );
    }
    let v = |s: &str| value(&samples, s);
    assert_eq!(
        v("troupe_tasks_submitted_total{priority=\"critical\"}"),
        3.0
    );
    assert_eq!(v("troupe_tasks_submitted_total{priority=\"high\"}"), 6.0);
    assert_eq!(
        v("troupe_tasks_submitted_total{priority=\"normal\"}"),
        5.0,
        "3 ok + 2 sandboxed"
    );
    assert_eq!(
        v("troupe_tasks_completed_total{priority=\"high\",outcome=\"ok\"}"),
        3.0
    );
    for o in ["error", "timeout", "panic"] {
        assert_eq!(
            v(&format!(
                "troupe_tasks_completed_total{{priority=\"high\",outcome=\"{o}\"}}"
            )),
            1.0
        );
    }
    assert_eq!(
        v("troupe_tasks_completed_total{priority=\"low\",outcome=\"cancelled\"}"),
        1.0
    );
    assert_eq!(
        v("troupe_tasks_rejected_total{priority=\"normal\",reason=\"invalid\"}"),
        1.0
    );
    assert_eq!(
        v("troupe_tasks_rejected_total{priority=\"background\",reason=\"queue_full\"}"),
        1.0
    );
    assert_eq!(
        v("troupe_tasks_rejected_total{priority=\"normal\",reason=\"shutting_down\"}"),
        1.0
    );
    assert_eq!(
        v("troupe_task_queue_capacity{priority=\"background\"}"),
        1.0
    );
    assert_eq!(v("troupe_task_queue_depth{priority=\"normal\"}"), 0.0);
    assert_eq!(
        v("troupe_task_latency_seconds_count{priority=\"high\"}"),
        6.0
    );
    assert_eq!(
        v("troupe_task_latency_seconds_bucket{priority=\"high\",le=\"+Inf\"}"),
        6.0
    );
    // The 30 ms timeout lands between the 0.025 and 0.05 buckets, the SLO threshold.
    assert!(v("troupe_task_duration_seconds_bucket{priority=\"high\",le=\"0.05\"}") >= 6.0);
    assert!(v("troupe_task_duration_seconds_bucket{priority=\"high\",le=\"0.025\"}") <= 5.0);
    assert_eq!(v("troupe_bus_messages_total{kind=\"direct\"}"), 2.0);
    assert_eq!(v("troupe_bus_messages_total{kind=\"publish\"}"), 2.0);
    assert_eq!(v("troupe_bus_messages_total{kind=\"request\"}"), 1.0);
    assert_eq!(
        v("troupe_bus_messages_dropped_total{reason=\"no_such_agent\"}"),
        1.0
    );
    assert_eq!(
        v("troupe_bus_delivery_seconds_count{kind=\"publish\"}"),
        2.0
    );
    assert_eq!(v("troupe_agents{tier=\"workers\",state=\"stopped\"}"), 4.0);
    assert_eq!(v("troupe_agents_capacity"), 928.0);
    assert_eq!(
        v("troupe_agent_starts_total{tier=\"workers\"}"),
        5.0,
        "4 + 1 restart"
    );
    assert_eq!(v("troupe_agent_restarts_total{tier=\"workers\"}"), 1.0);
    assert_eq!(
        v("troupe_agent_startup_seconds_count{tier=\"workers\"}"),
        5.0
    );
    assert_eq!(
        v("troupe_supervisor_escalations_total{supervisor=\"workers\"}"),
        0.0
    );
    assert_eq!(
        v("troupe_sandbox_lane_executions_total{lane=\"B\",outcome=\"ok\"}"),
        2.0
    );
    assert_eq!(v("troupe_sandbox_votes_total{result=\"unanimous\"}"), 2.0);
    assert_eq!(v("troupe_sandbox_lanes_capacity{lane=\"A\"}"), 1.0);
    assert!(v("process_resident_memory_bytes") > 0.0);

    promtool_accepts(&text);
}

/// Runs `promtool check metrics` on the text. Without promtool the check is skipped locally and
/// fails in CI (`.ci/run` installs the `prometheus` package).
fn promtool_accepts(text: &str) {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("promtool not available ({e}); skipping the lint (CI runs it)");
            return;
        }
        Err(e) => panic!("promtool is required in CI: {e}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
