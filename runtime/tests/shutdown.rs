//! Graceful shutdown: drain, cancel past the deadline, reverse stop order, no task lost.

mod common;

use std::time::Duration;

use common::start;
use troupe::{Outcome, OutcomeKind, RuntimeConfig, SubmitError, Task, TierConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_and_running_tasks_finish_within_the_drain() {
    let (rt, _) = start(RuntimeConfig::default().tier(TierConfig::new("t").agents("s", 4))).await;
    let handles: Vec<_> = (0..40)
        .map(|_| rt.try_submit(Task::new("s", "sleep:10")).unwrap())
        .collect();
    let report = rt.shutdown_with(Duration::from_secs(10)).await;
    assert_eq!(
        (report.drained, report.cancelled, report.abandoned),
        (40, 0, 0)
    );
    for h in handles {
        assert!(h.await.is_ok());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_drain_deadline_the_rest_is_cancelled() {
    let (rt, _) = start(RuntimeConfig::default().tier(TierConfig::new("t").agents("s", 2))).await;
    let running: Vec<_> = (0..2)
        .map(|_| rt.try_submit(Task::new("s", "hang")).unwrap())
        .collect();
    common::picked(&rt).await;
    let queued: Vec<_> = (0..10)
        .map(|_| rt.try_submit(Task::new("s", "x")).unwrap())
        .collect();
    let report = rt.shutdown_with(Duration::from_millis(30)).await;
    assert_eq!(
        (report.drained, report.cancelled, report.abandoned),
        (0, 12, 0)
    );
    for h in running.into_iter().chain(queued) {
        assert_eq!(h.await, Outcome::Cancelled);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_closes_and_agents_stop_in_reverse_start_order() {
    let config = RuntimeConfig::default()
        .tier(TierConfig::new("first").agents("s", 3))
        .tier(TierConfig::new("second").agents("s", 2));
    let (rt, events) = start(config).await;
    let handle = rt.handle();
    let slow = rt.try_submit(Task::new("s", "sleep:50")).unwrap();
    let stopping = tokio::spawn(rt.shutdown());
    assert!(common::eventually(Duration::from_secs(5), || !handle.health().ready).await);
    let r = handle.try_submit(Task::new("s", "late")).unwrap_err();
    assert_eq!(r.error, SubmitError::ShuttingDown);
    let r = handle
        .submit(Task::new("s", "late"), Duration::from_millis(5))
        .await
        .unwrap_err();
    assert_eq!(r.error, SubmitError::ShuttingDown);
    let h = handle.health();
    assert!(!h.ready);
    assert_eq!(h.reasons, ["shutting down"]);
    stopping.await.unwrap();
    assert!(slow.await.is_ok());
    let stops: Vec<String> = events
        .all()
        .into_iter()
        .filter(|e| e.starts_with("stop:"))
        .collect();
    assert_eq!(stops, ["stop:4", "stop:3", "stop:2", "stop:1", "stop:0"]);
    assert_eq!(
        handle
            .health()
            .tiers
            .iter()
            .map(|t| t.agents.stopped)
            .sum::<usize>(),
        5
    );
    let s = handle.stats();
    assert_eq!(
        s.priority(troupe::Priority::Normal).rejected.shutting_down,
        2
    );
    assert_eq!(s.completed().total(), s.submitted());
    let _ = OutcomeKind::ALL;
}

mod drain_rules {
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use troupe::{
        Agent, AgentContext, AgentId, BusError, Bytes, Outcome, Runtime, RuntimeConfig,
        ShutdownReport, SubmitError, Task, TaskError, TaskRequest, TierConfig,
    };

    fn adds_up(r: &ShutdownReport) {
        assert_eq!(
            r.drained + r.cancelled + r.abandoned,
            r.outstanding + r.admitted,
            "{r:?}"
        );
    }

    /// A planner asks a searcher over the bus, then submits a sub-task and awaits it.
    struct Planner;
    impl Agent for Planner {
        async fn handle(&mut self, t: TaskRequest, ctx: &AgentContext) -> Result<Bytes, TaskError> {
            let err = |e: &dyn std::fmt::Display| TaskError::new(e.to_string());
            let found = ctx
                .bus()
                .request_any("search", 1, t.payload.clone(), Duration::from_secs(5))
                .await
                .map_err(|e| err(&e))?;
            if found.replied() != 1 {
                return Err(TaskError::new(format!("no answer: {found:?}")));
            }
            let sub = ctx
                .runtime()
                .try_submit(Task::new("search", "sub"))
                .map_err(|r| err(&r.error))?;
            match sub.await {
                Outcome::Ok(b) => Ok(b),
                other => Err(TaskError::new(format!("sub-task: {other:?}"))),
            }
        }
    }

    struct Searcher;
    impl Agent for Searcher {
        async fn handle(&mut self, t: TaskRequest, _: &AgentContext) -> Result<Bytes, TaskError> {
            tokio::time::sleep(Duration::from_millis(1)).await;
            Ok(t.payload)
        }
        async fn on_message(&mut self, m: troupe::Message, _: &AgentContext) -> Option<Bytes> {
            m.is_request().then(|| m.payload.clone())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn during_the_drain_agents_still_talk_and_submit_sub_tasks_and_outsiders_are_refused() {
        let mut config = RuntimeConfig::default().tier(
            TierConfig::new("t")
                .agents("planner", 4)
                .agents("searcher", 4),
        );
        config.tiers[0].agents[1].capabilities = vec!["search".into()];
        let rt = Runtime::builder(config)
            .register("planner", |_spec| Planner)
            .register("searcher", |_spec| Searcher)
            .start()
            .await
            .unwrap();
        let handle = rt.handle();
        let planned: Vec<_> = (0..300)
            .map(|i| {
                rt.try_submit(Task::new("planner", format!("q{i}")))
                    .unwrap()
            })
            .collect();
        let stopping = tokio::spawn(rt.shutdown_with(Duration::from_secs(30)));
        // Once the drain has begun, outside callers are refused on both doors.
        assert!(crate::common::eventually(Duration::from_secs(5), || !handle.health().ready).await);
        let r = handle.try_submit(Task::new("search", "late")).unwrap_err();
        assert_eq!(r.error, SubmitError::ShuttingDown);
        assert_eq!(
            handle
                .bus()
                .request(AgentId(4), "late", Duration::from_secs(1))
                .await,
            Err(BusError::ShuttingDown)
        );
        let report = stopping.await.unwrap();
        for h in planned {
            assert_eq!(h.await, Outcome::Ok(Bytes::from("sub")));
        }
        adds_up(&report);
        assert_eq!(report.cancelled + report.abandoned, 0, "{report:?}");
        // Every planner task that had not submitted its sub-task before the drain did so during it.
        assert_eq!(report.outstanding + report.admitted, report.drained);
        assert!(report.admitted > 0, "{report:?}");
        assert_eq!(report.agents_left_running, 0);
    }

    /// `block` blocks the agent's thread until the test lets it go; `ms:N` blocks it N ms;
    /// `hang` awaits forever (cancellable).
    struct Stubborn {
        gate: Arc<Mutex<std::sync::mpsc::Receiver<()>>>,
    }
    impl Agent for Stubborn {
        async fn handle(&mut self, t: TaskRequest, _: &AgentContext) -> Result<Bytes, TaskError> {
            match &t.payload[..] {
                b"block" => {
                    let _ = self.gate.lock().unwrap().recv();
                }
                b"hang" => std::future::pending::<()>().await,
                p if p.starts_with(b"ms:") => {
                    let ms: u64 = std::str::from_utf8(&p[3..]).unwrap().parse().unwrap();
                    std::thread::sleep(Duration::from_millis(ms));
                }
                _ => {}
            }
            Ok(t.payload)
        }
    }

    async fn stubborn(stop_timeout: Duration) -> (Runtime, std::sync::mpsc::Sender<()>) {
        let mut config = RuntimeConfig::default().tier(TierConfig::new("t").agents("s", 2));
        config.shutdown.stop_timeout = stop_timeout;
        let (release, gate) = std::sync::mpsc::channel();
        let gate = Arc::new(Mutex::new(gate));
        let rt = Runtime::builder(config)
            .register("s", move |_spec| Stubborn { gate: gate.clone() })
            .start()
            .await
            .unwrap();
        (rt, release)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_handler_that_never_gives_its_thread_back_is_abandoned_by_the_deadline() {
        let (rt, release) = stubborn(Duration::from_millis(200)).await;
        let blocked = rt.try_submit(Task::new(AgentId(0), "block")).unwrap();
        let hung = rt.try_submit(Task::new(AgentId(1), "hang")).unwrap();
        crate::common::picked(&rt).await;
        let queued: Vec<_> = (0..3)
            .map(|_| rt.try_submit(Task::new(AgentId(1), "x")).unwrap())
            .collect();
        let started = Instant::now();
        let report = rt.shutdown_with(Duration::from_millis(100)).await;
        // It returned although one handler still holds its thread (it would hold it forever).
        assert!(started.elapsed() < Duration::from_secs(10), "{report:?}");
        adds_up(&report);
        assert_eq!(
            (
                report.outstanding,
                report.drained,
                report.cancelled,
                report.abandoned
            ),
            (5, 0, 4, 1),
            "{report:?}"
        );
        assert_eq!(report.agents_left_running, 1);
        // "Abandoned" tasks did get their outcome: `cancelled`, at the deadline.
        assert_eq!(blocked.await, Outcome::Cancelled);
        assert_eq!(hung.await, Outcome::Cancelled);
        for h in queued {
            assert_eq!(h.await, Outcome::Cancelled);
        }
        // Its late result, once the thread comes free, changes nothing.
        release.send(()).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_handler_that_blocks_past_the_drain_but_ends_within_the_stop_timeout_counts_as_drained()
     {
        let (rt, _release) = stubborn(Duration::from_secs(5)).await;
        let slow = rt.try_submit(Task::new(AgentId(0), "ms:300")).unwrap();
        crate::common::picked(&rt).await;
        let report = rt.shutdown_with(Duration::from_millis(20)).await;
        adds_up(&report);
        assert_eq!(
            (
                report.outstanding,
                report.drained,
                report.cancelled,
                report.abandoned
            ),
            (1, 1, 0, 0),
            "{report:?}"
        );
        assert_eq!(slow.await, Outcome::Ok(Bytes::from("ms:300")));
    }
}
