//! Priority order and the starvation guard, observed through the order handlers run in.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use troupe::{
    Agent, AgentContext, AgentSpec, PerPriority, Priority, Runtime, RuntimeConfig, Task, TaskError,
    TaskRequest, TierConfig,
};

/// Records the payload of every task it starts, in order; `block` waits for a gate.
struct Recorder {
    log: Arc<Mutex<Vec<String>>>,
    gate: Arc<tokio::sync::Semaphore>,
}

impl Agent for Recorder {
    async fn handle(&mut self, task: TaskRequest, _: &AgentContext) -> Result<Bytes, TaskError> {
        let name = String::from_utf8_lossy(&task.payload).into_owned();
        if name == "block" {
            let _permit = self
                .gate
                .acquire()
                .await
                .map_err(|_| TaskError::new("gate closed"))?;
        } else {
            self.log.lock().unwrap().push(name);
        }
        Ok(task.payload)
    }
}

/// Waits until the agent has taken the blocker out of the queue (it is then parked on the
/// gate), so the tasks queued next all wait behind it.
async fn wait_until_blocked(rt: &Runtime) {
    for _ in 0..10_000 {
        if rt.health().queues.iter().all(|q| q.depth == 0) {
            return;
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("the agent never took the blocking task");
}

async fn single_agent(
    limits: PerPriority<u32>,
) -> (
    Runtime,
    Arc<Mutex<Vec<String>>>,
    Arc<tokio::sync::Semaphore>,
) {
    let mut config = RuntimeConfig::default().tier(TierConfig::new("one").agents("rec", 1));
    config.queues.starvation_limit = limits;
    config.queues.capacity = PerPriority([20_000; 5]);
    let log = Arc::new(Mutex::new(Vec::new()));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (l, g) = (log.clone(), gate.clone());
    let rt = Runtime::builder(config)
        .register("rec", move |_: &AgentSpec| Recorder {
            log: l.clone(),
            gate: g.clone(),
        })
        .start()
        .await
        .unwrap();
    (rt, log, gate)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_critical_task_overtakes_ten_thousand_queued_low_tasks() {
    let (rt, log, gate) = single_agent(troupe::QueueConfig::default().starvation_limit).await;
    // Saturate the pool: its only agent is busy.
    let blocker = rt.try_submit(Task::new("rec", "block")).unwrap();
    wait_until_blocked(&rt).await;
    let mut handles: Vec<_> = (0..10_000)
        .map(|i| {
            rt.try_submit(Task::new("rec", format!("low-{i}")).priority(Priority::Low))
                .unwrap()
        })
        .collect();
    handles.push(
        rt.try_submit(Task::new("rec", "critical").priority(Priority::Critical))
            .unwrap(),
    );
    assert_eq!(rt.health().queues[Priority::Low.index()].depth, 10_000);
    gate.add_permits(1);
    assert!(blocker.await.is_ok());
    for h in handles {
        assert!(h.await.is_ok());
    }
    let log = log.lock().unwrap().clone();
    assert_eq!(log.len(), 10_001);
    assert_eq!(log[0], "critical", "critical started after {:?}", &log[..3]);
    // The low tasks kept their FIFO order among themselves.
    assert_eq!(log[1], "low-0");
    assert_eq!(log[10_000], "low-9999");
    rt.shutdown().await;
}

/// Runs 600 `top`, 100 low and 100 background tasks queued at once on one agent and returns
/// the start order.
async fn mixed_run(limits: PerPriority<u32>, top: Priority) -> Vec<String> {
    let (rt, log, gate) = single_agent(limits).await;
    let blocker = rt.try_submit(Task::new("rec", "block")).unwrap();
    wait_until_blocked(&rt).await;
    let mut handles = Vec::new();
    for i in 0..600 {
        handles.push(
            rt.try_submit(Task::new("rec", format!("c{i}")).priority(top))
                .unwrap(),
        );
        if i % 6 == 0 {
            handles.push(
                rt.try_submit(Task::new("rec", format!("l{i}")).priority(Priority::Low))
                    .unwrap(),
            );
            handles.push(
                rt.try_submit(Task::new("rec", format!("b{i}")).priority(Priority::Background))
                    .unwrap(),
            );
        }
    }
    gate.add_permits(1);
    blocker.await;
    for h in handles {
        assert!(h.await.is_ok());
    }
    rt.shutdown().await;
    log.lock().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lower_priorities_get_their_configured_share_under_sustained_load() {
    // Under `high` work, low takes a turn after being passed over 3 times, background after 7.
    let order = mixed_run(PerPriority([u32::MAX, 4, 8, 3, 7]), Priority::High).await;
    let first = &order[..200];
    let lows = first.iter().filter(|n| n.starts_with('l')).count();
    let backgrounds = first.iter().filter(|n| n.starts_with('b')).count();
    // Every 4th pick is owed to low and every 8th to background (they overlap a little).
    assert!(
        lows >= 35,
        "low got {lows} of the first 200 picks: {first:?}"
    );
    assert!(
        backgrounds >= 15,
        "background got {backgrounds} of the first 200 picks"
    );
    assert!(first.iter().filter(|n| n.starts_with('c')).count() >= 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn critical_is_strictly_first_whatever_the_starvation_guard_owes() {
    // The most eager guard there is (a turn after every pass) cannot put anything ahead of a
    // queued critical task, and the turns it owes are not spent while critical work runs.
    let order = mixed_run(PerPriority([u32::MAX, 1, 1, 1, 1]), Priority::Critical).await;
    let last_critical = order.iter().rposition(|n| n.starts_with('c')).unwrap();
    assert_eq!(
        last_critical,
        599,
        "non-critical tasks ran before critical ones: {:?}",
        &order[..20]
    );
    // Once critical work is gone, low and background share by their guards again.
    let rest = &order[600..];
    assert_eq!(rest.len(), 200);
    assert!(rest[..20].iter().any(|n| n.starts_with('b')), "{rest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_share_is_configurable_down_to_strict_priority() {
    let order = mixed_run(PerPriority([u32::MAX; 5]), Priority::High).await;
    // Strict: every high task before any other.
    let last_high = order.iter().rposition(|n| n.starts_with('c')).unwrap();
    assert_eq!(last_high, 599);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_kind_cannot_crowd_its_neighbours_out_of_a_queue() {
    use troupe::{Outcome, SubmitError};
    // Two kinds share a background queue of 100; each may hold half of it queued, plus one
    // running task per agent (2 for `stuck`).
    let mut config =
        RuntimeConfig::default().tier(TierConfig::new("t").agents("stuck", 2).agents("rec", 1));
    config.queues.capacity = PerPriority([100; 5]);
    let log = Arc::new(Mutex::new(Vec::new()));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (l, g) = (log.clone(), gate.clone());
    let (l2, g2) = (log.clone(), gate.clone());
    let rt = Runtime::builder(config)
        .register("stuck", move |_spec| Recorder {
            log: l.clone(),
            gate: g.clone(),
        })
        .register("rec", move |_spec| Recorder {
            log: l2.clone(),
            gate: g2.clone(),
        })
        .start()
        .await
        .unwrap();
    // A misbehaving kind floods background with work that never ends.
    let mut stuck = Vec::new();
    let mut refused = 0;
    for _ in 0..1500 {
        match rt.try_submit(Task::new("stuck", "block").priority(Priority::Background)) {
            Ok(h) => stuck.push(h),
            Err(r) => {
                assert!(
                    matches!(
                        r.error,
                        SubmitError::KindFull {
                            held: 52,
                            capacity: 52,
                            ..
                        }
                    ),
                    "{:?}",
                    r.error
                );
                refused += 1;
            }
        }
    }
    assert_eq!((stuck.len(), refused), (52, 1448));
    // Its neighbour still gets into the same queue, and runs.
    for i in 0..40 {
        let h = rt
            .try_submit(Task::new("rec", format!("n{i}")).priority(Priority::Background))
            .unwrap();
        assert!(matches!(h.await, Outcome::Ok(_)));
    }
    assert_eq!(
        rt.stats().priority(Priority::Background).rejected.kind_full,
        1448
    );
    // Places are given back when tasks end.
    gate.add_permits(1000);
    for h in stuck {
        assert!(h.await.is_ok());
    }
    assert!(
        rt.try_submit(Task::new("stuck", "x").priority(Priority::Background))
            .is_ok()
    );
    rt.shutdown().await;
}
