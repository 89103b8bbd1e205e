//! The extension points the cluster and workflow layers build on, exercised through the public
//! API only: task observers (lifecycle events) and task sources (pull with bounded in-flight).

mod common;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Events, Scripted, quiet_scripted_panics};
use troupe::{
    AgentSpec, Outcome, OutcomeKind, Priority, Rejected, RetryPolicy, Runtime, RuntimeConfig,
    SourcedTask, Task, TaskEvent, TaskEventKind, TaskId, TaskSource, TierConfig,
};

fn scripted(config: RuntimeConfig) -> troupe::RuntimeBuilder {
    quiet_scripted_panics();
    let events = Events::default();
    Runtime::builder(config).register("w", move |spec: &AgentSpec| Scripted {
        id: spec.id.0,
        events: events.clone(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observers_hear_every_task_from_accepted_to_exactly_one_finished() {
    let seen: Arc<Mutex<Vec<TaskEvent>>> = Arc::default();
    let log = seen.clone();
    let config = RuntimeConfig::default().tier(TierConfig::new("t").agents("w", 4));
    let rt = scripted(config)
        .observe(move |e: &TaskEvent| log.lock().unwrap().push(*e))
        .start()
        .await
        .unwrap();

    // payload, attempts expected, outcome expected
    let mut plan: Vec<(&str, u32, OutcomeKind)> = vec![("ok", 1, OutcomeKind::Ok); 50];
    plan.extend([("error", 3, OutcomeKind::Error); 5]);
    plan.extend([("panic", 1, OutcomeKind::Panic); 3]);
    let mut handles = Vec::new();
    for (payload, attempts, outcome) in &plan {
        let task = Task::new("w", *payload).retry(if *payload == "error" {
            RetryPolicy::attempts(3, Duration::from_millis(1))
        } else {
            RetryPolicy::NONE
        });
        let h = rt.try_submit(task).map_err(|r| r.error).unwrap();
        handles.push((h.id(), *attempts, *outcome, h));
    }
    let refused = rt.try_submit(Task::new("nobody", "x"));
    assert!(refused.is_err(), "an unknown capability is refused");

    let mut expected = HashMap::new();
    for (id, attempts, outcome, h) in handles {
        assert_eq!(h.await.kind(), outcome);
        expected.insert(id, (attempts, outcome));
    }

    let events = seen.lock().unwrap().clone();
    let mut per_task: HashMap<TaskId, Vec<TaskEvent>> = HashMap::new();
    for e in events {
        per_task.entry(e.task).or_default().push(e);
    }
    assert_eq!(
        per_task.len(),
        expected.len(),
        "every accepted task, and nothing else, has events"
    );
    for (id, (attempts, outcome)) in expected {
        let evs = &per_task[&id];
        assert_eq!(evs.first().map(|e| e.kind), Some(TaskEventKind::Accepted));
        assert_eq!(
            evs.last().map(|e| e.kind),
            Some(TaskEventKind::Finished { outcome })
        );
        let finished = evs
            .iter()
            .filter(|e| matches!(e.kind, TaskEventKind::Finished { .. }))
            .count();
        assert_eq!(finished, 1, "task {id}: exactly one Finished");
        let started: Vec<u32> = evs
            .iter()
            .filter_map(|e| match e.kind {
                TaskEventKind::Started { agent, attempt } => {
                    assert!(agent.0 < 4);
                    Some(attempt)
                }
                _ => None,
            })
            .collect();
        assert_eq!(
            started,
            (1..=attempts).collect::<Vec<_>>(),
            "task {id}: one Started per attempt"
        );
        assert!(evs.windows(2).all(|w| w[0].at <= w[1].at));
        assert!(evs.iter().all(|e| e.priority == Priority::Normal));
    }
    rt.shutdown().await;
}

/// A source over a fixed list that records what it hears and how many of its tasks are out.
#[derive(Default)]
struct ListSource {
    queue: Mutex<VecDeque<(usize, Task)>>,
    finished: Mutex<Vec<(usize, Outcome)>>,
    refused: Mutex<Vec<usize>>,
    out: AtomicUsize,
    peak: AtomicUsize,
}

impl TaskSource for ListSource {
    type Receipt = usize;

    async fn next(&self) -> Option<SourcedTask<usize>> {
        let (receipt, task) = self.queue.lock().unwrap().pop_front()?;
        let out = self.out.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(out, Ordering::SeqCst);
        Some(SourcedTask { task, receipt })
    }

    async fn finished(&self, receipt: usize, outcome: Outcome) {
        self.finished.lock().unwrap().push((receipt, outcome));
        self.out.fetch_sub(1, Ordering::SeqCst);
    }

    async fn refused(&self, receipt: usize, _rejected: Rejected) {
        self.refused.lock().unwrap().push(receipt);
        self.out.fetch_sub(1, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pumped_source_reports_every_task_once_and_never_has_more_out_than_allowed() {
    let mut config = RuntimeConfig::default().tier(TierConfig::new("t").agents("w", 4));
    // A queue smaller than the source's in-flight bound: submissions wait for room instead of
    // being refused.
    config.queues.capacity[Priority::Normal] = 4;
    let rt = scripted(config).start().await.unwrap();

    let source = ListSource::default();
    for i in 0..300 {
        let task = if i == 10 {
            Task::new("nobody", "x")
        } else {
            Task::new("w", "sleep:1")
        };
        source.queue.lock().unwrap().push_back((i, task));
    }
    let report = rt.pump(&source, 16, Duration::from_secs(10)).await;

    assert_eq!(report.pulled, 300);
    assert_eq!(report.finished, 299);
    assert_eq!(report.refused, 1);
    assert!(report.peak_in_flight <= 16, "{report:?}");
    assert!(source.peak.load(Ordering::SeqCst) <= 16);
    assert_eq!(source.out.load(Ordering::SeqCst), 0, "everything reported");
    assert_eq!(*source.refused.lock().unwrap(), vec![10]);
    let mut finished = source.finished.lock().unwrap().clone();
    finished.sort_by_key(|(r, _)| *r);
    let receipts: Vec<usize> = finished.iter().map(|(r, _)| *r).collect();
    let want: Vec<usize> = (0..300).filter(|&i| i != 10).collect();
    assert_eq!(receipts, want, "each accepted task reported exactly once");
    assert!(
        finished
            .iter()
            .all(|(_, o)| *o == Outcome::Ok(bytes::Bytes::from("sleep:1")))
    );
    assert_eq!(rt.outstanding(), 0);
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_is_the_free_part_of_a_priority_queue() {
    let mut config = RuntimeConfig::default().tier(TierConfig::new("t").agents("w", 1));
    config.queues.capacity[Priority::Normal] = 4;
    let rt = scripted(config).start().await.unwrap();
    assert_eq!(rt.room(Priority::Normal), 4);

    // The one agent takes the first task (its slot is freed when picked) and hangs on it; the
    // next two wait in the queue.
    let running = rt.try_submit(Task::new("w", "hang")).unwrap();
    assert!(common::eventually(Duration::from_secs(5), || rt.room(Priority::Normal) == 4).await);
    let queued: Vec<_> = (0..2)
        .map(|_| rt.try_submit(Task::new("w", "ok")).unwrap())
        .collect();
    assert_eq!(rt.room(Priority::Normal), 2);
    assert_eq!(rt.room(Priority::High), rt.health().queues[1].capacity);
    drop((running, queued));
    rt.shutdown_with(Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_key_reaches_the_handler_on_every_attempt() {
    // What a layer above keys side effects by (the cluster's id for the task): unlike the
    // runtime's own TaskId it is the submitter's, and a retry carries it too.
    let rt = scripted(RuntimeConfig::default().tier(TierConfig::new("t").agents("w", 1)))
        .start()
        .await
        .unwrap();
    let keyed = Task::new("w", "key")
        .key(7)
        .retry(RetryPolicy::attempts(2, Duration::from_millis(1)));
    assert_eq!(
        rt.try_submit(keyed).unwrap().await,
        Outcome::Ok(troupe::Bytes::from("Some(7)"))
    );
    let unkeyed = Task::new("w", "key").retry(RetryPolicy::attempts(2, Duration::from_millis(1)));
    assert_eq!(
        rt.try_submit(unkeyed).unwrap().await,
        Outcome::Ok(troupe::Bytes::from("None"))
    );
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observers_see_the_task_key_on_every_event() {
    type Seen = Arc<Mutex<Vec<(Option<u64>, TaskEventKind)>>>;
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let rt = scripted(RuntimeConfig::default().tier(TierConfig::new("t").agents("w", 1)))
        .observe(move |e: &TaskEvent| s.lock().unwrap().push((e.key, e.kind)))
        .start()
        .await
        .unwrap();
    rt.try_submit(Task::new("w", "x").key(9)).unwrap().await;
    rt.try_submit(Task::new("w", "y")).unwrap().await;
    rt.shutdown().await;
    let seen = seen.lock().unwrap();
    let keyed: Vec<_> = seen.iter().filter(|(k, _)| *k == Some(9)).collect();
    assert_eq!(keyed.len(), 3, "accepted, started, finished: {seen:?}");
    assert_eq!(seen.iter().filter(|(k, _)| k.is_none()).count(), 3);
}
