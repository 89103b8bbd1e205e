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
    tokio::time::sleep(Duration::from_millis(10)).await;
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
    tokio::time::sleep(Duration::from_millis(10)).await;
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
