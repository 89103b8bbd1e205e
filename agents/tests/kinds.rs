//! The built-in kinds on a running pool.

use std::time::{Duration, Instant};

use bytes::Bytes;
use troupe::{AgentId, Outcome, RuntimeConfig, Task, TierConfig};

fn catalogue(text: &str) -> troupe_agents::Catalogue {
    troupe_agents::Catalogue::from_toml_str(text).unwrap()
}

async fn start(text: &str) -> troupe::Runtime {
    troupe_agents::builder(&catalogue(text), RuntimeConfig::default())
        .start()
        .await
        .unwrap()
}

fn ok(out: Outcome) -> Bytes {
    match out {
        Outcome::Ok(b) => b,
        other => panic!("expected ok, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_fans_out_to_100_agents_and_gathers_every_reply() {
    let rt = start(
        "[[tiers]]\nname = \"r\"\n[[tiers.agents]]\nkind = \"router\"\ncount = 1\n\
         [[tiers]]\nname = \"w\"\n[[tiers.agents]]\nkind = \"echo\"\ncount = 100",
    )
    .await;
    let out = ok(rt
        .try_submit(Task::new("router", "echo:ping"))
        .unwrap()
        .await);
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["asked"], 100);
    assert_eq!(v["replied"], 100);
    assert_eq!(v["replies"].as_array().unwrap().len(), 100);
    assert!(v["replies"].as_array().unwrap().iter().all(|r| r == "ping"));
    // A limited fan-out, and a bad target.
    let out = ok(rt
        .try_submit(Task::new("router", "echo*7:x"))
        .unwrap()
        .await);
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["replied"], 7);
    let out = rt.try_submit(Task::new("router", "ghost:x")).unwrap().await;
    assert!(matches!(out, Outcome::Error(e) if e.0.contains("no agent has capability `ghost`")));
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compute_is_deterministic_and_its_cost_is_tunable() {
    let rt = start(
        "[[tiers]]\nname = \"c\"\n[[tiers.agents]]\nkind = \"compute\"\ncount = 2\nparams = { rounds = 10 }",
    )
    .await;
    let a = ok(rt.try_submit(Task::new("compute", "data")).unwrap().await);
    let b = ok(rt
        .try_submit(Task::new("compute", "10|data"))
        .unwrap()
        .await);
    let c = ok(rt
        .try_submit(Task::new("compute", "11|data"))
        .unwrap()
        .await);
    assert_eq!(a, b, "params.rounds = 10 and an explicit 10| agree");
    assert_ne!(b, c);
    assert_eq!(a.len(), 16);
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_waits_its_latency_and_fails_at_its_rate() {
    let rt = start(
        "[[tiers]]\nname = \"i\"\n[[tiers.agents]]\nkind = \"io\"\ncount = 50\nparams = { latency_ms = 30 }",
    )
    .await;
    let t = Instant::now();
    let handles: Vec<_> = (0..50)
        .map(|_| rt.try_submit(Task::new("io", "x")).unwrap())
        .collect();
    for h in handles {
        assert_eq!(ok(h.await), Bytes::from("x"));
    }
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(30), "{took:?}");
    assert!(
        took < Duration::from_secs(2),
        "50 agents wait concurrently: {took:?}"
    );
    let handles: Vec<_> = (0..200)
        .map(|_| {
            rt.try_submit(Task::new("io", "latency=0,fail=0.5"))
                .unwrap()
        })
        .collect();
    let mut failed = 0;
    for h in handles {
        if let Outcome::Error(e) = h.await {
            assert!(e.0.contains("simulated upstream failure"));
            failed += 1;
        }
    }
    assert!(
        (50..150).contains(&failed),
        "{failed} of 200 failed at rate 0.5"
    );
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aggregator_summarises_its_topic() {
    let rt = start(
        "[[tiers]]\nname = \"a\"\n[[tiers.agents]]\nkind = \"aggregator\"\ncount = 1\nparams = { topic = \"news\", window = 3 }",
    )
    .await;
    let bus = rt.bus();
    for m in ["a", "bb", "ccc", "dddd"] {
        assert_eq!(bus.publish("news", m).await.unwrap().delivered, 1);
    }
    let reply = bus
        .request(AgentId(0), "summary?", Duration::from_secs(1))
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&reply).unwrap();
    assert_eq!(v["messages"], 4);
    assert_eq!(v["bytes"], 10);
    assert_eq!(v["window"], 3);
    assert_eq!(v["recent_bytes"], 9);
    assert_eq!(v["last"], "dddd");
    let via_task = ok(rt.try_submit(Task::new("aggregator", "")).unwrap().await);
    assert_eq!(via_task, reply);
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_pool_starts_serves_every_tier_and_runs_sandboxed_compute() {
    let rt = troupe_agents::start_default_pool().await.unwrap();
    let h = rt.health();
    assert!(h.ready);
    assert_eq!(h.agents, 928);
    for cap in [
        "orchestrate",
        "report",
        "review",
        "decide",
        "coordinate",
        "llm",
        "analyze",
        "reply",
        "fetch",
        "hash",
    ] {
        let payload = if cap == "orchestrate" || cap == "review" {
            "reply*3:hi"
        } else {
            "latency=1"
        };
        let out = rt.try_submit(Task::new(cap, payload)).unwrap().await;
        assert!(out.is_ok(), "{cap}: {out:?}");
    }
    let v = rt
        .run_sandboxed(Task::new("compute", "1000|vote"))
        .await
        .unwrap();
    assert_eq!(v.output.len(), 16);
    rt.shutdown().await;
    let _ = TierConfig::new("unused");
}
