//! Shared pieces for Troupe's benchmarks: a no-op agent that counts bus messages, and a helper
//! that starts a pool of it.
//!
//! The agent reports the end of a burst when it receives a `fin` message; mailboxes are FIFO,
//! so by then it has handled everything sent to it before. That lets a bench wait for delivery
//! with one atomic increment per agent per burst instead of one per message.

pub mod peers;

/// Positional argument `i` of an example (`1` is the first), parsed, or `default` when it is
/// absent or does not parse: the examples' small command lines.
pub fn arg<T: std::str::FromStr>(i: usize, default: T) -> T {
    std::env::args()
        .nth(i)
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use troupe::{
    Agent, AgentContext, AgentSpec, Message, Runtime, RuntimeConfig, TaskError, TaskRequest,
    TierConfig,
};
use troupe::{AgentId, Bus, Priority, RuntimeHandle, Task};

/// The payload that ends a burst.
pub const FIN: &[u8] = b"fin";

/// Echoes tasks; counts `fin` messages into a shared counter.
pub struct NoOp {
    done: Arc<AtomicU64>,
}

impl Agent for NoOp {
    async fn handle(&mut self, task: TaskRequest, _: &AgentContext) -> Result<Bytes, TaskError> {
        Ok(task.payload)
    }

    async fn on_message(&mut self, msg: Message, _: &AgentContext) -> Option<Bytes> {
        if &msg.payload[..] == FIN {
            self.done.fetch_add(1, Ordering::Release);
        }
        msg.is_request().then_some(msg.payload)
    }
}

/// A started pool of `agents` [`NoOp`] agents (kind `noop`) and its burst counter.
pub struct Pool {
    /// The runtime.
    pub runtime: Runtime,
    /// Incremented by each agent on `fin`.
    pub done: Arc<AtomicU64>,
}

/// The default tier layout scaled to `agents` (all 928 when `agents == 928`).
pub fn config(agents: usize) -> RuntimeConfig {
    let mut config = base_config();
    config.max_agents = agents.max(troupe::DEFAULT_MAX_AGENTS);
    config.tier(TierConfig::new("bench").agents("noop", agents))
}

/// Default settings with queues sized so a benchmark window never hits the bound, and no
/// default task timeout (no timer per task).
pub fn base_config() -> RuntimeConfig {
    let mut config = RuntimeConfig::default();
    config.queues.capacity = troupe::PerPriority([1 << 20; 5]);
    config.tasks.default_timeout = None;
    config
}

/// Starts `agents` no-op agents.
pub async fn start(agents: usize) -> Pool {
    start_with(agents, |_| {}).await
}

/// Starts `agents` no-op agents with `tweak` applied to the config.
pub async fn start_with(agents: usize, tweak: impl FnOnce(&mut RuntimeConfig)) -> Pool {
    let done = Arc::new(AtomicU64::new(0));
    let d = done.clone();
    let mut config = config(agents);
    tweak(&mut config);
    let runtime = Runtime::builder(config)
        .register("noop", move |_: &AgentSpec| NoOp { done: d.clone() })
        .start()
        .await
        .expect("bench pool starts");
    Pool { runtime, done }
}

impl Pool {
    /// Waits (spinning with yields) until `n` agents have seen `fin` since the last reset.
    pub async fn wait_done(&self, n: u64) {
        while self.done.load(Ordering::Acquire) < n {
            tokio::task::yield_now().await;
        }
        self.done.store(0, Ordering::Release);
    }
}

/// Runs `iters` task windows (see [`task_window`]) and returns the time they took.
pub async fn timed_task_windows(
    handle: &RuntimeHandle,
    kind: &'static str,
    window: u64,
    sandboxed: bool,
    iters: u64,
) -> std::time::Duration {
    let mut handles = Vec::with_capacity(window as usize);
    let start = std::time::Instant::now();
    for _ in 0..iters {
        task_window(handle, kind, window, sandboxed, &mut handles).await;
    }
    start.elapsed()
}

/// Runs `iters` direct bursts (see [`direct_burst`]) and returns the time they took.
pub async fn timed_direct_bursts(
    bus: &Bus,
    pool: &Pool,
    agents: u32,
    per_agent: u64,
    iters: u64,
) -> std::time::Duration {
    let start = std::time::Instant::now();
    for _ in 0..iters {
        direct_burst(bus, pool, agents, per_agent).await;
    }
    start.elapsed()
}

/// Submits `window` no-op tasks to `kind` over all five priorities (optionally sandboxed) and
/// awaits every outcome; `handles` is reused between calls.
pub async fn task_window(
    handle: &RuntimeHandle,
    kind: &'static str,
    window: u64,
    sandboxed: bool,
    handles: &mut Vec<troupe::TaskHandle>,
) {
    for i in 0..window {
        let mut task =
            Task::new(kind, Bytes::from_static(b"x")).priority(Priority::ALL[(i % 5) as usize]);
        if sandboxed {
            task = task.sandboxed();
        }
        handles.push(handle.try_submit(task).expect("admitted"));
    }
    for h in handles.drain(..) {
        let outcome = h.await;
        assert!(outcome.is_ok(), "a no-op task ended {outcome:?}");
    }
}

/// Sends `per_agent` messages to each of `agents` agents round-robin, then a `fin` to each,
/// and waits until every agent has handled its `fin`.
pub async fn direct_burst(bus: &Bus, pool: &Pool, agents: u32, per_agent: u64) {
    let send =
        |to: u32, payload: &'static [u8]| bus.try_send(AgentId(to), Bytes::from_static(payload));
    for _ in 0..per_agent {
        for a in 0..agents {
            while send(a, b"m").is_err() {
                tokio::task::yield_now().await;
            }
        }
    }
    for a in 0..agents {
        while send(a, FIN).is_err() {
            tokio::task::yield_now().await;
        }
    }
    pool.wait_done(u64::from(agents)).await;
}

/// 928 `echo` agents with `echo` also a sandbox kind on `mode` lanes; `worker` is the
/// `troupe-bench-worker` binary for process lanes.
pub fn sandbox_config(mode: troupe::sandbox::LaneMode, worker: &str) -> RuntimeConfig {
    use troupe::sandbox::{LaneMode, ProcessConfig, SandboxKindConfig};
    let mut c = base_config().tier(TierConfig::new("once").agents("echo", 928));
    c.sandbox.lane_timeout = std::time::Duration::from_secs(10);
    // The suite submits windows of up to 10 000 sandboxed tasks at once; with the default lane
    // queue (1 024) the tail of a window finds two lanes full and ends `no quorum`, which
    // measures the bound rather than the lanes.
    c.sandbox.lane_queue = 10_000;
    c.sandbox.process = Some(ProcessConfig {
        command: vec![worker.to_owned()],
    });
    c.sandbox.kinds = vec![SandboxKindConfig {
        kind: "echo".into(),
        lanes: mode,
        instances: if mode == LaneMode::Process { 4 } else { 8 },
    }];
    c
}

/// CPU seconds (user + system) process `pid` used so far (Linux `/proc`; 0 elsewhere).
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11..13).map_or(0.0, |t| {
        t.iter().filter_map(|v| v.parse::<f64>().ok()).sum()
    });
    // USER_HZ is 100 on Linux.
    ticks / 100.0
}
