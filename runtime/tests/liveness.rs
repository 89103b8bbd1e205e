//! The liveness watchdog: a handler that blocks its thread past its deadline is marked
//! unhealthy, its task ends as `timeout`, and its supervisor replaces the agent.

use std::time::{Duration, Instant};

use bytes::Bytes;
use troupe::{
    Agent, AgentContext, AgentId, AgentSpec, MetricsExporter, Outcome, Runtime, RuntimeConfig,
    Task, TaskError, TaskRequest, TierConfig,
};

/// `block:MS` blocks the thread (no await point, so its timeout cannot fire); else echoes.
struct Blocker;

impl Agent for Blocker {
    async fn handle(&mut self, task: TaskRequest, _: &AgentContext) -> Result<Bytes, TaskError> {
        if let Some(ms) = task.payload.strip_prefix(b"block:") {
            let ms: u64 = std::str::from_utf8(ms).unwrap().parse().unwrap();
            std::thread::sleep(Duration::from_millis(ms));
        }
        Ok(task.payload)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn a_handler_stuck_past_its_deadline_is_timed_out_and_its_agent_replaced() {
    let mut config = RuntimeConfig::default().tier(TierConfig::new("t").agents("b", 2));
    config.liveness.heartbeat = Duration::from_millis(100);
    let rt = Runtime::builder(config)
        .register("b", |_: &AgentSpec| Blocker)
        .start()
        .await
        .unwrap();
    let exporter = MetricsExporter::new(&rt.handle());
    let t = Instant::now();
    let stuck = rt
        .try_submit(Task::new(AgentId(0), "block:2000").timeout(Duration::from_millis(50)))
        .unwrap();
    // Warning after 2 heartbeats past the deadline: health and the gauge show it.
    let (mut in_health, mut in_metrics) = (false, false);
    while t.elapsed() < Duration::from_millis(600) && !in_metrics {
        if rt.health().tiers[0].unhealthy == 1 {
            in_health = true;
            in_metrics = exporter
                .render()
                .lines()
                .any(|l| l == "troupe_agents_unhealthy{tier=\"t\"} 1");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(in_health, "health never showed the agent unhealthy");
    assert!(in_metrics, "troupe_agents_unhealthy never showed it");
    // At 3 heartbeats the task is answered, long before the handler would return.
    assert_eq!(stuck.await, Outcome::Timeout);
    let answered = t.elapsed();
    assert!(
        answered < Duration::from_millis(1000),
        "answered after {answered:?}"
    );
    // The supervisor put a fresh instance in the slot: agent 0 serves again while the old
    // incarnation's thread is still blocked.
    let out = rt.try_submit(Task::new(AgentId(0), "again")).unwrap().await;
    assert_eq!(out, Outcome::Ok(Bytes::from("again")));
    assert!(
        t.elapsed() < Duration::from_millis(1900),
        "{:?}",
        t.elapsed()
    );
    let h = rt.health();
    assert_eq!(h.tiers[0].restarts, 1);
    assert_eq!(h.tiers[0].agents.running, 2);
    // The late return of the abandoned incarnation changes nothing.
    tokio::time::sleep(Duration::from_millis(1700)).await;
    assert_eq!(rt.stats().completed().timeout, 1);
    assert_eq!(rt.health().tiers[0].restarts, 1);
    assert!(
        rt.try_submit(Task::new(AgentId(0), "x"))
            .unwrap()
            .await
            .is_ok()
    );
    let report = rt.shutdown().await;
    assert_eq!(report.abandoned, 0);
}
