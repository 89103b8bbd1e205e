//! `troupe-suite`: the benchmark suite. The same workloads on Troupe (telemetry on and off),
//! actix, ractor and kameo, Troupe-only workloads, and scaling curves; writes bench/RESULTS.md
//! with a table per workload and SVG charts of the curves.
//!
//! `--quick` runs every workload once at tiny sizes (the test suite does this so a broken
//! workload is caught); `bench/run.sh` runs the full suite. `--only TEXT` runs only the peer
//! rows whose "workload system|" contains TEXT (`--only "request/reply troupe"`; a trailing
//! `|` anchors the system's end: `--only "actors troupe|"` leaves out "troupe (telemetry
//! off)") and prints their tables: the before/after of one change.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use plotters::prelude::*;
use troupe::{Overflow, Priority};
use troupe_bench::peers::{self, MailboxFull};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Sizes: full or quick.
#[derive(Clone, Copy)]
struct Sizes {
    reps: usize,
    curve_reps: usize,
    tell_one: u64,
    tell_many: u64,
    asks: u64,
    fan_rounds: u64,
    publish: u64,
    spawn: &'static [usize],
    agents: &'static [usize],
    payloads: &'static [usize],
    curve_msgs: u64,
    skynet: bool,
    tasks: u64,
    io_secs: f64,
}

const FULL: Sizes = Sizes {
    reps: 9,
    curve_reps: 3,
    tell_one: 200_000,
    tell_many: 200,
    asks: 20_000,
    fan_rounds: 300,
    publish: 200,
    spawn: &[1, 100, 928, 10_000],
    agents: &[1, 10, 100, 928, 10_000],
    payloads: &[0, 64, 1024, 16 * 1024, 64 * 1024],
    curve_msgs: 200_000,
    skynet: true,
    tasks: 200_000,
    io_secs: 3.0,
};

const QUICK: Sizes = Sizes {
    reps: 1,
    curve_reps: 1,
    tell_one: 2_000,
    tell_many: 2,
    asks: 200,
    fan_rounds: 2,
    publish: 2,
    spawn: &[1, 100],
    agents: &[1, 100],
    payloads: &[0, 1024],
    curve_msgs: 2_000,
    skynet: false,
    tasks: 2_000,
    io_secs: 0.3,
};

/// Troupe's default mailbox bound: the bound the "(mailbox 1 024)" rows give a peer too.
const TROUPE_MAILBOX: usize = 1024;

/// `--only TEXT`: measure only the peer rows whose "workload system" contains TEXT, print
/// their tables and write nothing (for before/after runs of one row).
static ONLY: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Whether `--only` leaves out the row of `system` in workload `title`.
fn skipped(title: &str, system: &str) -> bool {
    ONLY.get()
        .is_some_and(|only| !format!("{title} {system}|").contains(only.as_str()))
}

/// One measured workload: a value per repetition per system.
struct Table {
    title: String,
    unit: &'static str,
    higher_is_better: bool,
    note: String,
    rows: Vec<(String, Vec<f64>)>,
}

impl Table {
    fn new(
        title: impl Into<String>,
        unit: &'static str,
        higher_is_better: bool,
        note: &str,
    ) -> Self {
        Table {
            title: title.into(),
            unit,
            higher_is_better,
            note: note.to_owned(),
            rows: Vec::new(),
        }
    }

    fn measure(&mut self, system: &str, reps: usize, mut f: impl FnMut() -> f64) {
        if skipped(&self.title, system) {
            return;
        }
        eprintln!("  {:<44} {system}", self.title);
        let v = (0..reps).map(|_| f()).collect();
        self.rows.push((system.to_owned(), v));
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn fmt(v: f64) -> String {
    if !v.is_finite() {
        "—".to_owned()
    } else if v >= 1e6 {
        format!("{:.2} M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.1} K", v / 1e3)
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.4}")
    }
}

/// Systems compared in the peer workloads.
const TROUPE: &str = "troupe";
const TROUPE_OFF: &str = "troupe (telemetry off)";

struct Curve {
    title: String,
    x_label: &'static str,
    y_label: &'static str,
    file: &'static str,
    log_y: bool,
    series: Vec<(String, Vec<(f64, f64)>)>,
}

fn peer_tables(s: Sizes) -> Vec<Table> {
    let mut out = Vec::new();
    let r = s.reps;

    let mut t = Table::new(
        "tell → 1 actor",
        "messages/s",
        true,
        "One actor, messages sent back to back; a `fin` message ends the burst.",
    );
    t.measure(TROUPE, r, || peers::troupe::tell(1, s.tell_one, 0, true));
    t.measure(TROUPE_OFF, r, || {
        peers::troupe::tell(1, s.tell_one, 0, false)
    });
    t.measure("actix do_send", r, || {
        peers::actix::tell_do_send(1, s.tell_one, 0)
    });
    t.measure("actix send", r, || {
        peers::actix::tell_send(1, s.tell_one / 10, 0)
    });
    t.measure("ractor", r, || peers::ractor::tell(1, s.tell_one, 0));
    t.measure("kameo", r, || peers::kameo::tell(1, s.tell_one, 0));
    t.measure("kameo (mailbox 1 024)", r, || {
        peers::kameo::tell_bounded(1, s.tell_one, 0, Some(TROUPE_MAILBOX))
    });
    out.push(t);

    let mut t = Table::new(
        "tell → 928 actors",
        "messages/s",
        true,
        "Round robin over 928 actors.",
    );
    t.measure(TROUPE, r, || peers::troupe::tell(928, s.tell_many, 0, true));
    t.measure(TROUPE_OFF, r, || {
        peers::troupe::tell(928, s.tell_many, 0, false)
    });
    t.measure("actix do_send", r, || {
        peers::actix::tell_do_send(928, s.tell_many, 0)
    });
    t.measure("actix send", r, || {
        peers::actix::tell_send(928, (s.tell_many / 10).max(1), 0)
    });
    t.measure("ractor", r, || peers::ractor::tell(928, s.tell_many, 0));
    t.measure("kameo", r, || peers::kameo::tell(928, s.tell_many, 0));
    t.measure("kameo (mailbox 1 024)", r, || {
        peers::kameo::tell_bounded(928, s.tell_many, 0, Some(TROUPE_MAILBOX))
    });
    out.push(t);

    let mut asks = Table::new(
        "request/reply, serial",
        "asks/s",
        true,
        "One caller, one actor, each ask awaited before the next.",
    );
    let mut p99 = Table::new(
        "request/reply p99",
        "µs",
        false,
        "Latency of one ask (p99 of the serial run).",
    );
    let mut ask = |name: &str, f: &dyn Fn() -> peers::Latency| {
        if skipped("request/reply", name) {
            return;
        }
        let runs: Vec<peers::Latency> = (0..r).map(|_| f()).collect();
        eprintln!("  {:<44} {name}", "request/reply");
        asks.rows
            .push((name.to_owned(), runs.iter().map(|l| l.per_s).collect()));
        p99.rows
            .push((name.to_owned(), runs.iter().map(|l| l.p99_us).collect()));
    };
    ask(TROUPE, &|| peers::troupe::ask_serial(s.asks, 0, true));
    ask(TROUPE_OFF, &|| peers::troupe::ask_serial(s.asks, 0, false));
    ask("actix send", &|| peers::actix::ask_serial(s.asks, 0));
    ask("ractor", &|| peers::ractor::ask_serial(s.asks, 0));
    ask("kameo", &|| peers::kameo::ask_serial(s.asks, 0));
    out.push(asks);
    out.push(p99);

    let mut fan = Table::new(
        "fan-out/fan-in, 1 → 928 → 1",
        "rounds/s",
        true,
        "One caller asks all 928 actors at once and gathers every reply. Troupe: its bus's scatter-gather, `Bus::request_all` (one deadline, one wake-up when the last reply is in); the row \"troupe (join_all of requests)\" writes it as the peers do, a `join_all` of 928 single requests. Peers: `join_all` of their asks.",
    );
    let mut fan99 = Table::new(
        "fan-out/fan-in p99",
        "ms",
        false,
        "Latency of one whole round.",
    );
    let mut fanf = |name: &str, f: &dyn Fn() -> peers::Latency| {
        if skipped("fan-out/fan-in", name) {
            return;
        }
        let runs: Vec<peers::Latency> = (0..r).map(|_| f()).collect();
        eprintln!("  {:<44} {name}", "fan-out/fan-in");
        fan.rows
            .push((name.to_owned(), runs.iter().map(|l| l.per_s).collect()));
        fan99.rows.push((
            name.to_owned(),
            runs.iter().map(|l| l.p99_us / 1000.0).collect(),
        ));
    };
    fanf(TROUPE, &|| {
        peers::troupe::request_all(928, s.fan_rounds, true)
    });
    fanf(TROUPE_OFF, &|| {
        peers::troupe::request_all(928, s.fan_rounds, false)
    });
    fanf("troupe (join_all of requests)", &|| {
        peers::troupe::fan_out(928, s.fan_rounds, true)
    });
    fanf("actix send", &|| peers::actix::fan_out(928, s.fan_rounds));
    fanf("ractor", &|| peers::ractor::fan_out(928, s.fan_rounds));
    fanf("kameo", &|| peers::kameo::fan_out(928, s.fan_rounds));
    out.push(fan);
    out.push(fan99);

    let mut t = Table::new(
        "publish → 928 subscribers",
        "deliveries/s",
        true,
        "Troupe: a topic. ractor: a process group (`pg`). actix and kameo have no topic in their core crates: a tell to each subscriber.",
    );
    t.measure(TROUPE, r, || peers::troupe::publish(928, s.publish, true));
    t.measure(TROUPE_OFF, r, || {
        peers::troupe::publish(928, s.publish, false)
    });
    t.measure("actix do_send", r, || peers::actix::publish(928, s.publish));
    t.measure("ractor", r, || peers::ractor::publish(928, s.publish));
    t.measure("kameo", r, || peers::kameo::publish(928, s.publish));
    out.push(t);

    for &n in s.spawn {
        let mut t = Table::new(
            format!("spawn {n} actors"),
            "ms",
            false,
            "Until every actor has started. Troupe: a whole runtime with one tier of `n` supervised agents, ready for work.",
        );
        t.measure(TROUPE, r, || peers::troupe::spawn(n, true) * 1000.0);
        t.measure("actix", r, || peers::actix::spawn(n) * 1000.0);
        t.measure("ractor", r, || peers::ractor::spawn(n) * 1000.0);
        t.measure("kameo", r, || peers::kameo::spawn(n) * 1000.0);
        out.push(t);
    }

    if s.skynet {
        let mut t = Table::new(
            "skynet (1 M short-lived actors)",
            "s",
            false,
            "A tree of actors, 10 children each, 10^6 leaves, summing their numbers. Troupe is not in this table: it hosts a fixed, supervised pool and has no per-request actor spawn (see the notes).",
        );
        t.measure("actix", 3.min(r), peers::actix::skynet);
        t.measure("ractor", 3.min(r), peers::ractor::skynet);
        t.measure("kameo", 3.min(r), peers::kameo::skynet);
        out.push(t);
    }
    out
}

fn mailbox_rows() -> Vec<(String, MailboxFull)> {
    eprintln!("  mailbox full");
    vec![
        (
            "troupe `reject` (try_send)".to_owned(),
            peers::troupe::mailbox_full(Overflow::Reject),
        ),
        (
            "troupe `drop_newest`".to_owned(),
            peers::troupe::mailbox_full(Overflow::DropNewest),
        ),
        (
            "troupe `wait`".to_owned(),
            peers::troupe::mailbox_full(Overflow::Wait {
                timeout: Duration::from_secs(30),
            }),
        ),
        (
            "actix do_send".to_owned(),
            peers::actix::mailbox_full("do_send"),
        ),
        (
            "actix try_send".to_owned(),
            peers::actix::mailbox_full("try_send"),
        ),
        ("actix send".to_owned(), peers::actix::mailbox_full("send")),
        ("ractor cast".to_owned(), peers::ractor::mailbox_full()),
        (
            "kameo tell try_send".to_owned(),
            peers::kameo::mailbox_full(true),
        ),
        (
            "kameo tell send".to_owned(),
            peers::kameo::mailbox_full(false),
        ),
    ]
}

fn troupe_only(s: Sizes) -> Vec<Table> {
    let rt = peers::tokio_rt();
    let r = s.reps;
    let mut out = Vec::new();

    let mut t = Table::new(
        "tasks, submit → outcome",
        "tasks/s",
        true,
        "No-op tasks to 928 agents, windows of 10 000 in flight.",
    );
    for (name, mix) in [
        ("all normal", &[Priority::Normal][..]),
        ("uniform over 5 priorities", &Priority::ALL[..]),
        (
            "90 % low, 10 % critical",
            &[
                Priority::Critical,
                Priority::Low,
                Priority::Low,
                Priority::Low,
                Priority::Low,
                Priority::Low,
                Priority::Low,
                Priority::Low,
                Priority::Low,
                Priority::Low,
            ][..],
        ),
    ] {
        t.measure(name, r, || rt.block_on(tasks_per_s(s.tasks, mix)));
    }
    out.push(t);

    let worker = std::env::current_exe()
        .map(|p| p.with_file_name("troupe-bench-worker"))
        .unwrap_or_default();
    let mut t = Table::new(
        "tri-sandbox overhead",
        "tasks/s",
        true,
        "No-op `echo` tasks run once, on three thread lanes, and on three worker-process lanes (2-of-3 vote).",
    );
    for (name, mode, sandboxed, n) in [
        (
            "run once",
            troupe::sandbox::LaneMode::Threads,
            false,
            s.tasks / 4,
        ),
        (
            "thread lanes",
            troupe::sandbox::LaneMode::Threads,
            true,
            s.tasks / 4,
        ),
        (
            "process lanes",
            troupe::sandbox::LaneMode::Process,
            true,
            s.tasks / 100,
        ),
    ] {
        if mode == troupe::sandbox::LaneMode::Process && !worker.exists() {
            eprintln!(
                "  (no {} next to this binary: process lanes skipped)",
                worker.display()
            );
            continue;
        }
        let w = worker.display().to_string();
        t.measure(name, r, || {
            rt.block_on(async {
                let pool = troupe_agents::register_kinds(troupe::Runtime::builder(
                    troupe_bench::sandbox_config(mode, &w),
                ))
                .start()
                .await
                .expect("pool starts");
                let window = n.clamp(1, 10_000);
                let iters = (n / window).max(1);
                let d = troupe_bench::timed_task_windows(
                    &pool.handle(),
                    "echo",
                    window,
                    sandboxed,
                    iters,
                )
                .await;
                pool.shutdown().await;
                (window * iters) as f64 / d.as_secs_f64()
            })
        });
    }
    out.push(t);

    out.push(saturation_table(r));

    let mut t = Table::new(
        "I/O-bound pool, 928 agents × 20 ms",
        "tasks/s",
        true,
        "Every task awaits 20 ms (a timer, as an upstream call would); 4 000 kept in flight. The ceiling is 928 / 20 ms = 46 400 tasks/s.",
    );
    t.measure("troupe", r, || rt.block_on(io_bound(s.io_secs)));
    out.push(t);

    out
}

/// Resident memory per idle agent, Troupe and each peer, each in a fresh process.
fn memory_tables(s: Sizes) -> Vec<Table> {
    let r = s.reps;
    let mut out = Vec::new();
    for n in [928usize, 10_000] {
        let mut t = Table::new(
            format!("memory per idle agent, {n} agents"),
            "bytes",
            false,
            "Resident memory of a fresh process after starting the pool (or the actors) and letting it settle, minus before, over the agents: each agent's or actor's task, mailbox and state (Troupe: its slot and work group too, and its runtime's fixed parts spread over the agents). mimalloc's transparent huge pages are off in that process (`MIMALLOC_ALLOW_THP=0`), so pages count at 4 KiB rather than in 2 MiB steps.",
        );
        for system in ["troupe", "actix", "ractor", "kameo"] {
            t.measure(system, r.min(3), || rss_per_agent(n, system));
        }
        out.push(t);
    }
    out
}

async fn tasks_per_s(n: u64, mix: &[Priority]) -> f64 {
    let pool = troupe_bench::start(928).await;
    let handle = pool.runtime.handle();
    let window = n.min(10_000);
    let mut handles = Vec::with_capacity(window as usize);
    let t = Instant::now();
    let mut sent = 0;
    while sent < n {
        for i in 0..window {
            let task = troupe::Task::new("noop", bytes::Bytes::from_static(b"x"))
                .priority(mix[(i as usize) % mix.len()]);
            handles.push(handle.try_submit(task).expect("admitted"));
        }
        for h in handles.drain(..) {
            assert!(h.await.is_ok());
        }
        sent += window;
    }
    let r = sent as f64 / t.elapsed().as_secs_f64();
    pool.runtime.shutdown().await;
    r
}

/// Busy for 1 ms per task, so queues build up.
struct Busy;
impl troupe::Agent for Busy {
    async fn handle(
        &mut self,
        t: troupe::TaskRequest,
        _: &troupe::AgentContext,
    ) -> Result<bytes::Bytes, troupe::TaskError> {
        tokio::time::sleep(Duration::from_millis(1)).await;
        Ok(t.payload)
    }
}

/// Queue wait per priority under saturation, with the strict-priority ideal for critical.
fn saturation_table(r: usize) -> Table {
    let rt = peers::tokio_rt();
    let mut t = Table::new(
        "queue wait under saturation, p99",
        "ms",
        false,
        "8 agents that each spend 1 ms per task get a burst of 4 000 tasks, uniform over the priorities: p99 time queued, per priority (runtime stats). The last row is the ideal for critical under strict priority: the same 800 critical tasks submitted alone, with nothing else queued.",
    );
    let runs: Vec<Vec<f64>> = (0..r)
        .map(|_| rt.block_on(saturated_wait(&Priority::ALL)))
        .collect();
    for (i, p) in Priority::ALL.iter().enumerate() {
        t.rows
            .push((p.as_str().to_owned(), runs.iter().map(|v| v[i]).collect()));
    }
    let alone: Vec<f64> = (0..r)
        .map(|_| rt.block_on(saturated_wait(&[Priority::Critical]))[0])
        .collect();
    t.rows.push(("critical alone (ideal)".to_owned(), alone));
    t
}

/// Queue-wait p99 per priority after a burst of 800 tasks of each priority in `mix` (uniform),
/// submitted at once to 8 agents that spend 1 ms per task.
async fn saturated_wait(mix: &[Priority]) -> Vec<f64> {
    let c = troupe_bench::base_config().tier(troupe::TierConfig::new("busy").agents("busy", 8));
    let rt = troupe::Runtime::builder(c)
        .register("busy", |_: &troupe::AgentSpec| Busy)
        .start()
        .await
        .expect("pool starts");
    let mut handles = Vec::new();
    for i in 0..800 * mix.len() {
        let task =
            troupe::Task::new("busy", bytes::Bytes::from_static(b"x")).priority(mix[i % mix.len()]);
        handles.push(rt.try_submit(task).expect("admitted"));
    }
    for h in handles {
        h.await;
    }
    let stats = rt.stats();
    rt.shutdown().await;
    mix.iter()
        .map(|&p| stats.priority(p).queue_wait.p99_us / 1000.0)
        .collect()
}

/// Sleeps 20 ms per task.
struct Upstream;
impl troupe::Agent for Upstream {
    async fn handle(
        &mut self,
        t: troupe::TaskRequest,
        _: &troupe::AgentContext,
    ) -> Result<bytes::Bytes, troupe::TaskError> {
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok(t.payload)
    }
}

async fn io_bound(secs: f64) -> f64 {
    let c = troupe_bench::base_config().tier(troupe::TierConfig::new("io").agents("io", 928));
    let rt = troupe::Runtime::builder(c)
        .register("io", |_: &troupe::AgentSpec| Upstream)
        .start()
        .await
        .expect("pool starts");
    let h = rt.handle();
    let mut inflight = futures_util::stream::FuturesUnordered::new();
    use futures_util::StreamExt;
    let submit = |h: &troupe::RuntimeHandle| {
        h.try_submit(troupe::Task::new("io", bytes::Bytes::from_static(b"x")))
            .expect("admitted")
    };
    for _ in 0..4_000 {
        inflight.push(submit(&h));
    }
    let t = Instant::now();
    let mut done = 0u64;
    while let Some(o) = inflight.next().await {
        assert!(o.is_ok());
        done += 1;
        if t.elapsed().as_secs_f64() < secs {
            inflight.push(submit(&h));
        }
    }
    let r = done as f64 / t.elapsed().as_secs_f64();
    rt.shutdown().await;
    r
}

/// Runs this binary again with `--rss N` so the measurement starts from a fresh process.
fn rss_per_agent(n: usize, system: &str) -> f64 {
    let exe = std::env::current_exe().expect("own path");
    // mimalloc backs its arenas with transparent huge pages, so a fresh process's resident
    // memory moves in 2 MiB steps and where an arena boundary falls would decide the figure
    // (a quarter of it at 928 agents). Counted in 4 KiB pages instead, for every system.
    let out = std::process::Command::new(exe)
        .env("MIMALLOC_ALLOW_THP", "0")
        .args(["--rss", &n.to_string(), system])
        .output()
        .expect("child runs");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(f64::NAN)
}

/// The child of [`rss_per_agent`]: starts `n` agents of `system` in this fresh process and
/// prints the resident memory per agent.
fn rss_child(n: usize, system: &str) {
    let per = match system {
        "actix" => peers::actix::idle_memory(n),
        "ractor" => peers::ractor::idle_memory(n),
        "kameo" => peers::kameo::idle_memory(n),
        _ => peers::tokio_rt().block_on(async {
            let before = peers::rss_bytes();
            let pool = troupe_bench::start(n).await;
            tokio::time::sleep(peers::SETTLE).await;
            let per = peers::per_actor(before, n);
            pool.runtime.shutdown().await;
            per
        }),
    };
    println!("{per}");
}

fn curves(s: Sizes) -> Vec<Curve> {
    let r = s.curve_reps;
    let med = |f: &dyn Fn() -> f64| median(&(0..r).map(|_| f()).collect::<Vec<_>>());
    let mut tput = Curve {
        title: "Tell throughput by number of actors".into(),
        x_label: "actors",
        y_label: "messages/s",
        file: "scaling-actors-throughput.svg",
        log_y: true,
        series: Vec::new(),
    };
    let mut lat = Curve {
        title: "Fan-out/fan-in round p99 by number of actors".into(),
        x_label: "actors",
        y_label: "p99 per round (ms)",
        file: "scaling-actors-p99.svg",
        log_y: true,
        series: Vec::new(),
    };
    type Tell = fn(usize, u64, usize) -> f64;
    type Fan = fn(usize, u64) -> peers::Latency;
    let systems: [(&str, Tell, Fan); 4] = [
        (
            TROUPE,
            |a, p, b| peers::troupe::tell(a, p, b, true),
            |a, r| peers::troupe::request_all(a, r, true),
        ),
        ("actix", peers::actix::tell_do_send, peers::actix::fan_out),
        ("ractor", peers::ractor::tell, peers::ractor::fan_out),
        ("kameo", peers::kameo::tell, peers::kameo::fan_out),
    ];
    for (name, tell, fan) in systems {
        eprintln!("  scaling by actors               {name}");
        let mut tp = Vec::new();
        let mut lp = Vec::new();
        for &n in s.agents {
            let per = (s.curve_msgs / n as u64).max(1);
            tp.push((n as f64, med(&|| tell(n, per, 0))));
            let rounds = (s.fan_rounds * 928 / n as u64).clamp(2, 200);
            lp.push((n as f64, med(&|| fan(n, rounds).p99_us / 1000.0)));
        }
        tput.series.push((name.to_owned(), tp));
        lat.series.push((name.to_owned(), lp));
    }
    let mut ptput = Curve {
        title: "Tell throughput to 928 actors by payload size".into(),
        x_label: "payload (bytes, 0 drawn at 1)",
        y_label: "messages/s",
        file: "scaling-payload-throughput.svg",
        log_y: true,
        series: Vec::new(),
    };
    let mut plat = Curve {
        title: "Serial ask p99 by payload size".into(),
        x_label: "payload (bytes, 0 drawn at 1)",
        y_label: "p99 (µs)",
        file: "scaling-payload-p99.svg",
        log_y: true,
        series: Vec::new(),
    };
    type Ask = fn(u64, usize) -> peers::Latency;
    let systems: [(&str, Tell, Ask); 4] = [
        (
            TROUPE,
            |a, p, b| peers::troupe::tell(a, p, b, true),
            |n, b| peers::troupe::ask_serial(n, b, true),
        ),
        (
            "actix",
            peers::actix::tell_do_send,
            peers::actix::ask_serial,
        ),
        ("ractor", peers::ractor::tell, peers::ractor::ask_serial),
        ("kameo", peers::kameo::tell, peers::kameo::ask_serial),
    ];
    for (name, tell, ask) in systems {
        eprintln!("  scaling by payload              {name}");
        let mut tp = Vec::new();
        let mut lp = Vec::new();
        for &b in s.payloads {
            let x = (b as f64).max(1.0);
            tp.push((x, med(&|| tell(928, (s.curve_msgs / 928).max(1), b))));
            lp.push((x, med(&|| ask(s.asks / 4, b).p99_us)));
        }
        ptput.series.push((name.to_owned(), tp));
        plat.series.push((name.to_owned(), lp));
    }
    vec![tput, lat, ptput, plat]
}

const COLOURS: [RGBColor; 4] = [
    RGBColor(214, 39, 40),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];

fn draw(c: &Curve, path: &Path) -> Result<(), String> {
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let pts = c.series.iter().flat_map(|s| s.1.iter());
    let (x0, x1, y0, y1) = pts.fold((f64::MAX, 0f64, f64::MAX, 0f64), |a, p| {
        (a.0.min(p.0), a.1.max(p.0), a.2.min(p.1), a.3.max(p.1))
    });
    let (x0, x1) = (x0.max(0.5) / 1.5, x1 * 1.5);
    let (y0, y1) = ((y0.max(1e-6)) / 2.0, y1 * 2.0);
    let root = SVGBackend::new(path, (760, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(&c.title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale())
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc(c.x_label)
        .y_desc(c.y_label)
        .y_label_formatter(&|y| fmt(*y))
        .x_label_formatter(&|x| {
            if *x >= 1.0 {
                format!("{}", x.round() as u64)
            } else {
                String::new()
            }
        })
        .draw()
        .map_err(|x| e(&x))?;
    for (i, (name, pts)) in c.series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), colour.stroke_width(2)))
            .map_err(|x| e(&x))?
            .label(name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
            });
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 3, colour.filled())))
            .map_err(|x| e(&x))?;
    }
    let _ = c.log_y;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<u64>().ok())
        })
        .map_or("?".into(), |kb| {
            format!("{:.0} GiB", kb as f64 / 1024.0 / 1024.0)
        });
    let rustc = std::process::Command::new("rustc")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    format!(
        "{cpu}, {cores} cores, {mem} RAM, Linux; {rustc}; every system built in this one binary with the workspace's release profile ({}); every system on {} worker threads; versions: {}",
        release_profile(),
        peers::THREADS,
        versions()
    )
}

/// The `[profile.release]` settings this binary was built with, read from the workspace's
/// Cargo.toml at build time (so RESULTS.md cannot state a profile it was not built with).
fn release_profile() -> String {
    let toml = include_str!("../../../Cargo.toml");
    let Some(at) = toml.find("[profile.release]") else {
        return "Cargo defaults".into();
    };
    toml[at + "[profile.release]".len()..]
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with('['))
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The versions of the systems compared, from the Cargo.lock this binary was built against.
fn versions() -> String {
    let lock = include_str!("../../../Cargo.lock");
    let version = |name: &str| {
        let needle = format!("name = \"{name}\"\nversion = \"");
        lock.find(&needle).map_or("?".to_owned(), |i| {
            let rest = &lock[i + needle.len()..];
            rest[..rest.find('"').unwrap_or(0)].to_owned()
        })
    };
    ["tokio", "actix", "actix-rt", "ractor", "kameo"]
        .map(|n| format!("{n} {}", version(n)))
        .join(", ")
}

fn table_md(out: &mut String, t: &Table) {
    let _ = writeln!(out, "### {}\n\n{}\n", t.title, t.note);
    let base = t.rows.first().map(|r| (r.0.clone(), median(&r.1)));
    let better = if t.higher_is_better {
        "higher is better"
    } else {
        "lower is better"
    };
    let base_name = base.as_ref().map_or("", |b| b.0.as_str());
    let _ = writeln!(
        out,
        "| system | median ({}) | spread (min – max) | × {base_name} |\n| --- | ---: | ---: | ---: |",
        t.unit
    );
    for (name, v) in &t.rows {
        let m = median(v);
        let lo = v.iter().copied().fold(f64::MAX, f64::min);
        let hi = v.iter().copied().fold(f64::MIN, f64::max);
        let ratio = base.as_ref().map_or("—".to_owned(), |b| match m / b.1 {
            r if !r.is_finite() => "—".into(),
            r if r < 0.1 => format!("{r:.4}"),
            r => format!("{r:.2}"),
        });
        let _ = writeln!(
            out,
            "| {name} | {} | {} – {} | {ratio} |",
            fmt(m),
            fmt(lo),
            fmt(hi)
        );
    }
    let _ = writeln!(
        out,
        "\n*{} runs each; {better}; the last column is each median over the first row's.*\n",
        t.rows.first().map_or(0, |r| r.1.len())
    );
}

/// The README's marker pair around the generated summary.
const SUMMARY_BEGIN: &str = "<!-- bench-summary: written by bench/run.sh -->";
const SUMMARY_END: &str = "<!-- /bench-summary -->";

/// One sentence per headline workload: Troupe's median against each peer's, from `tables`.
fn summary_md(tables: &[Table], seconds: f64) -> String {
    let mut out = format!(
        "Against its peers on the same 2-core machine (the last `bench/run.sh`, {seconds:.0} s; \
         medians, full tables with spreads in [bench/RESULTS.md](bench/RESULTS.md)):"
    );
    let headline = [
        "tell → 928 actors",
        "request/reply, serial",
        "request/reply p99",
        "fan-out/fan-in, 1 → 928 → 1",
        "fan-out/fan-in p99",
        "publish → 928 subscribers",
        "spawn 928 actors",
        "spawn 10000 actors",
        "memory per idle agent, 10000 agents",
    ];
    let mut parts = Vec::new();
    for title in headline {
        let Some(t) = tables.iter().find(|t| t.title == title) else {
            continue;
        };
        let Some((_, first)) = t.rows.first() else {
            continue;
        };
        let peers: Vec<String> = t
            .rows
            .iter()
            .skip(1)
            .filter(|(name, _)| !name.starts_with("troupe"))
            .map(|(name, v)| format!("{name} {}", fmt(median(v))))
            .collect();
        parts.push(format!(
            "- {title} ({}): Troupe **{}**; {}",
            t.unit,
            fmt(median(first)),
            peers.join(", ")
        ));
    }
    out.push_str("\n\n");
    out.push_str(&parts.join("\n"));
    out
}

/// Replaces what lies between the summary markers of `readme` with `summary`.
fn splice_readme(readme: &Path, summary: &str) -> Result<(), String> {
    let text = std::fs::read_to_string(readme).map_err(|e| e.to_string())?;
    let (Some(a), Some(b)) = (text.find(SUMMARY_BEGIN), text.find(SUMMARY_END)) else {
        return Err(format!("no {SUMMARY_BEGIN} … {SUMMARY_END} markers"));
    };
    if b < a {
        return Err("the markers are out of order".into());
    }
    let new = format!("{}{SUMMARY_BEGIN}\n{summary}\n{}", &text[..a], &text[b..]);
    std::fs::write(readme, new).map_err(|e| e.to_string())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--rss") {
        let n = args.get(i + 1).and_then(|v| v.parse().ok()).unwrap_or(928);
        rss_child(n, args.get(i + 2).map_or("troupe", String::as_str));
        return;
    }
    if args.iter().any(|a| a == "--saturation") {
        // Only the queue-wait table, printed: for before/after runs of a scheduling change.
        let mut md = String::new();
        table_md(&mut md, &saturation_table(9));
        print!("{md}");
        return;
    }
    if let Some(only) = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
    {
        let _ = ONLY.set(only.clone());
        let mut md = String::new();
        for t in peer_tables(FULL).iter().filter(|t| !t.rows.is_empty()) {
            table_md(&mut md, t);
        }
        print!("{md}");
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let out_dir: PathBuf = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("bench"));
    let sizes = if quick { QUICK } else { FULL };
    let started = Instant::now();
    eprintln!("troupe-suite: peer workloads");
    let mut peer = peer_tables(sizes);
    peer.extend(memory_tables(sizes));
    eprintln!("troupe-suite: mailbox full");
    let mailbox = mailbox_rows();
    eprintln!("troupe-suite: Troupe-only workloads");
    let only = troupe_only(sizes);
    eprintln!("troupe-suite: scaling curves");
    let curves = curves(sizes);
    let charts = out_dir.join("results");
    let _ = std::fs::create_dir_all(&charts);
    for c in &curves {
        if let Err(e) = draw(c, &charts.join(c.file)) {
            eprintln!("chart {}: {e}", c.file);
        }
    }

    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Benchmark results\n\nWritten by `bench/run.sh` (`troupe-suite`{}) in {:.0} s. Machine: {}.\n",
        if quick {
            " --quick: tiny sizes, one run — not figures to quote"
        } else {
            ""
        },
        started.elapsed().as_secs_f64(),
        machine()
    );
    md.push_str(include_str!("../../RESULTS.head.md"));
    md.push_str("\n## Peer workloads\n\n");
    for t in &peer {
        table_md(&mut md, t);
    }
    md.push_str("### Mailbox full\n\nA bounded mailbox of 1 000 (where the system has bounds), a consumer spending 20 µs per message, 10 000 sends as fast as the sender can. Measured the same way for every system: *handled* is the handler's own count after a final `fin`; *queued when sends ended* is what was accepted (sent − refused − dropped) less what the handler had counted at that moment.\n\n| system / call | sent | handled | refused | dropped | queued when sends ended | send time (ms) | behaviour |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n");
    for (name, m) in &mailbox {
        let _ = writeln!(
            md,
            "| {name} | {} | {} | {} | {} | {} | {:.1} | {} |",
            m.sent, m.handled, m.refused, m.dropped, m.queued_at_end, m.send_ms, m.behaviour
        );
    }
    md.push_str("\n## Troupe-only workloads\n\n");
    for t in &only {
        table_md(&mut md, t);
    }
    md.push_str("## Scaling curves\n\nMedians of the runs; both axes logarithmic.\n\n");
    for c in &curves {
        let _ = writeln!(md, "![{}](results/{})\n", c.title, c.file);
        let _ = write!(md, "| {} |", c.x_label);
        for (name, _) in &c.series {
            let _ = write!(md, " {name} |");
        }
        let _ = write!(md, "\n| ---: |{}\n", " ---: |".repeat(c.series.len()));
        if let Some((_, first)) = c.series.first() {
            for (i, (x, _)) in first.iter().enumerate() {
                let _ = write!(md, "| {} |", *x as u64);
                for (_, pts) in &c.series {
                    let _ = write!(md, " {} |", pts.get(i).map_or("—".into(), |p| fmt(p.1)));
                }
                md.push('\n');
            }
        }
        let _ = writeln!(md, "\n*{} ({})*\n", c.title, c.y_label);
    }
    let path = out_dir.join("RESULTS.md");
    if let Err(e) = std::fs::write(&path, md) {
        eprintln!("writing {}: {e}", path.display());
        std::process::exit(1);
    }
    // The main README's peer lines come from this same run, never copied by hand. A quick run
    // is no figure to quote, and a run written elsewhere leaves the README alone.
    if !quick && out_dir == Path::new("bench") {
        let summary = summary_md(&peer, started.elapsed().as_secs_f64());
        if let Err(e) = splice_readme(Path::new("README.md"), &summary) {
            eprintln!("README.md summary: {e}");
        }
    }
    eprintln!(
        "troupe-suite: wrote {} in {:.0} s",
        path.display(),
        started.elapsed().as_secs_f64()
    );
}
