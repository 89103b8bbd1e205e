//! Starts a 928-agent pool in six tiers, pushes tasks and bus messages through it, and prints
//! throughput and exact latency percentiles.
//!
//! ```text
//! cargo run --release -p troupe --example pool [-- --tasks 1000000 --messages 2000000 --telemetry off]
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context, bail};
use bytes::Bytes;
use troupe::{
    Agent, AgentContext, AgentSpec, LatencySummary, Message, Priority, Runtime, RuntimeConfig,
    Task, TaskError, TaskRequest, TierConfig,
};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The tiers of the default pool: 928 agents.
const TIERS: [(&str, usize); 6] = [
    ("cecca", 3),
    ("board", 15),
    ("executive", 25),
    ("stack_chief", 50),
    ("specialist", 200),
    ("micro", 635),
];

/// Answers tasks with their payload; counts messages and reports the end of a burst.
struct Worker {
    received: u64,
    done: Arc<AtomicU64>,
}

impl Agent for Worker {
    async fn handle(&mut self, task: TaskRequest, _: &AgentContext) -> Result<Bytes, TaskError> {
        Ok(task.payload)
    }

    async fn on_message(&mut self, msg: Message, _: &AgentContext) -> Option<Bytes> {
        self.received += 1;
        if &msg.payload[..] == b"fin" {
            self.done.fetch_add(1, Ordering::Release);
        }
        None
    }
}

struct Args {
    tasks: u64,
    messages: u64,
    telemetry: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        tasks: 1_000_000,
        messages: 2_000_000,
        telemetry: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        if flag == "--telemetry" {
            args.telemetry = match value.as_str() {
                "on" => true,
                "off" => false,
                other => bail!("--telemetry takes `on` or `off`, not `{other}`"),
            };
            continue;
        }
        let n: u64 = value
            .replace('_', "")
            .parse()
            .with_context(|| format!("{flag}: `{value}` is not a number"))?;
        match flag.as_str() {
            "--tasks" => args.tasks = n,
            "--messages" => args.messages = n,
            other => {
                bail!("unknown flag {other} (expected --tasks N, --messages N, --telemetry on|off)")
            }
        }
    }
    Ok(args)
}

fn line(name: &str, l: &LatencySummary) {
    println!(
        "  {name:<11} n={:<9} p50={:>8.1}µs p90={:>8.1}µs p99={:>8.1}µs p99.9={:>8.1}µs max={:>9.1}µs",
        l.count, l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us
    );
}

/// Resident set size of this process, from /proc (Linux only).
fn resident() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(format!("{:.1} MiB", kib / 1024.0))
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let mut config = TIERS
        .iter()
        .fold(RuntimeConfig::default(), |c, &(name, n)| {
            c.tier(TierConfig::new(name).agents("worker", n))
        });
    config.telemetry.latency_histograms = args.telemetry;
    let done = Arc::new(AtomicU64::new(0));
    let d = done.clone();
    let started = Instant::now();
    let rt = Runtime::builder(config)
        .register("worker", move |_: &AgentSpec| Worker {
            received: 0,
            done: d.clone(),
        })
        .start()
        .await
        .context("starting the pool")?;
    let ready = started.elapsed();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    println!(
        "pool: {} agents in {} tiers ready in {:.2} ms; idle resident memory {}",
        rt.agent_count(),
        TIERS.len(),
        ready.as_secs_f64() * 1e3,
        resident().unwrap_or_else(|| "unknown".into())
    );

    // Tasks: submit in windows that fit the queues, await every outcome.
    let window = 8_192u64;
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < args.tasks {
        let n = window.min(args.tasks - sent);
        let mut handles = Vec::with_capacity(n as usize);
        for i in 0..n {
            let p = Priority::ALL[((sent + i) % 5) as usize];
            let task = Task::new("worker", Bytes::from_static(b"x")).priority(p);
            handles.push(rt.try_submit(task).map_err(|r| r.error)?);
        }
        for h in handles {
            if !h.await.is_ok() {
                bail!("a no-op task failed");
            }
        }
        sent += n;
    }
    let took = started.elapsed();
    println!(
        "tasks: {} submitted → completed in {:.3} s = {:.0} tasks/s",
        args.tasks,
        took.as_secs_f64(),
        args.tasks as f64 / took.as_secs_f64()
    );
    let stats = rt.stats();
    line("latency", &stats.latency);
    for p in Priority::ALL {
        line(p.as_str(), &stats.priority(p).latency);
    }

    // Messages: half direct sends round-robin, half publications to all 928 agents.
    let bus = rt.bus();
    let agents = rt.agent_count() as u64;
    let topic = bus.topic("tick")?;
    for a in 0..agents {
        bus.subscribe("tick", troupe::AgentId(a as u32))?;
    }
    let rounds = (args.messages / 2 / agents).max(1);
    let started = Instant::now();
    let payload = Bytes::from_static(b"m");
    for _ in 0..rounds {
        for a in 0..agents {
            // A full mailbox refuses the send; give the agents a moment and try again, so
            // every message is delivered and counted.
            while bus
                .try_send(troupe::AgentId(a as u32), payload.clone())
                .is_err()
            {
                tokio::task::yield_now().await;
            }
        }
        // Publications to a full mailbox are dropped and counted, not retried.
        topic.try_publish(payload.clone())?;
    }
    done.store(0, Ordering::Release);
    topic.publish(Bytes::from_static(b"fin")).await?;
    while done.load(Ordering::Acquire) < agents {
        tokio::task::yield_now().await;
    }
    let took = started.elapsed();
    let bus_stats = rt.stats().bus;
    let delivered = bus_stats.direct + bus_stats.publish;
    println!(
        "bus: {delivered} messages delivered ({} direct, {} published, {} dropped) in {:.3} s = {:.0} messages/s",
        bus_stats.direct,
        bus_stats.publish,
        bus_stats.dropped_mailbox_full,
        took.as_secs_f64(),
        delivered as f64 / took.as_secs_f64()
    );
    line("delivery", &bus_stats.delivery);

    let report = rt.shutdown().await;
    println!(
        "shutdown: drained {} cancelled {} in {:.2} ms",
        report.drained,
        report.cancelled,
        report.took.as_secs_f64() * 1e3
    );
    Ok(())
}
