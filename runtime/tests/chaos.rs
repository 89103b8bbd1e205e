//! Chaos: thousands of tasks over many agents while handlers randomly panic, hang past their
//! timeout, fail or sleep, with bus traffic and retries, then shutdown. Every accepted task must
//! end with exactly one outcome, and the runtime's own counts must agree with what callers saw.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::start;
use troupe::{
    AgentId, Outcome, OutcomeKind, Priority, RetryPolicy, RuntimeConfig, Strategy, Task, TierConfig,
};

/// xorshift64*: deterministic, dependency-free randomness for a reproducible run.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_task_is_lost_or_answered_twice_under_chaos() {
    let config = RuntimeConfig::default()
        .tier(
            TierConfig::new("steady")
                .agents("s", 16)
                .strategy(Strategy::OneForOne)
                .intensity(10_000, Duration::from_secs(60)),
        )
        .tier(
            TierConfig::new("group")
                .agents("s", 16)
                .strategy(Strategy::OneForAll)
                .intensity(10_000, Duration::from_secs(60)),
        )
        .tier(
            TierConfig::new("chain")
                .agents("s", 32)
                .strategy(Strategy::RestForOne)
                .intensity(10_000, Duration::from_secs(60)),
        );
    let (rt, _) = start(config).await;
    let bus = rt.bus();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut handles = Vec::new();
    let mut refused = 0u64;
    for i in 0..4000u32 {
        let payload: &'static str = match rng.below(100) {
            0..=4 => "panic",
            5..=9 => "hang",
            10..=19 => "error",
            20..=49 => "sleep:1",
            _ => "ok",
        };
        let priority = Priority::ALL[rng.below(5) as usize];
        let mut task = Task::new("s", payload)
            .priority(priority)
            .timeout(Duration::from_millis(20));
        if rng.below(4) == 0 {
            task = task.retry(RetryPolicy::attempts(2, Duration::from_millis(1)));
        }
        if rng.below(10) == 0 {
            task = Task::new(AgentId(rng.below(64) as u32), payload).priority(priority);
            if payload == "hang" {
                // No timeout on these: they hang until shutdown cancels them.
                task = task.timeout(Duration::from_secs(3600));
            }
        }
        match rt.try_submit(task) {
            Ok(h) => handles.push(h),
            Err(_) => refused += 1,
        }
        if i % 10 == 0 {
            let _ = bus.try_send(AgentId(rng.below(64) as u32), "noise");
        }
        if i % 500 == 0 {
            tokio::task::yield_now().await;
        }
    }
    // Let the load reach every outcome before shutting down (without guessing how long that
    // takes on this machine).
    let probe = rt.handle();
    assert!(
        common::eventually(Duration::from_secs(30), || {
            let c = probe.stats().completed();
            c.panic > 0 && c.timeout > 0 && c.error > 0
        })
        .await,
        "the chaos load never produced every outcome: {:?}",
        probe.stats().completed()
    );
    let accepted = handles.len() as u64;
    let report = match tokio::time::timeout(
        Duration::from_secs(30),
        rt.shutdown_with(Duration::from_millis(500)),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => panic!("shutdown hung; health: {:#?}", probe.health()),
    };
    assert_eq!(report.abandoned, 0, "{report:?}");

    let mut seen = HashSet::new();
    let mut by_kind = [0u64; 5];
    for mut h in handles {
        let id = h.id();
        assert!(seen.insert(id), "task id {id} handed out twice");
        // Every handle is already resolved after shutdown.
        let outcome = h
            .try_outcome()
            .expect("every accepted task has an outcome after shutdown");
        by_kind[outcome.kind().index()] += 1;
        if let Outcome::Ok(b) = &outcome {
            assert!(!b.is_empty());
        }
    }
    assert_eq!(by_kind.iter().sum::<u64>(), accepted);
    assert!(by_kind[OutcomeKind::Panic.index()] > 0, "{by_kind:?}");
    assert!(by_kind[OutcomeKind::Timeout.index()] > 0, "{by_kind:?}");
    assert!(by_kind[OutcomeKind::Error.index()] > 0, "{by_kind:?}");
    assert!(by_kind[OutcomeKind::Cancelled.index()] > 0, "{by_kind:?}");

    // The runtime's counters agree with the callers, outcome by outcome.
    let stats = probe.stats();
    assert_eq!(stats.submitted(), accepted);
    let c = stats.completed();
    assert_eq!(
        [c.ok, c.error, c.timeout, c.panic, c.cancelled],
        by_kind,
        "runtime counts differ from what callers saw"
    );
    let rejected: u64 = stats
        .priorities
        .iter()
        .map(|p| p.rejected.queue_full + p.rejected.shutting_down + p.rejected.invalid)
        .sum();
    assert_eq!(rejected, refused);
    assert_eq!(stats.latency.count, accepted);
    assert_eq!(probe.outstanding(), 0);
}
