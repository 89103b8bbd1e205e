//! The workflow engine on a real pool, through the public API: outputs along a diamond with its
//! branches in parallel, conditions, retries then fallback then escalation, deadlines that warn
//! and escalate, the history (query, paging, progress, retention), resuming from the history,
//! and the event stream.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use troupe::{
    Agent, AgentContext, AgentSpec, Bytes, Runtime, RuntimeConfig, TaskError, TaskRequest,
    TierConfig,
};
use troupe_workflow::{
    Engine, EngineConfig, Filter, Format, Step, StepResult, StepTimings, Workflow, WorkflowError,
};

/// What the test agents do, by kind.
struct Tool {
    kind: String,
    hang: Duration,
    busy: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

impl Agent for Tool {
    async fn handle(&mut self, task: TaskRequest, ctx: &AgentContext) -> Result<Bytes, TaskError> {
        let text = String::from_utf8_lossy(&task.payload).into_owned();
        match self.kind.as_str() {
            "upper" => Ok(Bytes::from(text.to_uppercase())),
            "tag" => Ok(Bytes::from(format!("[{text}]"))),
            "fail" | "fail2" => Err(TaskError::new("upstream said no")),
            "slow" => {
                let now = self.busy.fetch_add(1, Ordering::AcqRel) + 1;
                self.peak.fetch_max(now, Ordering::AcqRel);
                tokio::time::sleep(Duration::from_millis(150)).await;
                self.busy.fetch_sub(1, Ordering::AcqRel);
                Ok(Bytes::from(format!("slow({text})")))
            }
            "hang" => {
                tokio::time::sleep(self.hang).await;
                Ok(task.payload)
            }
            // An upstream that refuses its first three calls: "retry after 50 ms".
            "limited" => {
                if LIMITED_CALLS.fetch_add(1, Ordering::AcqRel) < 3 {
                    Err(ctx.retry_after(Duration::from_millis(50), "rate limited"))
                } else {
                    Ok(task.payload)
                }
            }
            _ => Ok(task.payload),
        }
    }
}

const KINDS: [&str; 7] = ["upper", "tag", "fail", "fail2", "slow", "hang", "limited"];

static LIMITED_CALLS: AtomicUsize = AtomicUsize::new(0);

struct Pool {
    runtime: Runtime,
    engine: Arc<Engine>,
    peak: Arc<AtomicUsize>,
}

async fn pool(history: &std::path::Path, config: EngineConfig) -> Pool {
    pool_with(history, config, Duration::from_secs(3600)).await
}

/// A pool whose `hang` agents answer after `hang`.
async fn pool_with(history: &std::path::Path, config: EngineConfig, hang: Duration) -> Pool {
    let mut tier = TierConfig::new("t");
    for k in KINDS {
        tier = tier.agents(k, 2);
    }
    let busy = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let timings = StepTimings::new();
    let mut b = Runtime::builder(RuntimeConfig::default().tier(tier)).observe(timings.clone());
    for k in KINDS {
        let (busy, peak) = (busy.clone(), peak.clone());
        b = b.register(k, move |_: &AgentSpec| Tool {
            kind: k.to_owned(),
            hang,
            busy: busy.clone(),
            peak: peak.clone(),
        });
    }
    let runtime = b.start().await.unwrap();
    let engine = Engine::open(
        runtime.handle(),
        timings,
        EngineConfig {
            history: history.to_owned(),
            ..config
        },
    )
    .await
    .unwrap();
    Pool {
        runtime,
        engine,
        peak,
    }
}

fn known() -> HashSet<String> {
    KINDS.iter().map(|k| (*k).to_owned()).collect()
}

fn kinds_of(events: &[troupe_workflow::Event], step: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.step.as_deref() == Some(step))
        .map(|e| e.kind.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_diamond_passes_outputs_and_runs_its_branches_in_parallel() {
    let d = tempfile::tempdir().unwrap();
    let p = pool(&d.path().join("h.sqlite"), EngineConfig::default()).await;
    p.engine
        .register(
            Workflow::new("diamond")
                .step(Step::new("a", "upper"))
                .step(Step::new("b", "slow").after(["a"]))
                .step(Step::new("c", "slow").after(["a"]))
                .step(Step::new("d", "tag").after(["b", "c"])),
        )
        .unwrap();
    let id = p.engine.start("diamond", "hi").await.unwrap();
    let v = p.engine.wait(id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(v.execution.status, "succeeded", "{v:?}");
    let d_out = v.steps.iter().find(|s| s.name == "d").unwrap();
    assert_eq!(
        d_out.output.as_deref(),
        Some(r#"[{"b":"slow(HI)","c":"slow(HI)"}]"#)
    );
    assert_eq!(p.peak.load(Ordering::Acquire), 2, "b and c ran at once");
    assert_eq!(v.progress.done, 4);
    // Timings come from the runtime's own task events.
    for s in &v.steps {
        assert_eq!(s.status, "succeeded");
        assert_eq!(s.attempts, 1);
        assert!(
            s.agent.is_some() && s.queue_us.is_some() && s.exec_us.is_some(),
            "{s:?}"
        );
    }
    let b = v.steps.iter().find(|s| s.name == "b").unwrap();
    assert!(b.exec_us.unwrap() >= 150_000, "{b:?}");
    assert_eq!(b.output_bytes, Some(8));
    p.runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditions_skip_a_branch_and_a_handled_failure_does_not_fail_the_run() {
    let d = tempfile::tempdir().unwrap();
    let p = pool(&d.path().join("h.sqlite"), EngineConfig::default()).await;
    p.engine
        .register(
            Workflow::new("branches")
                .step(Step::new("try", "fail"))
                .step(Step::new("next", "tag").after(["try"]))
                .step(
                    Step::new("recover", "upper")
                        .after(["try"])
                        .when("try", StepResult::Failed),
                )
                .step(
                    Step::new("check", "tag")
                        .after(["recover"])
                        .when_contains("recover", "NO"),
                )
                .step(
                    Step::new("never", "tag")
                        .after(["recover"])
                        .when_contains("recover", "yes"),
                ),
        )
        .unwrap();
    let id = p.engine.start("branches", "x").await.unwrap();
    let v = p.engine.wait(id, Duration::from_secs(10)).await.unwrap();
    let status = |n: &str| v.steps.iter().find(|s| s.name == n).unwrap().status.clone();
    assert_eq!(status("try"), "failed");
    assert_eq!(status("next"), "skipped");
    assert_eq!(status("recover"), "succeeded");
    assert_eq!(status("check"), "succeeded");
    assert_eq!(status("never"), "skipped");
    // `recover` takes the failure's text as its input (the failed step's error).
    let rec = v.steps.iter().find(|s| s.name == "recover").unwrap();
    assert!(
        rec.output.as_deref().unwrap().contains("UPSTREAM SAID NO"),
        "{rec:?}"
    );
    assert_eq!(
        v.execution.status, "succeeded",
        "the failure was handled: {v:?}"
    );
    p.runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_step_retries_then_falls_back_then_escalates() {
    let d = tempfile::tempdir().unwrap();
    let p = pool(&d.path().join("h.sqlite"), EngineConfig::default()).await;
    p.engine
        .register(
            Workflow::new("stubborn")
                .step(Step::new("s", "fail").retries(2).fallback("fail2"))
                .step(Step::new("after", "tag").after(["s"])),
        )
        .unwrap();
    p.engine
        .register(
            Workflow::new("rescued").step(Step::new("s", "fail").retries(1).fallback("upper")),
        )
        .unwrap();
    let id = p.engine.start("stubborn", "x").await.unwrap();
    let v = p.engine.wait(id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(v.execution.status, "failed");
    assert_eq!(v.execution.failed_step.as_deref(), Some("s"));
    assert!(
        v.execution
            .error
            .as_deref()
            .unwrap()
            .contains("upstream said no"),
        "{v:?}"
    );
    let s = &v.steps[0];
    assert_eq!((s.attempts, s.target.as_deref()), (4, Some("fail2")));
    let events = p.engine.events(id).await.unwrap();
    // `step_started` comes from the runtime's events, interleaved: leave it out of the order.
    let order: Vec<String> = kinds_of(&events, "s")
        .into_iter()
        .filter(|k| k != "step_started")
        .collect();
    assert_eq!(
        order,
        [
            "step_queued",
            "step_retried",
            "step_queued",
            "step_retried",
            "step_queued",
            "step_fallback",
            "step_queued",
            "escalated",
            "step_finished"
        ]
    );
    let id = p.engine.start("rescued", "x").await.unwrap();
    let v = p.engine.wait(id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(v.execution.status, "succeeded");
    assert_eq!(v.steps[0].output.as_deref(), Some("X"));
    assert_eq!(v.steps[0].attempts, 3);
    p.runtime.shutdown().await;
}

/// When the first event of `kind` (for `step`, or the execution when `None`) came, in ms since
/// the execution started.
fn at(events: &[troupe_workflow::Event], kind: &str, step: Option<&str>) -> u64 {
    events
        .iter()
        .find(|e| e.kind == kind && e.step.as_deref() == step)
        .map(|e| e.elapsed_ms)
        .unwrap_or_else(|| panic!("no {kind} for {step:?}: {events:?}"))
}

// On a paused clock, so the times are exact: Tokio jumps to the next timer whenever the
// runtime is idle, and the engine's deadlines are all Tokio timers. Idle includes waiting for
// the history's writer thread, during which the clock races through the pool's periodic timers,
// so these tests wait for an execution with no practical limit.
const FOREVER: Duration = Duration::from_secs(365 * 24 * 3600);

#[tokio::test(start_paused = true)]
async fn a_step_past_its_deadline_warns_then_escalates_on_time() {
    let d = tempfile::tempdir().unwrap();
    let p = pool(&d.path().join("h.sqlite"), EngineConfig::default()).await;
    p.engine
        .register(
            Workflow::new("late")
                .warn_at(0.5)
                .step(Step::new("wait", "hang").timeout(Duration::from_millis(400))),
        )
        .unwrap();
    let id = p.engine.start("late", "x").await.unwrap();
    let v = p.engine.wait(id, FOREVER).await.unwrap();
    assert_eq!(v.execution.status, "failed");
    assert!(
        v.steps[0]
            .error
            .as_deref()
            .unwrap()
            .contains("past its deadline"),
        "{v:?}"
    );
    let events = p.engine.events(id).await.unwrap();
    let queued = at(&events, "step_queued", Some("wait"));
    // Warned at half the deadline, escalated at the deadline, in that order.
    assert_eq!(
        at(&events, "warned", Some("wait")) - queued,
        200,
        "{events:?}"
    );
    assert_eq!(
        at(&events, "escalated", Some("wait")) - queued,
        400,
        "{events:?}"
    );
    assert_eq!(
        kinds_of(&events, "wait"),
        [
            "step_queued",
            "step_started",
            "warned",
            "escalated",
            "step_finished"
        ]
    );
    p.runtime.shutdown().await;
}

// Paused clock, as above.
#[tokio::test(start_paused = true)]
async fn a_workflow_past_its_deadline_is_timed_out_and_a_cancelled_one_cancelled() {
    let d = tempfile::tempdir().unwrap();
    let p = pool(&d.path().join("h.sqlite"), EngineConfig::default()).await;
    p.engine
        .register(
            Workflow::new("slowpoke")
                .deadline(Duration::from_millis(500))
                .step(Step::new("a", "hang").timeout(Duration::from_secs(60)))
                .step(Step::new("b", "tag").after(["a"])),
        )
        .unwrap();
    let id = p.engine.start("slowpoke", "x").await.unwrap();
    let v = p.engine.wait(id, FOREVER).await.unwrap();
    assert_eq!(v.execution.status, "timed_out");
    assert!(v.steps.iter().all(|s| s.status == "cancelled"), "{v:?}");
    let events = p.engine.events(id).await.unwrap();
    // The default warn fraction is 80 %.
    assert_eq!(at(&events, "warned", None), 400, "{events:?}");
    assert_eq!(at(&events, "escalated", None), 500, "{events:?}");

    let id = p.engine.start("slowpoke", "x").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    p.engine.cancel(id).unwrap();
    let v = p.engine.wait(id, FOREVER).await.unwrap();
    assert_eq!(v.execution.status, "cancelled");
    assert!(matches!(p.engine.cancel(id), Err(WorkflowError::Ended(_))));
    p.runtime.shutdown().await;
}

#[test]
fn bad_definitions_are_refused_naming_the_step_and_field() {
    let refuse = |w: Workflow| w.check(&known()).unwrap_err().to_string();
    let cycle = refuse(
        Workflow::new("w")
            .step(Step::new("a", "tag").after(["c"]))
            .step(Step::new("b", "tag").after(["a"]))
            .step(Step::new("c", "tag").after(["b"])),
    );
    assert!(cycle.contains("cycle: a → c → b → a"), "{cycle}");
    let unknown = refuse(Workflow::new("w").step(Step::new("a", "nope")));
    assert!(
        unknown.contains("steps[0] (a).target") && unknown.contains("`nope`"),
        "{unknown}"
    );
    let missing = refuse(Workflow::new("w").step(Step::new("a", "tag").after(["ghost"])));
    assert!(
        missing.contains("steps[0] (a).after: no step `ghost`"),
        "{missing}"
    );
    let input = refuse(
        Workflow::new("w")
            .step(Step::new("a", "tag"))
            .step(Step::new("b", "tag").input("$steps.zzz")),
    );
    assert!(
        input.contains("steps[1] (b).input: `$steps.zzz` refers to no step"),
        "{input}"
    );
    let not_after = refuse(
        Workflow::new("w")
            .step(Step::new("a", "tag"))
            .step(Step::new("b", "tag").input("$steps.a")),
    );
    assert!(
        not_after.contains("is not a step this one comes after"),
        "{not_after}"
    );
    let fallback = refuse(Workflow::new("w").step(Step::new("a", "tag").fallback("nope")));
    assert!(fallback.contains("steps[0] (a).fallback"), "{fallback}");
    // The three formats, and a wrong type names its path.
    let toml = "name = \"t\"\n[[steps]]\nname = \"a\"\ntarget = \"tag\"\ntimeout = \"2s\"\n\
                [[steps]]\nname = \"b\"\ntarget = \"upper\"\nafter = [\"a\"]\nretries = 1\n";
    let yaml = "name: t\nsteps:\n  - name: a\n    target: tag\n    timeout: 2s\n  - name: b\n    target: upper\n    after: [a]\n    retries: 1\n";
    let json = r#"{"name":"t","steps":[{"name":"a","target":"tag","timeout":"2s"},{"name":"b","target":"upper","after":["a"],"retries":1}]}"#;
    let a = Workflow::parse(toml, Format::Toml).unwrap();
    assert_eq!(a, Workflow::parse(yaml, Format::Yaml).unwrap());
    assert_eq!(a, Workflow::parse(json, Format::Json).unwrap());
    a.check(&known()).unwrap();
    let bad = Workflow::parse(
        "name = \"t\"\n[[steps]]\nname = \"a\"\ntarget = \"tag\"\nretries = \"many\"\n",
        Format::Toml,
    )
    .unwrap_err()
    .to_string();
    assert!(bad.contains("steps[0].retries"), "{bad}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_answers_queries_with_paging_and_keeps_its_bounds() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("h.sqlite");
    let p = pool(&path, EngineConfig::default()).await;
    p.engine
        .register(Workflow::new("ok").step(Step::new("a", "tag")))
        .unwrap();
    p.engine
        .register(Workflow::new("bad").step(Step::new("a", "fail")))
        .unwrap();
    for i in 0..5 {
        let id = p.engine.start("ok", &i.to_string()).await.unwrap();
        p.engine.wait(id, Duration::from_secs(10)).await.unwrap();
    }
    let id = p.engine.start("bad", "x").await.unwrap();
    p.engine.wait(id, Duration::from_secs(10)).await.unwrap();
    let page = p
        .engine
        .list(Filter {
            workflow: Some("ok".into()),
            limit: Some(2),
            ..Filter::default()
        })
        .await
        .unwrap();
    assert_eq!(page.executions.len(), 2);
    assert_eq!(page.executions[0].input, "4", "newest first");
    assert_eq!(page.next_offset, Some(2));
    let last = p
        .engine
        .list(Filter {
            workflow: Some("ok".into()),
            limit: Some(2),
            offset: Some(4),
            ..Filter::default()
        })
        .await
        .unwrap();
    assert_eq!((last.executions.len(), last.next_offset), (1, None));
    let failed = p
        .engine
        .list(Filter {
            status: Some("failed".into()),
            ..Filter::default()
        })
        .await
        .unwrap();
    assert_eq!(failed.executions.len(), 1);
    assert_eq!(failed.executions[0].workflow, "bad");
    let none = p
        .engine
        .list(Filter {
            since_ms: Some(u64::MAX / 2),
            ..Filter::default()
        })
        .await
        .unwrap();
    assert!(none.executions.is_empty());
    p.runtime.shutdown().await;
    // Reopened with a bound of 3 executions: the oldest go.
    let p = pool(
        &path,
        EngineConfig {
            retention_count: 3,
            ..EngineConfig::default()
        },
    )
    .await;
    p.engine.flush().await;
    let all = p.engine.list(Filter::default()).await.unwrap();
    assert_eq!(all.executions.len(), 3);
    assert!(matches!(
        p.engine.get(1).await,
        Err(WorkflowError::UnknownExecution(1))
    ));
    p.runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_reopened_on_its_history_resumes_what_was_running() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("h.sqlite");
    let flow = || {
        Workflow::new("resumable")
            .step(Step::new("first", "upper"))
            .step(Step::new("second", "hang").after(["first"]))
    };
    let p = pool(&path, EngineConfig::default()).await;
    p.engine.register(flow()).unwrap();
    let mut events = p.engine.subscribe();
    let id = p.engine.start("resumable", "go").await.unwrap();
    // Wait until the second step is running, then copy the history mid-way.
    loop {
        let e = events.recv().await.unwrap();
        if e.kind == "step_queued" && e.step.as_deref() == Some("second") {
            break;
        }
    }
    p.engine.flush().await;
    // The history as a crash would leave it: a copy of the database and its write-ahead log
    // now, while the execution is mid-way (the process itself is killed with kill -9 in the
    // node's test; here the original engine keeps running, untouched).
    let crashed = d.path().join("crashed.sqlite");
    for ext in ["", "-wal"] {
        let from = format!("{}{ext}", path.display());
        if std::path::Path::new(&from).exists() {
            std::fs::copy(&from, format!("{}{ext}", crashed.display())).unwrap();
        }
    }
    // A new engine on that file, where `hang` answers at once: the execution resumes, keeps
    // `first` as it was and runs `second` again.
    let q = pool_with(&crashed, EngineConfig::default(), Duration::ZERO).await;
    let resumed = q.engine.resume().await.unwrap();
    assert_eq!(resumed, vec![id]);
    let v = q.engine.wait(id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(v.execution.status, "succeeded", "{v:?}");
    let first = v.steps.iter().find(|s| s.name == "first").unwrap();
    assert_eq!((first.status.as_str(), first.attempts), ("succeeded", 1));
    let second = v.steps.iter().find(|s| s.name == "second").unwrap();
    assert_eq!(
        (second.status.as_str(), second.output.as_deref()),
        ("succeeded", Some("GO"))
    );
    let kinds: Vec<String> = q
        .engine
        .events(id)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert!(kinds.contains(&"resumed".to_owned()), "{kinds:?}");
    // Once: nothing more is running, and a second resume finds nothing.
    assert!(q.engine.resume().await.unwrap().is_empty());
    q.runtime.shutdown().await;
    p.runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_get_every_event_of_an_execution_in_order_as_stored() {
    let d = tempfile::tempdir().unwrap();
    let p = pool(&d.path().join("h.sqlite"), EngineConfig::default()).await;
    p.engine
        .register(
            Workflow::new("chain")
                .step(Step::new("a", "upper"))
                .step(Step::new("b", "tag").after(["a"]))
                .step(Step::new("c", "slow").after(["b"])),
        )
        .unwrap();
    let mut live = p.engine.subscribe();
    let id = p.engine.start("chain", "x").await.unwrap();
    let mut seen = Vec::new();
    loop {
        let e = live.recv().await.unwrap();
        if e.execution != id {
            continue;
        }
        let last = e.kind == "finished";
        seen.push(e);
        if last {
            break;
        }
    }
    let seqs: Vec<u64> = seen.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=seen.len() as u64).collect::<Vec<_>>(),
        "{seen:?}"
    );
    assert_eq!(seen.first().unwrap().kind, "started");
    assert_eq!(
        p.engine.events(id).await.unwrap(),
        seen,
        "the history holds what was streamed"
    );
    for step in ["a", "b", "c"] {
        let kinds = kinds_of(&seen, step);
        assert_eq!(
            kinds.first().map(String::as_str),
            Some("step_queued"),
            "{kinds:?}"
        );
        assert!(kinds.contains(&"step_started".to_owned()), "{kinds:?}");
        assert_eq!(
            kinds.last().map(String::as_str),
            Some("step_finished"),
            "{kinds:?}"
        );
    }
    p.runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_on_a_rate_limited_upstream_waits_instead_of_failing() {
    let d = tempfile::tempdir().unwrap();
    let p = pool(&d.path().join("h.sqlite"), EngineConfig::default()).await;
    p.engine
        .register(
            Workflow::new("patient")
                .step(Step::new("call", "limited").timeout(Duration::from_secs(10)))
                .step(Step::new("after", "tag").after(["call"])),
        )
        .unwrap();
    let id = p.engine.start("patient", "q").await.unwrap();
    let v = p.engine.wait(id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(v.execution.status, "succeeded", "{v:?}");
    // One task for the step: the runtime retried it after each "retry after", no step retry.
    assert_eq!(v.steps[0].attempts, 1);
    assert!(LIMITED_CALLS.load(Ordering::Acquire) >= 4);
    assert_eq!(v.steps[1].output.as_deref(), Some("[q]"));
    p.runtime.shutdown().await;
}

/// A local webhook receiver: answers 500 to its first `refuse` POSTs, then 200, and hands over
/// every body it accepted.
async fn receiver(refuse: usize) -> (String, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let seen = Arc::new(AtomicUsize::new(0));
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: String| {
            let (tx, seen) = (tx.clone(), seen.clone());
            async move {
                if seen.fetch_add(1, Ordering::AcqRel) < refuse {
                    return axum::http::StatusCode::INTERNAL_SERVER_ERROR;
                }
                let _ = tx.send(body);
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    (url, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_escalation_is_posted_to_the_workflows_webhook_through_a_failing_receiver() {
    // The receiver fails the first two tries; the third (the last allowed) is delivered.
    let (url, mut got) = receiver(2).await;
    let d = tempfile::tempdir().unwrap();
    let p = pool(&d.path().join("h.sqlite"), EngineConfig::default()).await;
    p.engine
        .register(
            Workflow::new("paged")
                .escalation_webhook(&url)
                .step(Step::new("s", "fail")),
        )
        .unwrap();
    let id = p.engine.start("paged", "x").await.unwrap();
    let v = p.engine.wait(id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(v.execution.status, "failed");
    let body = tokio::time::timeout(Duration::from_secs(20), got.recv())
        .await
        .expect("no delivery")
        .unwrap();
    let j: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(j["event"], "escalated");
    assert_eq!(j["workflow"], "paged");
    assert_eq!(j["execution"], id);
    assert_eq!(j["step"], "s");
    assert!(
        j["detail"].as_str().unwrap().contains("upstream said no"),
        "{j}"
    );
    // The same event as the history holds.
    let events = p.engine.events(id).await.unwrap();
    let stored = events.iter().find(|e| e.kind == "escalated").unwrap();
    assert_eq!(j["seq"], stored.seq);
    p.runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engines_webhook_serves_workflows_without_their_own_and_bad_urls_are_refused() {
    let (url, mut got) = receiver(0).await;
    let d = tempfile::tempdir().unwrap();
    let p = pool(
        &d.path().join("h.sqlite"),
        EngineConfig {
            escalation_webhook: Some(url),
            ..EngineConfig::default()
        },
    )
    .await;
    p.engine
        .register(
            Workflow::new("late")
                .deadline(Duration::from_millis(200))
                .step(Step::new("a", "hang")),
        )
        .unwrap();
    let id = p.engine.start("late", "x").await.unwrap();
    let body = tokio::time::timeout(Duration::from_secs(20), got.recv())
        .await
        .expect("no delivery")
        .unwrap();
    let j: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (j["workflow"].as_str(), j["execution"].as_u64()),
        (Some("late"), Some(id))
    );
    // The execution's own deadline: no step.
    assert!(j["step"].is_null(), "{j}");

    for (bad, why) in [
        ("not a url", "not a URL"),
        ("ftp://example.com/hook", "scheme `ftp`"),
    ] {
        let e = p
            .engine
            .register(
                Workflow::new("w")
                    .escalation_webhook(bad)
                    .step(Step::new("a", "tag")),
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("escalation_webhook") && e.contains(why), "{e}");
    }
    let refused = Engine::open(
        p.runtime.handle(),
        StepTimings::new(),
        EngineConfig {
            history: d.path().join("other.sqlite"),
            escalation_webhook: Some("mailto:ops@example.com".into()),
            ..EngineConfig::default()
        },
    )
    .await
    .err()
    .unwrap()
    .to_string();
    assert!(refused.contains("escalation_webhook"), "{refused}");
    p.runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whoever_sees_finished_finds_the_execution_ended_in_the_history() {
    let d = tempfile::tempdir().unwrap();
    let p = pool(&d.path().join("h.sqlite"), EngineConfig::default()).await;
    p.engine
        .register(
            Workflow::new("quick")
                .step(Step::new("a", "tag"))
                .step(Step::new("b", "upper").after(["a"])),
        )
        .unwrap();
    let mut events = p.engine.subscribe();
    // Many short executions, each read back the moment its `finished` arrives: the race the
    // terminal client (`troupe workflow run`) lost when the event went out before the commit.
    for _ in 0..50 {
        let id = p.engine.start("quick", "x").await.unwrap();
        loop {
            let e = events.recv().await.unwrap();
            if e.execution == id && e.kind == "finished" {
                break;
            }
        }
        let v = p.engine.get(id).await.unwrap();
        assert_eq!(v.execution.status, "succeeded", "{v:?}");
        assert!(v.steps.iter().all(|s| s.status == "succeeded"), "{v:?}");
        let stored = p.engine.events(id).await.unwrap();
        assert_eq!(stored.last().map(|e| e.kind.as_str()), Some("finished"));
    }
    p.runtime.shutdown().await;
}
