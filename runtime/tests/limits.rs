//! Upstream limits: a kind whose upstream answers "rate limited, retry after N ms" above a
//! rate slows down without failing its tasks; a configured rate keeps it under the upstream's
//! limit; a concurrency limit caps how many run at once; and a task whose deadline passes while
//! its upstream keeps refusing ends `timeout`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use troupe::{
    Agent, AgentContext, AgentSpec, Bytes, KindLimit, Outcome, Runtime, RuntimeConfig, Task,
    TaskError, TaskRequest, TierConfig,
};

/// An upstream that allows `per_window` calls per 100 ms window and refuses the rest with a
/// retry-after of `retry_ms`.
#[derive(Default)]
struct Upstream {
    window: Mutex<(Option<Instant>, usize)>,
    per_window: usize,
    retry_ms: u64,
    refused: AtomicUsize,
    served: AtomicUsize,
    busy: AtomicUsize,
    peak: AtomicUsize,
}

impl Upstream {
    fn call(&self) -> bool {
        let mut w = self.window.lock().unwrap();
        let now = Instant::now();
        if w.0
            .is_none_or(|start| now - start >= Duration::from_millis(100))
        {
            *w = (Some(now), 0);
        }
        if w.1 < self.per_window {
            w.1 += 1;
            self.served.fetch_add(1, Ordering::AcqRel);
            true
        } else {
            self.refused.fetch_add(1, Ordering::AcqRel);
            false
        }
    }
}

struct Api(Arc<Upstream>);

impl Agent for Api {
    async fn handle(&mut self, task: TaskRequest, ctx: &AgentContext) -> Result<Bytes, TaskError> {
        let now = self.0.busy.fetch_add(1, Ordering::AcqRel) + 1;
        self.0.peak.fetch_max(now, Ordering::AcqRel);
        tokio::time::sleep(Duration::from_millis(5)).await;
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
        if self.0.call() {
            Ok(task.payload)
        } else {
            let after = Duration::from_millis(self.0.retry_ms);
            Err(ctx.retry_after(after, "rate limited"))
        }
    }
}

async fn start(upstream: &Arc<Upstream>, limit: Option<KindLimit>) -> Runtime {
    let mut config = RuntimeConfig::default().tier(TierConfig::new("t").agents("api", 6));
    config.limits.extend(limit);
    let u = upstream.clone();
    Runtime::builder(config)
        .register("api", move |_: &AgentSpec| Api(u.clone()))
        .start()
        .await
        .unwrap()
}

fn limit(kind: &str, rate: Option<f64>, concurrency: Option<usize>) -> KindLimit {
    KindLimit {
        kind: kind.into(),
        rate,
        burst: 1,
        concurrency,
    }
}

fn upstream(per_window: usize, retry_ms: u64) -> Arc<Upstream> {
    Arc::new(Upstream {
        per_window,
        retry_ms,
        ..Upstream::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_says_retry_after_slows_the_kind_and_fails_no_task() {
    let up = upstream(5, 100);
    let rt = start(&up, None).await;
    let began = Instant::now();
    let handles: Vec<_> = (0..40)
        .map(|i| {
            rt.try_submit(Task::new("api", format!("{i}")).timeout(Duration::from_secs(30)))
                .unwrap()
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(h.await, Outcome::Ok(Bytes::from(i.to_string())));
    }
    assert_eq!(up.served.load(Ordering::Acquire), 40);
    let refused = up.refused.load(Ordering::Acquire);
    assert!(refused > 0, "the upstream was pushed past its limit");
    // Each refusal pauses the whole kind for 100 ms: an agent refused once waits the pause out
    // before its next call, so a window of the upstream sees at most one refusal per agent
    // (those already mid-call when the pause began), and the 8 windows the 40 calls need are
    // waited for, not spun through.
    let windows = 40 / 5;
    assert!(refused <= 6 * (windows + 1), "{refused} refusals");
    assert!(
        began.elapsed() >= Duration::from_millis(100 * (windows as u64 - 1)),
        "{:?}",
        began.elapsed()
    );
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_rate_keeps_the_kind_under_its_upstream() {
    // The upstream allows 5 per 100 ms (50/s); the kind is held to 20/s.
    let up = upstream(5, 100);
    let held = limit("api", Some(20.0), None);
    let rt = start(&up, Some(held)).await;
    let began = Instant::now();
    let handles: Vec<_> = (0..20)
        .map(|_| rt.try_submit(Task::new("api", "x")).unwrap())
        .collect();
    for h in handles {
        assert!(matches!(h.await, Outcome::Ok(_)));
    }
    assert_eq!(up.refused.load(Ordering::Acquire), 0);
    // 20 turns at 20/s: the last starts about 950 ms after the first.
    assert!(
        began.elapsed() >= Duration::from_millis(900),
        "{:?}",
        began.elapsed()
    );
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrency_limit_caps_the_kind_across_its_agents() {
    let up = upstream(1000, 10);
    let held = limit("api", None, Some(2));
    let rt = start(&up, Some(held)).await;
    let handles: Vec<_> = (0..30)
        .map(|_| rt.try_submit(Task::new("api", "x")).unwrap())
        .collect();
    for h in handles {
        assert!(matches!(h.await, Outcome::Ok(_)));
    }
    assert_eq!(up.peak.load(Ordering::Acquire), 2, "6 agents, 2 at a time");
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_whose_upstream_keeps_refusing_ends_timeout_at_its_deadline() {
    let up = upstream(0, 50);
    let rt = start(&up, None).await;
    let h = rt
        .try_submit(Task::new("api", "x").timeout(Duration::from_millis(300)))
        .unwrap();
    assert_eq!(h.await, Outcome::Timeout);
    assert!(
        up.refused.load(Ordering::Acquire) >= 2,
        "it was retried after each refusal"
    );
    rt.shutdown().await;
}

#[tokio::test]
async fn a_limit_on_an_unknown_kind_or_with_a_bad_rate_is_refused_naming_the_field() {
    let up = upstream(1, 1);
    let bad = |l: KindLimit| {
        let mut config = RuntimeConfig::default().tier(TierConfig::new("t").agents("api", 1));
        config.limits.push(l);
        let u = up.clone();
        Runtime::builder(config).register("api", move |_: &AgentSpec| Api(u.clone()))
    };
    let e = bad(limit("nope", None, None))
        .start()
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("limits[0].kind"), "{e}");
    let e = bad(limit("api", Some(-1.0), None))
        .start()
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("limits[0].rate"), "{e}");
}
