//! The supervision tree: strategies, restart policies, intensity, backoff and escalation.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{eventually, start};
use troupe::{
    AgentId, IntensityConfig, Outcome, RestartPolicy, RuntimeConfig, Strategy, Task, TierConfig,
};

fn tier(n: usize, strategy: Strategy) -> TierConfig {
    TierConfig::new("t")
        .agents("s", n)
        .strategy(strategy)
        .backoff(Duration::from_millis(1), Duration::from_millis(5))
}

async fn crash(rt: &troupe::Runtime, agent: u32) {
    let out = rt
        .try_submit(Task::new(AgentId(agent), "panic"))
        .unwrap()
        .await;
    assert!(matches!(out, Outcome::Panic(_)), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_for_one_rebuilds_only_the_crashed_agent() {
    let (rt, events) = start(RuntimeConfig::default().tier(tier(4, Strategy::OneForOne))).await;
    // Agent 1 is mid-task while agent 2 crashes: it must not notice.
    let busy = rt.try_submit(Task::new(AgentId(1), "sleep:50")).unwrap();
    crash(&rt, 2).await;
    assert!(
        eventually(Duration::from_secs(2), || events
            .count("restart:2:panicked: scripted panic")
            == 1)
        .await
    );
    assert_eq!(busy.await, Outcome::Ok(Bytes::from("sleep:50")));
    assert_eq!(events.count("stop:"), 0);
    assert_eq!(events.count("restart:"), 1);
    // The rebuilt agent works.
    let out = rt.try_submit(Task::new(AgentId(2), "who")).unwrap().await;
    assert_eq!(out, Outcome::Ok(Bytes::from("2")));
    assert_eq!(rt.health().tiers[0].restarts, 1);
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_for_all_stops_the_siblings_in_reverse_and_restarts_all_in_order() {
    let (rt, events) = start(RuntimeConfig::default().tier(tier(3, Strategy::OneForAll))).await;
    crash(&rt, 1).await;
    assert!(eventually(Duration::from_secs(2), || events.count("restart:") == 3).await);
    let after: Vec<String> = events.all().into_iter().skip(3).collect(); // skip initial starts
    let stops: Vec<&String> = after.iter().filter(|e| e.starts_with("stop:")).collect();
    assert_eq!(stops, ["stop:2", "stop:0"]);
    let starts: Vec<&String> = after.iter().filter(|e| e.starts_with("start:")).collect();
    assert_eq!(starts, ["start:0", "start:1", "start:2"]);
    assert!(after.contains(&"restart:1:panicked: scripted panic".to_string()));
    assert!(after.contains(&"restart:0:stopped".to_string()));
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_for_one_restarts_the_crashed_agent_and_those_started_after_it() {
    let (rt, events) = start(RuntimeConfig::default().tier(tier(4, Strategy::RestForOne))).await;
    crash(&rt, 1).await;
    assert!(eventually(Duration::from_secs(2), || events.count("restart:") == 3).await);
    let after: Vec<String> = events.all().into_iter().skip(4).collect();
    let stops: Vec<&String> = after.iter().filter(|e| e.starts_with("stop:")).collect();
    assert_eq!(stops, ["stop:3", "stop:2"]);
    let starts: Vec<&String> = after.iter().filter(|e| e.starts_with("start:")).collect();
    assert_eq!(starts, ["start:1", "start:2", "start:3"]);
    assert!(
        !after.iter().any(|e| e.ends_with(":0")),
        "agent 0 untouched: {after:?}"
    );
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temporary_children_stay_down_and_transient_ones_come_back() {
    let config = RuntimeConfig::default()
        .tier(tier(2, Strategy::OneForOne).restart(RestartPolicy::Temporary))
        .tier(
            TierConfig::new("tr")
                .agents("s", 2)
                .restart(RestartPolicy::Transient),
        );
    let (rt, events) = start(config).await;
    crash(&rt, 0).await;
    crash(&rt, 2).await;
    assert!(eventually(Duration::from_secs(2), || events.count("restart:2") == 1).await);
    let h = rt.health();
    assert_eq!(h.tiers[0].agents.stopped, 1);
    assert_eq!(h.tiers[0].agents.running, 1);
    assert_eq!(h.tiers[1].agents.running, 2);
    assert_eq!(events.count("restart:0"), 0);
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_back_off_exponentially() {
    let config = RuntimeConfig::default().tier(
        TierConfig::new("t")
            .agents("s", 1)
            .backoff(Duration::from_millis(40), Duration::from_secs(1))
            .intensity(10, Duration::from_secs(60)),
    );
    let (rt, _) = start(config).await;
    let mut gaps = Vec::new();
    for _ in 0..3 {
        crash(&rt, 0).await;
        let t = Instant::now();
        assert!(
            eventually(Duration::from_millis(50), || rt.health().tiers[0]
                .agents
                .restarting
                == 1)
            .await
        );
        let out = rt.try_submit(Task::new(AgentId(0), "x")).unwrap().await;
        assert!(out.is_ok());
        gaps.push(t.elapsed());
    }
    // 40 ms, 80 ms, 160 ms.
    assert!(gaps[0] >= Duration::from_millis(40), "{gaps:?}");
    assert!(gaps[1] >= Duration::from_millis(80), "{gaps:?}");
    assert!(gaps[2] >= Duration::from_millis(160), "{gaps:?}");
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_storm_escalates_to_the_root_which_restarts_the_tier_then_gives_up() {
    let mut config = RuntimeConfig::default()
        .tier(tier(2, Strategy::OneForOne).intensity(2, Duration::from_secs(60)))
        .tier(TierConfig::new("healthy").agents("s", 1));
    config.root = IntensityConfig {
        max_restarts: 1,
        period: Duration::from_secs(60),
    };
    let (rt, events) = start(config).await;
    // Three crashes within the period: the third exceeds max_restarts = 2.
    for _ in 0..3 {
        crash(&rt, 0).await;
        assert!(
            eventually(Duration::from_secs(2), || rt.health().tiers[0]
                .agents
                .running
                == 2)
            .await
        );
    }
    assert!(
        eventually(Duration::from_secs(2), || rt.health().tiers[0].escalations
            == 1)
        .await
    );
    // The root restarted the whole tier: both agents, and the runtime is still ready.
    let h = rt.health();
    assert!(h.ready, "{:?}", h.reasons);
    assert!(events.count("restart:1") >= 1);
    // Another storm: the root's own limit (1 tier restart) is spent.
    for _ in 0..3 {
        crash(&rt, 1).await;
        assert!(
            eventually(Duration::from_secs(2), || {
                let t = &rt.health().tiers[0];
                t.escalations == 2 || t.agents.running == 2
            })
            .await
        );
    }
    assert!(eventually(Duration::from_secs(2), || !rt.health().ready).await);
    let h = rt.health();
    assert!(h.tiers[0].failed);
    assert_eq!(h.tiers[0].agents.stopped, 2);
    assert_eq!(h.reasons.len(), 1);
    assert!(
        h.reasons[0].contains("tier `t` exceeded its restart intensity"),
        "{:?}",
        h.reasons
    );
    // The other tier is unaffected.
    assert_eq!(h.tiers[1].agents.running, 1);
    assert!(
        rt.try_submit(Task::new(AgentId(2), "x"))
            .unwrap()
            .await
            .is_ok()
    );
    // Work for the dead tier is refused at once: nobody would ever take it.
    let refused = rt.try_submit(Task::new(AgentId(0), "x")).unwrap_err();
    assert!(matches!(refused.error, troupe::SubmitError::Unavailable(_)));
    let report = rt.shutdown_with(Duration::from_millis(20)).await;
    assert_eq!(report.outstanding, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_factory_is_a_start_error() {
    struct Never;
    impl troupe::AgentFactory for Never {
        type Agent = common::Scripted;
        fn build(&self, _: &troupe::AgentSpec) -> Result<common::Scripted, troupe::AgentError> {
            Err(troupe::AgentError::new("no model weights"))
        }
    }
    let config = RuntimeConfig::default().tier(TierConfig::new("t").agents("s", 2));
    let err = troupe::Runtime::builder(config)
        .register_factory("s", Never)
        .start()
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "agent 0 (kind `s`) failed to start: failed to start: no model weights"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_kinds_and_oversized_pools_are_config_errors_at_start() {
    let config = RuntimeConfig::default().tier(TierConfig::new("t").agents("ghost", 1));
    let err = troupe::Runtime::builder(config).start().await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "config field `tiers[0].agents[0].kind` names agent kind `ghost`, which is not registered"
    );
    let config = RuntimeConfig::default().tier(TierConfig::new("t").agents("s", 929));
    let err = troupe::Runtime::builder(config)
        .register("s", |_: &troupe::AgentSpec| common::Scripted {
            id: 0,
            events: Default::default(),
        })
        .start()
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "the tiers ask for 929 agents but the pool limit (`max_agents`) is 928"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sibling_stuck_in_a_task_is_cancelled_after_the_stop_timeout() {
    let mut config = RuntimeConfig::default().tier(tier(2, Strategy::OneForAll));
    config.shutdown.stop_timeout = Duration::from_millis(50);
    let (rt, events) = start(config).await;
    let stuck = rt
        .try_submit(Task::new(AgentId(0), "hang").timeout(Duration::from_secs(3600)))
        .unwrap();
    common::picked(&rt).await;
    let t = Instant::now();
    crash(&rt, 1).await;
    // Agent 0 is stopped for the group restart; its endless task is cancelled, not waited for.
    assert_eq!(stuck.await, Outcome::Cancelled);
    assert!(t.elapsed() >= Duration::from_millis(50));
    assert!(eventually(Duration::from_secs(2), || events.count("restart:") == 2).await);
    assert!(
        rt.try_submit(Task::new(AgentId(0), "x"))
            .unwrap()
            .await
            .is_ok()
    );
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tier_the_root_gave_up_on_holds_no_capacity() {
    // The fragile tier escalates on its first crash and the root has no restarts to give.
    let mut config = RuntimeConfig::default()
        .tier(
            TierConfig::new("fragile")
                .agents("f", 1)
                .intensity(0, Duration::from_secs(60)),
        )
        .tier(TierConfig::new("healthy").agents("h", 1));
    config.root = IntensityConfig {
        max_restarts: 0,
        period: Duration::from_secs(60),
    };
    config.liveness.heartbeat = Duration::from_millis(20);
    config.queues.capacity = troupe::PerPriority([16; 5]);
    let (rt, _) = start(config).await;
    // Block the fragile agent, queue work behind it, then crash it.
    let blocker = rt.try_submit(Task::new("f", "sleep:100")).unwrap();
    common::picked(&rt).await;
    let queued: Vec<_> = (0..2)
        .map(|_| rt.try_submit(Task::new("f", "x")).unwrap())
        .collect();
    let crash = rt.try_submit(Task::new(AgentId(0), "panic")).unwrap();
    assert!(blocker.await.is_ok());
    let _ = crash.await;
    assert!(eventually(Duration::from_secs(5), || rt.health().tiers[0].failed).await);
    // What was queued for it is answered at once, not left to hold queue room until shutdown.
    for h in queued {
        match tokio::time::timeout(Duration::from_secs(5), h).await {
            Ok(Outcome::Error(e)) => assert!(e.0.contains("no live agent"), "{e}"),
            other => panic!("queued task for a dead tier: {other:?}"),
        }
    }
    assert_eq!(
        rt.health().queues[troupe::Priority::Normal.index()].depth,
        0
    );
    // New work for it is refused at admission with the reason; healthy work is not.
    let r = rt.try_submit(Task::new("f", "x")).unwrap_err();
    assert!(
        matches!(r.error, troupe::SubmitError::Unavailable(ref t) if t.contains("`f`")),
        "{:?}",
        r.error
    );
    assert_eq!(
        rt.stats()
            .priority(troupe::Priority::Normal)
            .rejected
            .unavailable,
        1
    );
    for _ in 0..8 {
        assert!(rt.try_submit(Task::new("h", "x")).unwrap().await.is_ok());
    }
    rt.shutdown().await;
}
