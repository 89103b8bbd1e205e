//! The built-in agent kinds. Each answers tasks through [`Agent::handle`] and bus *requests*
//! through [`Agent::on_message`] with the same logic, so the router can fan out to any of them.
//!
//! | kind | payload | output |
//! | --- | --- | --- |
//! | `echo` | anything | the payload |
//! | `compute` | `N\|data` or `data` | 16 hex digits: `data` hashed `N` times (default `params.rounds`, 100) |
//! | `io` | anything, or `latency=MS,jitter=MS,fail=P` overrides | the payload, after waiting `latency ± jitter` ms; fails with probability `fail` |
//! | `router` | `cap:body` or `cap*N:body` | JSON `{"asked","replied","replies"}` from requests to every (or N) agents with capability (or kind) `cap` |
//! | `aggregator` | anything (ignored) | JSON rolling summary of its topic (`params.topic`, default `events`) |
//! | `faulty` | `panic`, `hang`, `spin:MS`, `error`, `exit:CODE`, `lie:LANES` | scripted faults for demos and fault tests; otherwise echoes |

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use troupe::{
    Agent, AgentContext, AgentError, AgentSpec, Message, Recipients, TaskError, TaskRequest, Want,
};

/// Names of every built-in kind.
pub const KINDS: [&str; 6] = ["echo", "compute", "io", "router", "aggregator", "faulty"];

/// Reads an integer parameter, with a default.
fn param_u64(spec: &AgentSpec, key: &str, default: u64) -> u64 {
    spec.params
        .get(key)
        .and_then(|v| v.as_integer())
        .and_then(|v| u64::try_from(v).ok())
        .unwrap_or(default)
}

fn param_f64(spec: &AgentSpec, key: &str, default: f64) -> f64 {
    spec.params
        .get(key)
        .and_then(|v| v.as_float().or_else(|| v.as_integer().map(|i| i as f64)))
        .unwrap_or(default)
}

/// Returns its payload.
#[derive(Debug, Default)]
pub struct Echo;

impl Agent for Echo {
    async fn handle(&mut self, task: TaskRequest, _: &AgentContext) -> Result<Bytes, TaskError> {
        Ok(task.payload)
    }

    async fn on_message(&mut self, msg: Message, _: &AgentContext) -> Option<Bytes> {
        msg.is_request().then_some(msg.payload)
    }
}

/// FNV-1a, 64-bit: deterministic across processes and builds, so every sandbox lane and every
/// worker process computes the same answer.
fn fnv1a(seed: u64, data: &[u8]) -> u64 {
    let mut h = seed ^ 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// CPU work with a tunable cost: hashes the payload `rounds` times.
#[derive(Debug)]
pub struct Compute {
    rounds: u64,
}

impl Compute {
    /// `params.rounds` (default 100) rounds per task unless the payload says `N|data`.
    pub fn new(spec: &AgentSpec) -> Self {
        Compute {
            rounds: param_u64(spec, "rounds", 100),
        }
    }

    async fn run(&self, payload: &[u8]) -> Bytes {
        let (rounds, data) = match payload.iter().position(|&b| b == b'|') {
            Some(i) => match std::str::from_utf8(&payload[..i])
                .ok()
                .and_then(|n| n.parse().ok())
            {
                Some(n) => (n, &payload[i + 1..]),
                None => (self.rounds, payload),
            },
            None => (self.rounds, payload),
        };
        let mut h = 0u64;
        for round in 0..rounds {
            h = fnv1a(h ^ round, data);
            // Long jobs yield now and then so one agent cannot hold a worker thread.
            if round % 4096 == 4095 {
                tokio::task::yield_now().await;
            }
        }
        Bytes::from(format!("{h:016x}"))
    }
}

impl Agent for Compute {
    async fn handle(&mut self, task: TaskRequest, _: &AgentContext) -> Result<Bytes, TaskError> {
        Ok(self.run(&task.payload).await)
    }

    async fn on_message(&mut self, msg: Message, _: &AgentContext) -> Option<Bytes> {
        if msg.is_request() {
            Some(self.run(&msg.payload).await)
        } else {
            None
        }
    }
}

/// xorshift64*: cheap per-agent randomness for jitter and failures.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn seeded(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Stands in for an LLM or HTTP call: awaits a latency, optionally jittered and failing.
#[derive(Debug)]
pub struct Io {
    latency_ms: u64,
    jitter_ms: u64,
    failure_rate: f64,
    rng: Rng,
}

impl Io {
    /// Reads `params.latency_ms` (20), `params.jitter_ms` (0), `params.failure_rate` (0.0).
    pub fn new(spec: &AgentSpec) -> Self {
        Io {
            latency_ms: param_u64(spec, "latency_ms", 20),
            jitter_ms: param_u64(spec, "jitter_ms", 0),
            failure_rate: param_f64(spec, "failure_rate", 0.0),
            rng: Rng::seeded(u64::from(spec.id.0) + 1),
        }
    }

    async fn run(&mut self, payload: &Bytes) -> Result<Bytes, TaskError> {
        let (mut latency, mut jitter, mut fail) =
            (self.latency_ms, self.jitter_ms, self.failure_rate);
        if let Ok(text) = std::str::from_utf8(payload) {
            for pair in text.split(',') {
                match pair.split_once('=') {
                    Some(("latency", v)) => latency = v.trim().parse().unwrap_or(latency),
                    Some(("jitter", v)) => jitter = v.trim().parse().unwrap_or(jitter),
                    Some(("fail", v)) => fail = v.trim().parse().unwrap_or(fail),
                    _ => {}
                }
            }
        }
        let spread = if jitter > 0 {
            (self.rng.next() % (2 * jitter + 1)) as i64 - jitter as i64
        } else {
            0
        };
        let wait = (latency as i64 + spread).max(0) as u64;
        tokio::time::sleep(Duration::from_millis(wait)).await;
        if fail > 0.0 && self.rng.unit() < fail {
            return Err(TaskError::new("io: simulated upstream failure"));
        }
        Ok(payload.clone())
    }
}

impl Agent for Io {
    async fn handle(&mut self, task: TaskRequest, _: &AgentContext) -> Result<Bytes, TaskError> {
        self.run(&task.payload).await
    }

    async fn on_message(&mut self, msg: Message, _: &AgentContext) -> Option<Bytes> {
        if msg.is_request() {
            self.run(&msg.payload).await.ok()
        } else {
            None
        }
    }
}

/// What a router answers.
#[derive(Debug, Serialize)]
struct FanIn {
    asked: usize,
    replied: usize,
    replies: Vec<String>,
}

/// Fan-out / fan-in over the bus ([`troupe::Bus::fan_out`]): asks every agent of a kind (or
/// the N least loaded) under one deadline and gathers their replies.
#[derive(Debug)]
pub struct Router {
    timeout: Duration,
}

impl Router {
    /// Reads `params.timeout_ms` (1000): how long to wait for replies.
    pub fn new(spec: &AgentSpec) -> Self {
        Router {
            timeout: Duration::from_millis(param_u64(spec, "timeout_ms", 1000)),
        }
    }
}

impl Agent for Router {
    async fn handle(&mut self, task: TaskRequest, ctx: &AgentContext) -> Result<Bytes, TaskError> {
        let text = std::str::from_utf8(&task.payload)
            .map_err(|_| TaskError::new("router: payload must be `kind:body` in UTF-8"))?;
        let (target, body) = text.split_once(':').ok_or_else(|| {
            TaskError::new("router: payload must be `kind:body` or `kind*N:body`")
        })?;
        let want = match target.split_once('*') {
            Some((_, n)) => Want::Any(
                n.parse::<usize>()
                    .map_err(|_| TaskError::new(format!("router: `{n}` is not a count")))?,
            ),
            None => Want::All,
        };
        let kind = target.split_once('*').map_or(target, |(k, _)| k);
        // One request to each agent of the capability (or the N least loaded), one deadline;
        // the bus never asks the router itself.
        let out = ctx
            .bus()
            .fan_out(
                Recipients::Capability(kind),
                want,
                Bytes::copy_from_slice(body.as_bytes()),
                self.timeout,
            )
            .await
            .map_err(|e| TaskError::new(format!("router: {e}")))?;
        let replies: Vec<String> = out
            .ok()
            .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
            .collect();
        let fan_in = FanIn {
            asked: out.asked(),
            replied: replies.len(),
            replies,
        };
        serde_json::to_vec(&fan_in)
            .map(Bytes::from)
            .map_err(|e| TaskError::new(e.to_string()))
    }
}

/// A rolling summary of a topic.
#[derive(Debug, Default, Serialize)]
struct Summary {
    topic: String,
    messages: u64,
    bytes: u64,
    window: usize,
    recent_bytes: u64,
    last: Option<String>,
}

/// Subscribes to a topic and keeps a rolling summary of what it sees.
#[derive(Debug)]
pub struct Aggregator {
    topic: String,
    window: usize,
    recent: VecDeque<u64>,
    summary: Summary,
}

impl Aggregator {
    /// Reads `params.topic` ("events") and `params.window` (100 messages).
    pub fn new(spec: &AgentSpec) -> Self {
        let topic = spec
            .params
            .get("topic")
            .and_then(|v| v.as_str())
            .unwrap_or("events")
            .to_owned();
        Aggregator {
            window: param_u64(spec, "window", 100).max(1) as usize,
            recent: VecDeque::new(),
            summary: Summary {
                topic: topic.clone(),
                ..Summary::default()
            },
            topic,
        }
    }

    fn report(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(&self.summary).unwrap_or_default())
    }
}

impl Agent for Aggregator {
    async fn on_start(&mut self, ctx: &AgentContext) -> Result<(), AgentError> {
        // Lane instances in a sandbox are not pool members and do not subscribe.
        if ctx.lane().is_none() {
            ctx.bus()
                .subscribe_self(&self.topic)
                .map_err(|e| AgentError::new(e.to_string()))?;
        }
        Ok(())
    }

    async fn handle(&mut self, _: TaskRequest, _: &AgentContext) -> Result<Bytes, TaskError> {
        Ok(self.report())
    }

    async fn on_message(&mut self, msg: Message, _: &AgentContext) -> Option<Bytes> {
        if msg.is_request() {
            return Some(self.report());
        }
        let n = msg.payload.len() as u64;
        self.recent.push_back(n);
        if self.recent.len() > self.window {
            self.recent.pop_front();
        }
        let s = &mut self.summary;
        s.messages += 1;
        s.bytes += n;
        s.window = self.recent.len();
        s.recent_bytes = self.recent.iter().sum();
        s.last = Some(String::from_utf8_lossy(&msg.payload).into_owned());
        None
    }
}

/// Scripted faults, for demos and fault tests (see the module table).
#[derive(Debug, Default)]
pub struct Faulty;

impl Agent for Faulty {
    async fn handle(&mut self, task: TaskRequest, ctx: &AgentContext) -> Result<Bytes, TaskError> {
        let text = String::from_utf8_lossy(&task.payload).into_owned();
        let (cmd, arg) = text.split_once(':').unwrap_or((text.as_str(), ""));
        match cmd {
            "panic" => panic!("faulty: scripted panic"),
            "hang" => {
                std::future::pending::<()>().await;
                Ok(task.payload)
            }
            "spin" => {
                // Blocks the thread on purpose: a stand-in for a runaway computation.
                std::thread::sleep(Duration::from_millis(arg.parse().unwrap_or(1000)));
                Ok(task.payload)
            }
            "error" => Err(TaskError::new("faulty: scripted error")),
            "exit" if troupe::sandbox::in_worker_process() => {
                std::process::exit(arg.parse().unwrap_or(101))
            }
            "exit" => Err(TaskError::new(
                "faulty: `exit` is honoured only inside a sandbox worker process",
            )),
            "lie" => match ctx.lane() {
                Some(lane) if arg.contains(lane.as_str()) => {
                    Ok(Bytes::from(format!("lie from {lane}")))
                }
                _ => Ok(Bytes::from("truth")),
            },
            "crash-on" => match ctx.lane() {
                Some(lane)
                    if arg.contains(lane.as_str()) && troupe::sandbox::in_worker_process() =>
                {
                    std::process::exit(102)
                }
                _ => Ok(Bytes::from("survived")),
            },
            "hang-on" => match ctx.lane() {
                Some(lane) if arg.contains(lane.as_str()) => {
                    std::future::pending::<()>().await;
                    Ok(task.payload)
                }
                _ => Ok(Bytes::from("survived")),
            },
            _ => Ok(task.payload),
        }
    }
}
