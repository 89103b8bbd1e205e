//! The tri-sandbox stays bounded when a lane falls behind: a slow lane's backlog is capped and
//! the work the vote no longer needs is skipped, and a lane whose threads keep getting stuck is
//! taken out (and says so in health) instead of spawning threads without end.

mod common;

use std::time::Duration;

use troupe::sandbox::{Lane, LaneMode, SandboxKindConfig};
use troupe::{
    Agent, AgentContext, Bytes, Runtime, RuntimeConfig, Task, TaskError, TaskRequest, TierConfig,
};

/// Blocks the thread of lane C until the test opens the gate (`stuck`), or makes lane C take
/// 20 ms a job (`lag`); every other lane answers at once.
struct Lagging;

static GATE: (std::sync::Mutex<bool>, std::sync::Condvar) =
    (std::sync::Mutex::new(false), std::sync::Condvar::new());

impl Agent for Lagging {
    async fn handle(&mut self, t: TaskRequest, ctx: &AgentContext) -> Result<Bytes, TaskError> {
        if ctx.lane() == Some(Lane::C) {
            match &t.payload[..] {
                b"lag" => tokio::time::sleep(Duration::from_millis(20)).await,
                b"stuck" => {
                    let mut open = GATE.0.lock().unwrap();
                    while !*open {
                        open = GATE.1.wait(open).unwrap();
                    }
                }
                _ => {}
            }
        }
        Ok(Bytes::from("answer"))
    }
}

async fn start(configure: impl FnOnce(&mut RuntimeConfig)) -> Runtime {
    let mut config = RuntimeConfig::default().tier(TierConfig::new("t").agents("lag", 1));
    config.sandbox.lane_timeout = Duration::from_millis(200);
    config.sandbox.kinds = vec![SandboxKindConfig {
        kind: "lag".into(),
        lanes: LaneMode::Threads,
        instances: 1,
    }];
    configure(&mut config);
    Runtime::builder(config)
        .register("lag", |_spec| Lagging)
        .start()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_lane_neither_queues_without_bound_nor_runs_work_nobody_awaits() {
    let rt = start(|c| c.sandbox.lane_queue = 16).await;
    // 300 tasks one after another: A and B answer each at once, C needs 20 ms a job, so C
    // falls behind by a job per task.
    for _ in 0..300 {
        let out = rt
            .try_submit(Task::new("lag", "lag").sandboxed())
            .unwrap()
            .await;
        assert!(out.is_ok(), "A and B agree on every task: {out:?}");
    }
    let done = |rt: &Runtime| {
        let s = rt.stats().sandbox;
        ["ok", "skipped", "unavailable", "timeout"]
            .iter()
            .map(|k| s.executions(Lane::C, k))
            .sum::<u64>()
    };
    assert!(common::eventually(Duration::from_secs(20), || done(&rt) == 300).await);
    let s = rt.stats().sandbox;
    let (ran, skipped, refused) = (
        s.executions(Lane::C, "ok") + s.executions(Lane::C, "timeout"),
        s.executions(Lane::C, "skipped"),
        s.executions(Lane::C, "unavailable"),
    );
    // Its queue never took more than 16 at a time, and what waited there after the vote was
    // skipped rather than run: C ran a small part of the 300.
    assert!(
        refused > 0,
        "the lane queue was bounded: {ran} ran, {skipped} skipped"
    );
    assert!(
        skipped > 0,
        "decided jobs in a backlog are skipped: {ran} ran, {refused} refused"
    );
    assert!(ran < 100, "lane C ran {ran} jobs nobody awaited");
    // A skipped lane is not a dissenter (a refused one failed to answer, which is).
    assert_eq!(s.lanes[Lane::C.index()].dissent, refused);
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_whose_threads_keep_getting_stuck_is_taken_out_and_says_so() {
    let rt = start(|c| c.sandbox.max_stuck_threads = 2).await;
    // Each stuck job blocks lane C's thread; the unifier times it out and starts a new thread,
    // until two are stuck.
    for i in 1..=2 {
        let v = rt.run_sandboxed(Task::new("lag", "stuck")).await.unwrap();
        assert_eq!(v.agreed, [Lane::A, Lane::B]);
        assert!(
            common::eventually(Duration::from_secs(10), || {
                rt.stats().sandbox.executions(Lane::C, "timeout") == i
            })
            .await
        );
    }
    assert!(
        common::eventually(Duration::from_secs(10), || {
            rt.health()
                .reasons
                .iter()
                .any(|r| r.contains("sandbox lane C is unavailable"))
        })
        .await,
        "{:?}",
        rt.health().reasons
    );
    assert!(!rt.health().ready);
    // Out of threads, the lane answers `unavailable` at once; A and B still decide.
    let before = rt.stats().sandbox.executions(Lane::C, "unavailable");
    let v = rt.run_sandboxed(Task::new("lag", "x")).await.unwrap();
    assert_eq!(v.agreed, [Lane::A, Lane::B]);
    assert_eq!(
        rt.stats().sandbox.executions(Lane::C, "unavailable"),
        before + 1
    );
    // Once the stuck handlers come back, the lane recovers.
    *GATE.0.lock().unwrap() = true;
    GATE.1.notify_all();
    assert!(
        common::eventually(Duration::from_secs(10), || rt.health().ready).await,
        "{:?}",
        rt.health().reasons
    );
    let v = rt.run_sandboxed(Task::new("lag", "x")).await.unwrap();
    assert_eq!(v.agreed.len(), 2);
    assert!(
        common::eventually(Duration::from_secs(5), || rt.stats().sandbox.unanimous >= 1).await,
        "lane C votes again"
    );
    rt.shutdown().await;
}
