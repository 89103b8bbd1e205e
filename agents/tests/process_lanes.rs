//! Process lanes: the tri-sandbox running in `troupe-worker` processes.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use troupe::sandbox::{Lane, LaneMode, LaneResult, ProcessConfig, SandboxError, SandboxKindConfig};
use troupe::{Runtime, RuntimeConfig, Task};

const WORKER: &str = env!("CARGO_BIN_EXE_troupe-worker");

async fn start(command: &str, instances: usize) -> Runtime {
    let mut config = RuntimeConfig::default();
    config.sandbox.lane_timeout = Duration::from_secs(2);
    config.sandbox.process = Some(ProcessConfig {
        command: vec![command.to_owned()],
    });
    config.sandbox.kinds = vec![
        SandboxKindConfig {
            kind: "faulty".into(),
            lanes: LaneMode::Process,
            instances,
        },
        SandboxKindConfig {
            kind: "compute".into(),
            lanes: LaneMode::Process,
            instances,
        },
    ];
    troupe_agents::register_kinds(Runtime::builder(config))
        .start()
        .await
        .unwrap()
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        // A zombie ("Z") is dead but not yet reaped; it counts as left behind too.
        .map(|s| !s.is_empty())
        .unwrap_or(false)
}

async fn eventually(mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    f()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_worker_is_outvoted() {
    let rt = start(WORKER, 1).await;
    let v = rt
        .run_sandboxed(Task::new("faulty", "lie:B"))
        .await
        .unwrap();
    assert_eq!(v.output, Bytes::from("truth"));
    assert_eq!(v.agreed, [Lane::A, Lane::C]);
    assert!(eventually(|| rt.stats().sandbox.lanes[Lane::B.index()].dissent == 1).await);
    // The same computation in three processes agrees.
    let v = rt
        .run_sandboxed(Task::new("compute", "500|x"))
        .await
        .unwrap();
    assert_eq!(v.output.len(), 16);
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_dies_is_reported_as_crashed_and_restarted() {
    let rt = start(WORKER, 1).await;
    // Workers start with their lane's first job.
    assert!(rt.sandbox_worker_pids().is_empty());
    rt.run_sandboxed(Task::new("faulty", "lie:")).await.unwrap();
    // The vote answers at two lanes; the third worker may still be starting.
    assert!(eventually(|| rt.sandbox_worker_pids().len() == 3).await);
    let before = rt.sandbox_worker_pids();
    let v = rt
        .run_sandboxed(Task::new("faulty", "crash-on:B"))
        .await
        .unwrap();
    assert_eq!(v.output, Bytes::from("survived"));
    assert!(eventually(|| rt.stats().sandbox.executions(Lane::B, "crashed") == 1).await);
    // Lane B works again, in a new process.
    let v = rt.run_sandboxed(Task::new("faulty", "lie:")).await.unwrap();
    assert_eq!(v.output, Bytes::from("truth"));
    assert!(eventually(|| rt.stats().sandbox.executions(Lane::B, "ok") == 2).await);
    // One faulty worker per lane (compute workers start on their first job).
    assert!(eventually(|| rt.sandbox_worker_pids().len() == 3).await);
    let after = rt.sandbox_worker_pids();
    assert_eq!(before.len(), 3);
    assert_eq!(after.len(), 3);
    assert_ne!(before, after, "lane B's worker was replaced");
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_overruns_its_timeout_is_killed() {
    let rt = start(WORKER, 1).await;
    // Workers start on their first job: run the spinning job in the background and take the
    // pids of the three workers running it.
    let spinning = {
        let rt = rt.handle();
        tokio::spawn(async move {
            rt.run_sandboxed(Task::new("faulty", "spin:5000").timeout(Duration::from_millis(300)))
                .await
        })
    };
    assert!(eventually(|| rt.sandbox_worker_pids().len() == 3).await);
    let spinners: HashSet<u32> = rt.sandbox_worker_pids().into_iter().collect();
    assert_eq!(spinners.len(), 3);
    let v = spinning.await.unwrap();
    // All three lanes block their worker's only thread: all time out and are killed.
    assert!(
        matches!(v, Err(SandboxError::NoQuorum { ref results }) if results.iter().all(|r| *r == LaneResult::Timeout)),
        "{v:?}"
    );
    for pid in &spinners {
        assert!(
            eventually(|| !alive(*pid)).await,
            "killed worker {pid} is gone"
        );
    }
    // One hanging lane: the other two answer without waiting for its timeout.
    let t = Instant::now();
    let v = rt
        .run_sandboxed(Task::new("faulty", "hang-on:C").timeout(Duration::from_secs(30)))
        .await
        .unwrap();
    assert_eq!(v.agreed, [Lane::A, Lane::B]);
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    // The next jobs ran on fresh workers, none of the killed ones.
    assert!(!rt.sandbox_worker_pids().is_empty());
    assert!(
        rt.sandbox_worker_pids()
            .iter()
            .all(|p| !spinners.contains(p))
    );
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_sandboxed_tasks_leaves_no_worker_process_behind() {
    let rt = start(WORKER, 2).await;
    let mut seen = HashSet::new();
    let handles: Vec<_> = (0..300)
        .map(|i| {
            let payload = match i % 10 {
                0 => "lie:A",
                1 => "crash-on:C",
                _ => "ok",
            };
            rt.try_submit(Task::new("faulty", payload).sandboxed())
                .unwrap()
        })
        .collect();
    let mut ok = 0;
    for h in handles {
        seen.extend(rt.sandbox_worker_pids());
        if h.await.is_ok() {
            ok += 1;
        }
    }
    assert_eq!(ok, 300);
    assert!(seen.len() >= 6);
    let report = rt.shutdown().await;
    assert_eq!(report.abandoned, 0);
    for pid in seen {
        assert!(!alive(pid), "worker {pid} outlived the runtime");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_command_that_cannot_start_makes_lanes_unavailable() {
    let rt = start("/nonexistent/troupe-worker", 1).await;
    let err = rt
        .run_sandboxed(Task::new("faulty", "x"))
        .await
        .unwrap_err();
    let SandboxError::NoQuorum { results } = err else {
        panic!("{err:?}")
    };
    for r in results {
        assert!(
            matches!(r, LaneResult::Unavailable(ref m) if m.contains("cannot start worker")),
            "{r:?}"
        );
    }
    rt.shutdown().await;
}
