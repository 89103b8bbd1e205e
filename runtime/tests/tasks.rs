//! Submitting tasks: outcomes, timeouts, retries, admission errors, I/O-bound concurrency.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::start;
use troupe::{
    AgentId, Outcome, Priority, QueueConfig, RetryPolicy, RuntimeConfig, SubmitError, Task,
    TierConfig,
};

fn pool(n: usize) -> RuntimeConfig {
    RuntimeConfig::default().tier(TierConfig::new("t").agents("s", n))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_outcome_kind_is_reported() {
    let (rt, _) = start(pool(4)).await;
    let run = |payload: &'static str| {
        rt.try_submit(Task::new("s", payload).timeout(Duration::from_millis(50)))
            .unwrap()
    };
    assert_eq!(run("hi").await, Outcome::Ok(Bytes::from("hi")));
    assert!(matches!(run("error").await, Outcome::Error(e) if e.0 == "scripted error"));
    assert_eq!(run("hang").await, Outcome::Timeout);
    assert!(matches!(run("panic").await, Outcome::Panic(m) if m == "scripted panic"));
    // The pool still works after the panic.
    assert_eq!(run("again").await, Outcome::Ok(Bytes::from("again")));
    let stats = rt.stats();
    let n = stats.priority(Priority::Normal);
    assert_eq!(n.submitted, 5);
    assert_eq!(
        (
            n.completed.ok,
            n.completed.error,
            n.completed.timeout,
            n.completed.panic
        ),
        (2, 1, 1, 1)
    );
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_run_again_and_report_the_last_attempt() {
    let (rt, _) = start(pool(2)).await;
    let started = Instant::now();
    let h = rt
        .try_submit(
            Task::new("s", "error").retry(RetryPolicy::attempts(3, Duration::from_millis(5))),
        )
        .unwrap();
    assert!(matches!(h.await, Outcome::Error(_)));
    // Two backoffs: 5 ms then 10 ms.
    assert!(started.elapsed() >= Duration::from_millis(15));
    // The handler ran three times: three handler samples, one outcome.
    let s = rt.stats();
    let n = s.priority(Priority::Normal);
    assert_eq!(n.handler.count, 3);
    assert_eq!(n.completed.total(), 1);
    // A panicking task retried on the rebuilt agent still ends as panic, exactly once.
    let h = rt
        .try_submit(Task::new("s", "panic").retry(RetryPolicy::attempts(2, Duration::ZERO)))
        .unwrap();
    assert!(matches!(h.await, Outcome::Panic(_)));
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_passed_in_the_queue_times_out_without_running() {
    let (rt, _) = start(pool(1)).await;
    let blocker = rt.try_submit(Task::new("s", "sleep:60")).unwrap();
    common::picked(&rt).await;
    let late = rt
        .try_submit(Task::new("s", "x").deadline(Instant::now() + Duration::from_millis(10)))
        .unwrap();
    assert_eq!(late.await, Outcome::Timeout);
    assert!(blocker.await.is_ok());
    // Only the blocker reached a handler.
    assert_eq!(rt.stats().priority(Priority::Normal).handler.count, 1);
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_tasks_are_refused_with_a_typed_reason_and_handed_back() {
    let (rt, _) = start(pool(2)).await;
    let r = rt.try_submit(Task::new("nobody", "x")).unwrap_err();
    assert_eq!(r.error, SubmitError::UnknownCapability("nobody".into()));
    assert_eq!(r.task.get_payload(), &Bytes::from("x"));
    let r = rt.try_submit(Task::new(AgentId(99), "x")).unwrap_err();
    assert_eq!(r.error, SubmitError::UnknownAgent(AgentId(99)));
    let r = rt
        .try_submit(Task::new("s", "x").timeout(Duration::ZERO))
        .unwrap_err();
    assert!(matches!(r.error, SubmitError::Invalid(_)));
    assert_eq!(rt.stats().priority(Priority::Normal).rejected.invalid, 3);
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_at_once_and_says_how_full() {
    let mut config = pool(1);
    config.queues = QueueConfig {
        capacity: troupe::PerPriority([2, 2, 3, 2, 2]),
        ..QueueConfig::default()
    };
    let (rt, _) = start(config).await;
    let busy = rt.try_submit(Task::new("s", "sleep:100")).unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await; // the agent holds it; the queue is empty
    let queued: Vec<_> = (0..3)
        .map(|_| rt.try_submit(Task::new("s", "q")).unwrap())
        .collect();
    let r = rt.try_submit(Task::new("s", "overflow")).unwrap_err();
    assert_eq!(
        r.error,
        SubmitError::QueueFull {
            priority: Priority::Normal,
            depth: 3,
            capacity: 3
        }
    );
    assert_eq!(
        r.error.to_string(),
        "the normal queue is full (3 of 3 tasks queued)"
    );
    // Another priority has its own bound.
    let other = rt
        .try_submit(Task::new("s", "hi").priority(Priority::High))
        .unwrap();
    // Memory does not grow with overload: a burst of refusals leaves depth at capacity.
    for _ in 0..1000 {
        assert!(rt.try_submit(Task::new("s", "x")).is_err());
    }
    assert_eq!(rt.health().queues[Priority::Normal.index()].depth, 3);
    assert_eq!(
        rt.stats().priority(Priority::Normal).rejected.queue_full,
        1001
    );
    assert!(busy.await.is_ok());
    for h in queued {
        assert!(h.await.is_ok());
    }
    assert!(other.await.is_ok());
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_waits_for_room_up_to_its_limit() {
    let mut config = pool(1);
    config.queues.capacity = troupe::PerPriority([1, 1, 1, 1, 1]);
    let (rt, _) = start(config).await;
    let first = rt.try_submit(Task::new("s", "sleep:50")).unwrap();
    common::picked(&rt).await;
    let second = rt.try_submit(Task::new("s", "sleep:50")).unwrap(); // fills the queue
    // Too short a wait: refused with the queue's state.
    let r = rt
        .submit(Task::new("s", "x"), Duration::from_millis(10))
        .await
        .unwrap_err();
    assert!(matches!(
        r.error,
        SubmitError::QueueFull {
            depth: 1,
            capacity: 1,
            ..
        }
    ));
    // Long enough: admitted once the agent takes `second` off the queue.
    let third = rt
        .submit(Task::new("s", "third"), Duration::from_secs(5))
        .await
        .unwrap();
    assert!(first.await.is_ok());
    assert!(second.await.is_ok());
    assert_eq!(third.await, Outcome::Ok(Bytes::from("third")));
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_sent_to_one_agent_run_on_that_agent() {
    let (rt, _) = start(pool(8)).await;
    for id in [0u32, 3, 7] {
        let out = rt.try_submit(Task::new(AgentId(id), "who")).unwrap().await;
        assert_eq!(out, Outcome::Ok(Bytes::from(id.to_string())));
    }
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_bound_agents_do_not_block_each_other() {
    // 928 agents each awaiting 20 ms: run serially that would be 18.5 s.
    let config = RuntimeConfig::default().tier(TierConfig::new("io").agents("s", 928));
    let (rt, _) = start(config).await;
    let started = Instant::now();
    let handles: Vec<_> = (0..928)
        .map(|_| rt.try_submit(Task::new("s", "sleep:20")).unwrap())
        .collect();
    for h in handles {
        assert!(h.await.is_ok());
    }
    // Generous bound for a noisy CI machine: what matters is "not serial".
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capabilities_route_to_agents_that_have_them() {
    let mut config = RuntimeConfig::default()
        .tier(TierConfig::new("a").agents("s", 2))
        .tier(TierConfig::new("b").agents("other", 2));
    config.tiers[1].agents[0].capabilities = vec!["translate".into()];
    let (rt, _) = start(config).await;
    for _ in 0..20 {
        let out = rt.try_submit(Task::new("translate", "who")).unwrap().await;
        let Outcome::Ok(id) = out else {
            panic!("{out:?}")
        };
        assert!(matches!(&id[..], b"2" | b"3"), "{id:?}");
    }
    rt.shutdown().await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_busy_agent_yields_to_other_tasks_on_its_thread() {
    let mut config = pool(1);
    config.queues.capacity = troupe::PerPriority([100_000; 5]);
    let (rt, _) = start(config).await;
    let handles: Vec<_> = (0..50_000)
        .map(|_| rt.try_submit(Task::new("s", "ok")).unwrap())
        .collect();
    // Queued behind the agent on this single thread: it must run long before the agent has
    // drained 50 000 tasks (queues are not Tokio resources; the agent spends coop budget).
    let handle = rt.handle();
    let ticker = tokio::spawn(async move { handle.stats().completed().ok });
    let done_when_ticked = ticker.await.unwrap();
    assert!(
        done_when_ticked < 50_000,
        "the agent starved its thread: {done_when_ticked}"
    );
    for h in handles {
        assert!(h.await.is_ok());
    }
    rt.shutdown().await;
}

/// Blocks its thread (no await point, so no timer can cut it off) for the ms in the payload.
struct Spinner;

impl troupe::Agent for Spinner {
    async fn handle(
        &mut self,
        t: troupe::TaskRequest,
        _: &troupe::AgentContext,
    ) -> Result<bytes::Bytes, troupe::TaskError> {
        let ms: u64 = std::str::from_utf8(&t.payload).unwrap().parse().unwrap();
        let until = Instant::now() + Duration::from_millis(ms);
        while Instant::now() < until {
            std::hint::spin_loop();
        }
        Ok(t.payload)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_spins_past_the_deadline_ends_timeout_and_its_late_result_is_counted() {
    let rt = troupe::Runtime::builder(
        RuntimeConfig::default().tier(TierConfig::new("t").agents("spin", 1)),
    )
    .register("spin", |_spec| Spinner)
    .start()
    .await
    .unwrap();
    for _ in 0..3 {
        let out = rt
            .try_submit(Task::new("spin", "120").timeout(Duration::from_millis(30)))
            .unwrap()
            .await;
        assert_eq!(out, Outcome::Timeout);
    }
    let s = rt.stats();
    assert_eq!(s.priority(Priority::Normal).late_results, 3);
    assert_eq!(s.completed().timeout, 3);
    // Within its deadline the same handler is fine.
    let out = rt
        .try_submit(Task::new("spin", "5").timeout(Duration::from_secs(5)))
        .unwrap()
        .await;
    assert!(out.is_ok(), "{out:?}");
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_counts_from_admission_so_time_in_the_queue_uses_it_up() {
    let (rt, _) = start(pool(1)).await;
    let blocker = rt.try_submit(Task::new("s", "sleep:200")).unwrap();
    common::picked(&rt).await;
    // Queued behind a 200 ms task with a 50 ms budget: it times out without running.
    let queued = rt
        .try_submit(Task::new("s", "x").timeout(Duration::from_millis(50)))
        .unwrap();
    assert_eq!(queued.await, Outcome::Timeout);
    assert!(blocker.await.is_ok());
    assert_eq!(rt.stats().priority(Priority::Normal).handler.count, 1);
    // A per-attempt limit is separate: each attempt gets 30 ms, the task 10 s.
    let r = rt
        .try_submit(
            Task::new("s", "sleep:100")
                .timeout(Duration::from_secs(10))
                .attempt_timeout(Duration::from_millis(30))
                .retry(RetryPolicy::attempts(2, Duration::ZERO)),
        )
        .unwrap()
        .await;
    assert_eq!(r, Outcome::Timeout);
    assert_eq!(rt.stats().priority(Priority::Normal).handler.count, 3);
    rt.shutdown().await;
}
