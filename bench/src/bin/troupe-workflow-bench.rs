//! What the workflow layer costs: the same five steps run as a workflow execution (the engine,
//! its SQLite history in WAL mode) and as five plain tasks submitted one after another by the
//! caller, on the default 928-agent pool in this process.
//!
//! Closed loop: `--clients` callers each run an execution (or a chain of five tasks) and start
//! the next when it ends, for `--duration` after `--warmup`. Prints, per way of running:
//! executions per second, end-to-end p50 / p99 / max, CPU microseconds per execution, and the
//! ratio of the workflow's figures to the plain tasks'. bench/README.md has the figures.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use hdrhistogram::Histogram;
use troupe::{Outcome, RuntimeHandle, Task};
use troupe_bench::cpu_seconds;
use troupe_workflow::{Engine, EngineConfig, Step, StepTimings, Workflow};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "Five steps as a workflow (with its SQLite history) against five plain tasks.")]
struct Args {
    /// Callers running executions at once.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Measured time per way of running.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Unmeasured time before it.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// The steps: `noop` (echo agents, `reply`) or `io` (20 ms io agents, `fetch`).
    #[arg(long, default_value = "noop")]
    steps: String,
    /// The history file (default: a fresh one in the temporary directory, deleted after).
    #[arg(long)]
    history: Option<std::path::PathBuf>,
    /// Only the workflow (for a profile of the engine alone).
    #[arg(long)]
    workflow_only: bool,
}

const STEPS: usize = 5;

/// One way of running five steps.
#[derive(Clone)]
enum Way {
    Plain {
        runtime: RuntimeHandle,
        target: &'static str,
        input: &'static str,
    },
    Workflow {
        engine: Arc<Engine>,
        input: &'static str,
    },
}

impl Way {
    async fn once(&self) -> bool {
        match self {
            Way::Plain {
                runtime,
                target,
                input,
            } => {
                let mut payload = bytes::Bytes::from_static(input.as_bytes());
                for _ in 0..STEPS {
                    let task = Task::new(*target, payload).timeout(Duration::from_secs(30));
                    let Ok(h) = runtime.submit(task, Duration::from_secs(30)).await else {
                        return false;
                    };
                    match h.await {
                        // Like a workflow step, the next gets this one's output.
                        Outcome::Ok(out) => payload = out,
                        _ => return false,
                    }
                }
                true
            }
            Way::Workflow { engine, input } => {
                let Ok(id) = engine.start("five", input).await else {
                    return false;
                };
                engine
                    .finished(id, Duration::from_secs(60))
                    .await
                    .is_ok_and(|r| r.status == "succeeded")
            }
        }
    }
}

/// What one way of running measured.
struct Figures {
    per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    cpu_us: f64,
    failed: u64,
}

async fn measure(way: Way, args: &Args) -> Figures {
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..args.clients {
        let (way, stop, measuring) = (way.clone(), stop.clone(), measuring.clone());
        clients.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
            let mut failed = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let ok = way.once().await;
                if measuring.load(Ordering::Relaxed) {
                    if ok {
                        let _ = h.record(t.elapsed().as_micros().max(1) as u64);
                    } else {
                        failed += 1;
                    }
                }
            }
            (h, failed)
        }));
    }
    tokio::time::sleep(args.warmup).await;
    let cpu0 = cpu_seconds(std::process::id());
    let t0 = Instant::now();
    measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(args.duration).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds(std::process::id()) - cpu0;
    stop.store(true, Ordering::Relaxed);
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
    let mut failed = 0;
    for c in clients {
        if let Ok((h, f)) = c.await {
            let _ = all.add(&h);
            failed += f;
        }
    }
    let n = all.len().max(1) as f64;
    Figures {
        per_s: all.len() as f64 / elapsed,
        p50_ms: all.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: all.value_at_quantile(0.99) as f64 / 1000.0,
        max_ms: all.max() as f64 / 1000.0,
        cpu_us: cpu * 1e6 / n,
        failed,
    }
}

fn row(name: &str, r: &Figures) {
    println!(
        "{name:<22} {:>10.0} {:>9.3} {:>9.3} {:>9.3} {:>14.0} {:>7}",
        r.per_s, r.p50_ms, r.p99_ms, r.max_ms, r.cpu_us, r.failed
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (target, input): (&'static str, &'static str) = match args.steps.as_str() {
        "noop" => ("reply", "hello"),
        "io" => ("fetch", "latency=20,jitter=0"),
        other => anyhow::bail!("--steps {other}: use noop or io"),
    };
    let history = match &args.history {
        Some(p) => (p.clone(), None),
        None => {
            let d = tempfile::tempdir().context("a temporary directory")?;
            (d.path().join("history.sqlite"), Some(d))
        }
    };
    let catalogue = troupe_agents::Catalogue::default_pool().context("the built-in pool")?;
    let timings = StepTimings::new();
    let runtime = troupe_agents::builder(&catalogue, troupe::RuntimeConfig::default())
        .observe(timings.clone())
        .start()
        .await
        .context("starting the pool")?;
    let engine = Engine::open(
        runtime.handle(),
        timings,
        EngineConfig {
            history: history.0.clone(),
            ..EngineConfig::default()
        },
    )
    .await
    .context("opening the history")?;
    let mut w = Workflow::new("five").step(Step::new("s1", target));
    for i in 2..=STEPS {
        w = w.step(Step::new(format!("s{i}"), target).after([format!("s{}", i - 1)]));
    }
    engine.register(w).context("registering the workflow")?;

    println!(
        "{STEPS} {} steps in a chain, {} clients, closed loop, {:?} measured after {:?}; history {}",
        args.steps,
        args.clients,
        args.duration,
        args.warmup,
        history.0.display()
    );
    println!(
        "{:<22} {:>10} {:>9} {:>9} {:>9} {:>14} {:>7}",
        "", "execs/s", "p50 ms", "p99 ms", "max ms", "CPU µs/exec", "failed"
    );
    let plain = if args.workflow_only {
        None
    } else {
        let r = measure(
            Way::Plain {
                runtime: runtime.handle(),
                target,
                input,
            },
            &args,
        )
        .await;
        row("plain tasks", &r);
        Some(r)
    };
    let flow = measure(
        Way::Workflow {
            engine: engine.clone(),
            input,
        },
        &args,
    )
    .await;
    row("workflow (SQLite)", &flow);
    if let Some(plain) = plain {
        println!(
            "workflow / plain: throughput {:.2}×, p99 {:.2}×, CPU per execution {:.2}×",
            flow.per_s / plain.per_s.max(f64::MIN_POSITIVE),
            flow.p99_ms / plain.p99_ms.max(f64::MIN_POSITIVE),
            flow.cpu_us / plain.cpu_us.max(f64::MIN_POSITIVE)
        );
    }
    drop(engine);
    runtime.shutdown().await;
    Ok(())
}
