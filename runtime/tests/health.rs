//! Health and stats snapshots on a full 928-agent pool.

mod common;

use std::time::Duration;

use common::start;
use troupe::{Priority, RuntimeConfig, Task, TierConfig};

fn pool_928() -> RuntimeConfig {
    [
        ("cecca", 3),
        ("board", 15),
        ("executive", 25),
        ("stack_chief", 50),
        ("specialist", 200),
        ("micro", 635),
    ]
    .into_iter()
    .fold(RuntimeConfig::default(), |c, (name, n)| {
        c.tier(TierConfig::new(name).agents("s", n))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_every_tier_queue_and_readiness() {
    let (rt, _) = start(pool_928()).await;
    let h = rt.health();
    assert!(h.ready);
    assert!(h.reasons.is_empty());
    assert_eq!((h.agents, h.max_agents), (928, 928));
    let per_tier: Vec<(String, usize)> = h
        .tiers
        .iter()
        .map(|t| (t.name.clone(), t.agents.running))
        .collect();
    assert_eq!(
        per_tier,
        [
            ("cecca", 3),
            ("board", 15),
            ("executive", 25),
            ("stack_chief", 50),
            ("specialist", 200),
            ("micro", 635)
        ]
        .map(|(n, c)| (n.to_string(), c))
    );
    assert_eq!(h.tiers.iter().map(|t| t.startup.count).sum::<u64>(), 928);
    assert_eq!(h.queues.len(), 5);
    assert!(h.queues.iter().all(|q| q.depth == 0 && q.capacity > 0));
    // It serialises for the HTTP layer.
    let json = serde_json::to_value(&h).unwrap();
    assert_eq!(json["tiers"][5]["agents"]["running"], 635);
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_give_exact_counts_and_ordered_percentiles_per_priority() {
    let (rt, _) = start(pool_928()).await;
    let mut handles = Vec::new();
    for p in Priority::ALL {
        for i in 0..200 {
            // 8 of 200 (4 %) sleep 30 ms: p99 falls among them and p95 well clear of them, so a
            // fast handler delayed a few ms by a busy machine cannot move either.
            let payload = if i % 25 == 0 { "sleep:30" } else { "ok" };
            handles.push(rt.try_submit(Task::new("s", payload).priority(p)).unwrap());
        }
    }
    for h in handles {
        assert!(h.await.is_ok());
    }
    let s = rt.stats();
    for p in Priority::ALL {
        let ps = s.priority(p);
        assert_eq!(ps.submitted, 200);
        assert_eq!(ps.completed.ok, 200);
        for l in [ps.queue_wait, ps.handler, ps.latency] {
            assert_eq!(l.count, 200);
            assert!(
                l.p50_us <= l.p90_us
                    && l.p90_us <= l.p95_us
                    && l.p95_us <= l.p99_us
                    && l.p99_us <= l.p999_us
                    && l.p999_us <= l.max_us,
                "{l:?}"
            );
        }
        // The p99 handler time sees the sleepers, the p95 and the median do not.
        assert!(ps.handler.p99_us >= 30_000.0, "{:?}", ps.handler);
        assert!(ps.handler.p95_us < 30_000.0, "{:?}", ps.handler);
        assert!(ps.handler.p50_us < 30_000.0, "{:?}", ps.handler);
    }
    assert_eq!(s.latency.count, 1000);
    // Supervision per tier: every agent started once, nothing restarted.
    assert_eq!(s.tiers.len(), 6);
    assert_eq!(s.tiers.iter().map(|t| t.starts).sum::<u64>(), 928);
    assert!(
        s.tiers
            .iter()
            .all(|t| t.restarts == 0 && t.escalations == 0)
    );
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(json["tiers"][5]["name"], "micro");
    assert!(json["latency"]["p95_us"].as_f64().is_some());
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_count_restarts_and_escalations_per_tier() {
    let config = RuntimeConfig::default()
        .tier(TierConfig::new("steady").agents("s", 2))
        .tier(
            TierConfig::new("fragile")
                .agents("s", 1)
                .intensity(1, Duration::from_secs(60)),
        );
    let (rt, _) = start(config).await;
    let fragile = rt.health().tiers[1].name.clone();
    assert_eq!(fragile, "fragile");
    let agent = troupe::AgentId(2);
    // First crash: restarted within the tier's intensity (wait for the new incarnation).
    let _ = rt.try_submit(Task::new(agent, "panic")).unwrap().await;
    assert!(common::eventually(Duration::from_secs(5), || rt.stats().tiers[1].starts == 2).await);
    // Second crash within the period: past the intensity, so the tier escalates and the root
    // restarts it.
    let _ = rt.try_submit(Task::new(agent, "panic")).unwrap().await;
    assert!(
        common::eventually(Duration::from_secs(5), || {
            let t = &rt.stats().tiers[1];
            t.escalations == 1 && t.starts == 3
        })
        .await,
        "{:?}",
        rt.stats().tiers[1]
    );
    let s = rt.stats();
    assert_eq!((s.tiers[0].restarts, s.tiers[0].escalations), (0, 0));
    // One restart within the intensity, then the second crash escalates and the root
    // restarts the tier.
    assert_eq!(s.tiers[1].escalations, 1, "{:?}", s.tiers[1]);
    assert!(s.tiers[1].restarts >= 2, "{:?}", s.tiers[1]);
    rt.shutdown().await;
}
