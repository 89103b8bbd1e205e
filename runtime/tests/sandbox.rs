//! The tri-sandbox with thread lanes: voting, a lying lane, a hanging lane, a panicking lane,
//! a lane that blocks its thread, no quorum, fallbacks and comparators.

mod common;

use std::time::Duration;

use bytes::Bytes;
use troupe::sandbox::{Lane, LaneMode, LaneResult, SandboxError, SandboxKindConfig, SandboxPolicy};
use troupe::{
    Agent, AgentContext, AgentSpec, Outcome, Runtime, RuntimeConfig, SubmitError, Task, TaskError,
    TaskRequest, TierConfig,
};

/// Answers "answer" unless the payload scripts a fault for its own lane:
/// `lie:L`, `hang:L`, `spin:L`, `panic:L`, `slow:L`, `fail:LL`, `differ`, `case:L`.
/// `slow` waits (awaiting) and `spin` blocks its thread until the test opens their gate, so
/// tests order events by gates, not by guessing durations.
struct Judge;

/// Released by the test that scripts `slow`.
static SLOW_GATE: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(0);
/// Opened by the test that scripts `spin`.
static SPIN_GATE: (std::sync::Mutex<bool>, std::sync::Condvar) =
    (std::sync::Mutex::new(false), std::sync::Condvar::new());

fn open_spin_gate() {
    *SPIN_GATE.0.lock().unwrap() = true;
    SPIN_GATE.1.notify_all();
}

impl Agent for Judge {
    async fn handle(&mut self, task: TaskRequest, ctx: &AgentContext) -> Result<Bytes, TaskError> {
        let lane = ctx.lane().expect("runs in a lane").as_str();
        let script = String::from_utf8_lossy(&task.payload).into_owned();
        let (what, lanes) = script.split_once(':').unwrap_or((&script, ""));
        let me = lanes.contains(lane);
        match what {
            "lie" if me => Ok(Bytes::from("wrong")),
            "hang" if me => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(Bytes::from("late"))
            }
            // Blocks the lane's thread: no await point, no cooperative timeout.
            "spin" if me => {
                let mut open = SPIN_GATE.0.lock().unwrap();
                while !*open {
                    open = SPIN_GATE.1.wait(open).unwrap();
                }
                Ok(Bytes::from("answer"))
            }
            "panic" if me => panic!("scripted panic"),
            "slow" if me => {
                let _permit = SLOW_GATE.acquire().await;
                Ok(Bytes::from("answer"))
            }
            "fail" if me => Err(TaskError::new(format!("lane {lane} failed"))),
            "differ" => Ok(Bytes::from(lane.to_owned())),
            "key" => Ok(Bytes::from(format!("{:?}", task.key))),
            "case" if me => Ok(Bytes::from("ANSWER")),
            _ => Ok(Bytes::from("answer")),
        }
    }
}

async fn start_with(policy: Option<SandboxPolicy>) -> Runtime {
    common::quiet_scripted_panics();
    let mut config = RuntimeConfig::default().tier(TierConfig::new("t").agents("judge", 2));
    config.sandbox.lane_timeout = Duration::from_millis(400);
    config.sandbox.kinds = vec![SandboxKindConfig {
        kind: "judge".into(),
        lanes: LaneMode::Threads,
        instances: 2,
    }];
    let mut b = Runtime::builder(config).register("judge", |_: &AgentSpec| Judge);
    if let Some(p) = policy {
        b = b.sandbox_policy("judge", p);
    }
    b.start().await.unwrap()
}

async fn run(rt: &Runtime, script: &'static str) -> Result<troupe::sandbox::Verdict, SandboxError> {
    rt.run_sandboxed(Task::new("judge", script)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_lanes_agreeing_is_unanimous() {
    let rt = start_with(None).await;
    let v = run(&rt, "ok").await.unwrap();
    assert_eq!(v.output, Bytes::from("answer"));
    assert_eq!(v.agreed.len(), 2);
    assert!(!v.fallback);
    assert!(common::eventually(Duration::from_secs(2), || rt.stats().sandbox.unanimous == 1).await);
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_lane_is_outvoted_and_recorded_as_dissent() {
    let rt = start_with(None).await;
    let v = run(&rt, "lie:B").await.unwrap();
    assert_eq!(v.output, Bytes::from("answer"));
    assert_eq!(v.agreed, [Lane::A, Lane::C]);
    // The liar's answer may arrive after the verdict; it is still tallied.
    assert!(common::eventually(Duration::from_secs(2), || rt.stats().sandbox.majority == 1).await);
    let s = rt.stats().sandbox;
    assert_eq!(s.lanes[Lane::B.index()].dissent, 1);
    assert_eq!(s.lanes[Lane::A.index()].dissent, 0);
    assert_eq!(s.executions(Lane::B, "ok"), 1);
    assert_eq!(s.unanimous, 0);
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_lane_does_not_delay_the_answer() {
    let rt = start_with(None).await;
    let v = run(&rt, "hang:C").await.unwrap();
    assert_eq!(v.agreed, [Lane::A, Lane::B]);
    // The answer did not wait for C: C has not even been timed out yet.
    assert_eq!(rt.stats().sandbox.executions(Lane::C, "timeout"), 0);
    // C is recorded as timed out once its lane timeout (400 ms) passes.
    assert!(
        common::eventually(Duration::from_secs(10), || rt
            .stats()
            .sandbox
            .executions(Lane::C, "timeout")
            == 1)
        .await
    );
    assert_eq!(rt.stats().sandbox.lanes[Lane::C.index()].dissent, 1);
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_answer_comes_at_the_second_fastest_lane() {
    let rt = start_with(None).await;
    // A waits for the gate; B and C answer, and that is the verdict.
    let v = run(&rt, "slow:A").await.unwrap();
    assert_eq!(v.agreed, [Lane::B, Lane::C]);
    assert_eq!(rt.stats().sandbox.unanimous, 0);
    // A answers once let go, agrees, and makes the vote unanimous.
    SLOW_GATE.add_permits(1);
    assert!(
        common::eventually(Duration::from_secs(10), || rt.stats().sandbox.unanimous
            == 1)
        .await
    );
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_lane_is_outvoted_and_rebuilt() {
    let rt = start_with(None).await;
    let v = run(&rt, "panic:A").await.unwrap();
    assert_eq!(v.agreed, [Lane::B, Lane::C]);
    assert!(
        common::eventually(Duration::from_secs(2), || rt
            .stats()
            .sandbox
            .executions(Lane::A, "panic")
            == 1)
        .await
    );
    // Lane A works again: of its next four jobs, each ran ok, or (while it was still
    // rebuilding and the vote went on without it) was skipped; at least the last one ran.
    for _ in 0..4 {
        run(&rt, "ok").await.unwrap();
    }
    assert!(
        common::eventually(Duration::from_secs(5), || {
            let s = rt.stats().sandbox;
            s.executions(Lane::A, "ok") + s.executions(Lane::A, "skipped") == 4
        })
        .await
    );
    assert!(rt.stats().sandbox.executions(Lane::A, "ok") >= 1);
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_that_blocks_its_thread_is_timed_out_and_replaced() {
    let rt = start_with(None).await;
    let v = run(&rt, "spin:C").await.unwrap();
    assert_eq!(v.agreed, [Lane::A, Lane::B]);
    // Lane C's thread is stuck until the gate opens; the unifier times it out and starts a
    // new thread.
    assert!(
        common::eventually(Duration::from_secs(10), || rt
            .stats()
            .sandbox
            .executions(Lane::C, "timeout")
            == 1)
        .await
    );
    // While the old thread is still blocked, lane C answers again (and agrees).
    let v = run(&rt, "lie:A").await.unwrap();
    assert_eq!(v.agreed, [Lane::B, Lane::C]);
    open_spin_gate();
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_quorum_is_a_typed_error_with_every_lane_result() {
    let rt = start_with(None).await;
    let err = run(&rt, "differ").await.unwrap_err();
    assert_eq!(
        err,
        SandboxError::NoQuorum {
            results: [
                LaneResult::Ok(Bytes::from("A")),
                LaneResult::Ok(Bytes::from("B")),
                LaneResult::Ok(Bytes::from("C")),
            ]
        }
    );
    let err = run(&rt, "fail:AB").await.unwrap_err();
    let SandboxError::NoQuorum { results } = err else {
        panic!("{err:?}")
    };
    assert_eq!(results[0], LaneResult::Error("lane A failed".into()));
    assert_eq!(results[1], LaneResult::Error("lane B failed".into()));
    // Through the task API the same is outcome `error`, naming the lanes.
    let out = rt
        .try_submit(Task::new("judge", "differ").sandboxed())
        .unwrap()
        .await;
    let Outcome::Error(e) = out else {
        panic!("{out:?}")
    };
    assert!(
        e.0.starts_with("no quorum: A ok (1 bytes), B ok (1 bytes), C"),
        "{e}"
    );
    assert!(common::eventually(Duration::from_secs(2), || rt.stats().sandbox.no_quorum == 3).await);
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fallback_picks_and_a_comparator_decides_agreement() {
    let policy = SandboxPolicy::default()
        .comparator(|a, b| a.eq_ignore_ascii_case(b))
        .fallback(|results| {
            results.iter().find_map(|r| match r {
                LaneResult::Ok(b) if &b[..] == b"B" => Some(b.clone()),
                _ => None,
            })
        });
    let rt = start_with(Some(policy)).await;
    let v = run(&rt, "differ").await.unwrap();
    assert!(v.fallback);
    assert_eq!(v.output, Bytes::from("B"));
    // "ANSWER" and "answer" agree under the comparator: unanimous, no dissent.
    run(&rt, "case:A").await.unwrap();
    assert!(common::eventually(Duration::from_secs(2), || rt.stats().sandbox.unanimous == 1).await);
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxed_tasks_use_admission_and_answer_through_the_task_handle() {
    let rt = start_with(None).await;
    let out = rt
        .try_submit(Task::new("judge", "lie:C").sandboxed())
        .unwrap()
        .await;
    assert_eq!(out, Outcome::Ok(Bytes::from("answer")));
    let r = rt
        .try_submit(Task::new("nobody", "x").sandboxed())
        .unwrap_err();
    assert!(
        matches!(r.error, SubmitError::Invalid(ref m) if m.contains("not a sandbox kind")),
        "{:?}",
        r.error
    );
    // A flood completes, each task exactly once; counts agree.
    let handles: Vec<_> = (0..300)
        .map(|i| {
            rt.try_submit(Task::new("judge", if i % 3 == 0 { "lie:A" } else { "ok" }).sandboxed())
                .unwrap()
        })
        .collect();
    for h in handles {
        assert_eq!(h.await, Outcome::Ok(Bytes::from("answer")));
    }
    let stats = rt.stats();
    assert_eq!(stats.completed().ok, 301);
    assert_eq!(stats.submitted(), 301);
    let lanes = &stats.sandbox.lanes;
    assert!(
        lanes.iter().all(|l| l.total == 2 && l.available == 2),
        "{lanes:?}"
    );
    let report = rt.shutdown().await;
    assert_eq!(report.abandoned, 0);
}

/// `try_submit` is a plain function: a load generator or an FFI thread may call it from outside
/// any Tokio runtime, and a sandboxed task must work from there as well as a pooled one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandboxed_task_can_be_submitted_from_a_thread_outside_tokio() {
    let rt = start_with(None).await;
    let handle = rt.handle();
    let submitted = std::thread::spawn(move || {
        handle
            .try_submit(Task::new("judge", "plain").sandboxed())
            .map_err(|r| r.error)
    })
    .join()
    .expect("the submitting thread does not panic");
    let outcome = submitted.expect("accepted").await;
    assert_eq!(outcome, Outcome::Ok(Bytes::from("answer")));
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_thread_lane_sees_the_task_key() {
    let rt = start_with(None).await;
    let out = rt
        .try_submit(Task::new("judge", "key").sandboxed().key(42))
        .unwrap()
        .await;
    assert_eq!(out, Outcome::Ok(Bytes::from("Some(42)")));
    rt.shutdown().await;
}
