//! The liveness watchdog: a handler that blocks its thread past its deadline is marked
//! unhealthy, its task ends as `timeout`, and its supervisor replaces the agent.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use troupe::{
    Agent, AgentContext, AgentId, AgentSpec, MetricsExporter, Outcome, Runtime, RuntimeConfig,
    Task, TaskError, TaskRequest, TierConfig,
};

/// `block` blocks the thread (no await point, so its timeout cannot fire) until the test
/// releases it, and counts its return; else echoes.
struct Blocker {
    gate: Arc<std::sync::Mutex<std::sync::mpsc::Receiver<()>>>,
    returned: Arc<AtomicUsize>,
}

impl Agent for Blocker {
    async fn handle(&mut self, task: TaskRequest, _: &AgentContext) -> Result<Bytes, TaskError> {
        if &task.payload[..] == b"block" {
            let _ = self.gate.lock().unwrap().recv();
            self.returned.fetch_add(1, Ordering::SeqCst);
        }
        Ok(task.payload)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn a_handler_stuck_past_its_deadline_is_timed_out_and_its_agent_replaced() {
    let mut config = RuntimeConfig::default().tier(TierConfig::new("t").agents("b", 2));
    config.liveness.heartbeat = Duration::from_millis(100);
    let (release, gate) = std::sync::mpsc::channel::<()>();
    let gate = Arc::new(std::sync::Mutex::new(gate));
    let returned = Arc::new(AtomicUsize::new(0));
    let r = returned.clone();
    let rt = Runtime::builder(config)
        .register("b", move |_: &AgentSpec| Blocker {
            gate: gate.clone(),
            returned: r.clone(),
        })
        .start()
        .await
        .unwrap();
    let exporter = MetricsExporter::new(&rt.handle());
    let stuck = rt
        .try_submit(Task::new(AgentId(0), "block").timeout(Duration::from_millis(50)))
        .unwrap();
    // Warning after 2 heartbeats past the deadline: health and the gauge show it.
    let shown = |rt: &Runtime| {
        rt.health().tiers[0].unhealthy == 1
            && exporter
                .render()
                .lines()
                .any(|l| l == "troupe_agents_unhealthy{tier=\"t\"} 1")
    };
    let mut seen = false;
    for _ in 0..20_000 {
        if shown(&rt) {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(
        seen,
        "health and troupe_agents_unhealthy never showed the agent"
    );
    // At 3 heartbeats the task is answered, while the handler still blocks its thread.
    assert_eq!(stuck.await, Outcome::Timeout);
    assert_eq!(returned.load(Ordering::SeqCst), 0);
    // The supervisor put a fresh instance in the slot: agent 0 serves again while the old
    // incarnation's thread is still blocked.
    let out = rt.try_submit(Task::new(AgentId(0), "again")).unwrap().await;
    assert_eq!(out, Outcome::Ok(Bytes::from("again")));
    assert_eq!(returned.load(Ordering::SeqCst), 0);
    let h = rt.health();
    assert_eq!(h.tiers[0].restarts, 1);
    assert_eq!(h.tiers[0].agents.running, 2);
    // The late return of the abandoned incarnation changes nothing.
    release.send(()).unwrap();
    assert!(
        common_eventually(|| returned.load(Ordering::SeqCst) == 1).await,
        "the blocked handler returned"
    );
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

async fn common_eventually(mut f: impl FnMut() -> bool) -> bool {
    for _ in 0..20_000 {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    f()
}
