//! The admission gate: submissions racing a shutdown are either refused or end with an outcome;
//! none is queued after the drain has counted what is outstanding.

mod common;

use std::time::Duration;

use troupe::{RuntimeConfig, SubmitError, Task, TierConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submissions_racing_a_shutdown_are_refused_or_answered_never_stranded() {
    let config = RuntimeConfig::default().tier(TierConfig::new("t").agents("w", 4));
    let (rt, _) = common::start(config).await;
    let submitters: Vec<_> = (0..3)
        .map(|_| {
            let h = rt.handle();
            tokio::spawn(async move {
                let mut handles = Vec::new();
                loop {
                    match h.try_submit(Task::new("w", "sleep:1")) {
                        Ok(handle) => handles.push(handle),
                        Err(r) if r.error == SubmitError::ShuttingDown => return handles,
                        Err(_) => tokio::task::yield_now().await,
                    }
                }
            })
        })
        .collect();
    // Shut down while the submitters are mid-flight (some tasks accepted, more coming).
    let probe = rt.handle();
    assert!(common::eventually(Duration::from_secs(10), || probe.stats().submitted() >= 100).await);
    let report = rt.shutdown_with(Duration::from_millis(20)).await;

    let mut accepted = 0u64;
    for s in submitters {
        for handle in s.await.unwrap() {
            accepted += 1;
            tokio::time::timeout(Duration::from_secs(5), handle)
                .await
                .expect("an accepted task is answered, even one admitted as shutdown began");
        }
    }
    assert!(accepted > 0);
    let stats = probe.stats();
    assert_eq!(stats.submitted(), accepted);
    assert_eq!(stats.completed().total(), accepted);
    assert_eq!(report.abandoned, 0);
    assert_eq!(probe.outstanding(), 0);
}
