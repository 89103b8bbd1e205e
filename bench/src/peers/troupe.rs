//! The workloads on Troupe: agents in one tier, messages over the bus, as an application
//! embedding Troupe writes them. `telemetry` picks the runtime's HDR latency recording (what
//! users get by default) or not.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::join_all;
use troupe::{
    Agent, AgentContext, AgentId, AgentSpec, Bus, Message, Overflow, Runtime, RuntimeConfig,
    TaskError, TaskRequest, TierConfig,
};

use super::{Done, Latency, MAILBOX_BOUND, MAILBOX_SENDS, MAILBOX_WORK, MailboxFull};

const FIN: &[u8] = b"fin";

/// Counts messages; answers requests with their payload; bumps [`Done`] on `fin`.
struct Sink {
    done: Arc<Done>,
    handled: Arc<AtomicU64>,
    work: Duration,
}

impl Agent for Sink {
    async fn handle(&mut self, task: TaskRequest, _: &AgentContext) -> Result<Bytes, TaskError> {
        Ok(task.payload)
    }

    async fn on_message(&mut self, msg: Message, _: &AgentContext) -> Option<Bytes> {
        if &msg.payload[..] == FIN {
            self.done.bump();
            return None;
        }
        // An ask is answered at once, as the peers' ask handlers do; only tells are counted
        // and worked on (the peers' tell handlers).
        if msg.is_request() {
            return Some(msg.payload);
        }
        self.handled.fetch_add(1, Ordering::Relaxed);
        super::busy(self.work);
        None
    }
}

/// A started pool of `n` sinks.
pub struct Pool {
    /// The runtime.
    pub runtime: Runtime,
    /// Burst counter.
    pub done: Arc<Done>,
    /// Messages the sinks handled (`fin` aside).
    pub handled: Arc<AtomicU64>,
}

fn config(n: usize, telemetry: bool) -> RuntimeConfig {
    let mut c = RuntimeConfig {
        max_agents: n.max(troupe::DEFAULT_MAX_AGENTS),
        ..RuntimeConfig::default()
    };
    c.telemetry.latency_histograms = telemetry;
    c.tasks.default_timeout = None;
    c.tier(TierConfig::new("bench").agents("sink", n))
}

/// Starts `n` sinks (inside a Tokio runtime).
pub async fn start(n: usize, telemetry: bool, tweak: impl FnOnce(&mut RuntimeConfig)) -> Pool {
    start_with_work(n, telemetry, Duration::ZERO, tweak).await
}

async fn start_with_work(
    n: usize,
    telemetry: bool,
    work: Duration,
    tweak: impl FnOnce(&mut RuntimeConfig),
) -> Pool {
    let done = Done::shared();
    let handled = Arc::new(AtomicU64::new(0));
    let (d, h) = (done.clone(), handled.clone());
    let mut c = config(n, telemetry);
    tweak(&mut c);
    let runtime = Runtime::builder(c)
        .register("sink", move |_: &AgentSpec| Sink {
            done: d.clone(),
            // One counter shared by every sink, as in the peers' sinks: the same cost for all.
            handled: h.clone(),
            work,
        })
        .start()
        .await
        .expect("bench pool starts");
    Pool {
        runtime,
        done,
        handled,
    }
}

async fn send(bus: &Bus, to: u32, payload: Bytes) {
    // `try_send` refuses at a full mailbox; the idiomatic producer yields and retries (`send`
    // with `Overflow::Wait` waits instead: the same within noise).
    while bus.try_send(AgentId(to), payload.clone()).is_err() {
        tokio::task::yield_now().await;
    }
}

async fn burst(pool: &Pool, actors: u32, per_actor: u64, payload: &Bytes) {
    let bus = pool.runtime.bus();
    pool.done.arm(actors as u64);
    for _ in 0..per_actor {
        for a in 0..actors {
            send(&bus, a, payload.clone()).await;
        }
    }
    for a in 0..actors {
        send(&bus, a, Bytes::from_static(FIN)).await;
    }
    pool.done.wait().await;
}

/// Tell throughput: `per_actor` messages to each of `actors`, messages/s.
pub fn tell(actors: usize, per_actor: u64, payload: usize, telemetry: bool) -> f64 {
    super::on_worker(async move {
        let pool = start(actors, telemetry, |_| {}).await;
        let p = Bytes::from(vec![b'x'; payload]);
        burst(&pool, actors as u32, 1, &p).await; // warm
        let t = Instant::now();
        burst(&pool, actors as u32, per_actor, &p).await;
        let s = t.elapsed();
        pool.runtime.shutdown().await;
        (actors as u64 * per_actor) as f64 / s.as_secs_f64()
    })
}

/// Serial request/reply with one agent.
pub fn ask_serial(n: u64, payload: usize, telemetry: bool) -> Latency {
    super::on_worker(async move {
        let pool = start(1, telemetry, |_| {}).await;
        let bus = pool.runtime.bus();
        let p = Bytes::from(vec![b'x'; payload]);
        let l = super::timed_ops(n, || async {
            bus.request(AgentId(0), p.clone(), Duration::from_secs(10))
                .await
                .expect("reply");
        })
        .await;
        pool.runtime.shutdown().await;
        l
    })
}

/// One request to each of `actors` agents at once, gathered; `rounds` times.
pub fn fan_out(actors: usize, rounds: u64, telemetry: bool) -> Latency {
    super::on_worker(async move {
        let pool = start(actors, telemetry, |_| {}).await;
        let bus = pool.runtime.bus();
        let p = Bytes::from_static(b"q");
        let l = super::timed_ops(rounds, || async {
            let replies = join_all(
                (0..actors as u32)
                    .map(|a| bus.request(AgentId(a), p.clone(), Duration::from_secs(10))),
            )
            .await;
            assert!(replies.iter().all(Result::is_ok));
        })
        .await;
        pool.runtime.shutdown().await;
        l
    })
}

/// Fan-out/fan-in as Troupe's bus offers it: one [`Bus::request_all`] to the capability,
/// which sends every request, then gathers the replies on one channel under one deadline.
pub fn request_all(actors: usize, rounds: u64, telemetry: bool) -> Latency {
    super::on_worker(async move {
        let pool = start(actors, telemetry, |_| {}).await;
        let bus = pool.runtime.bus();
        let p = Bytes::from_static(b"q");
        let l = super::timed_ops(rounds, || async {
            let replies = bus
                .request_all("sink", p.clone(), Duration::from_secs(10))
                .await
                .expect("fan-out");
            assert_eq!(replies.replied(), actors);
        })
        .await;
        pool.runtime.shutdown().await;
        l
    })
}

/// Publishes `messages` to a topic `subscribers` agents subscribe to; deliveries/s.
pub fn publish(subscribers: usize, messages: u64, telemetry: bool) -> f64 {
    super::on_worker(async move {
        let pool = start(subscribers, telemetry, |_| {}).await;
        let bus = pool.runtime.bus();
        // Create the topic with its policy before subscribing (subscribing would create it
        // with the default policy, which an existing topic keeps).
        let topic = bus
            .topic_with(
                "t",
                Overflow::Wait {
                    timeout: Duration::from_secs(30),
                },
            )
            .expect("topic");
        for a in 0..subscribers as u32 {
            bus.subscribe("t", AgentId(a)).expect("subscribe");
        }
        let p = Bytes::from_static(b"m");
        let t = Instant::now();
        pool.done.arm(subscribers as u64);
        for _ in 0..messages {
            topic.publish(p.clone()).await.expect("publish");
        }
        topic
            .publish(Bytes::from_static(FIN))
            .await
            .expect("publish");
        pool.done.wait().await;
        let s = t.elapsed();
        pool.runtime.shutdown().await;
        (messages * subscribers as u64) as f64 / s.as_secs_f64()
    })
}

/// Time to start a pool of `n` agents (ready to take work), seconds.
pub fn spawn(n: usize, telemetry: bool) -> f64 {
    super::on_worker(async move {
        let t = Instant::now();
        let pool = start(n, telemetry, |_| {}).await;
        let s = t.elapsed();
        pool.runtime.shutdown().await;
        s.as_secs_f64()
    })
}

/// A bounded mailbox of [`MAILBOX_BOUND`] with a slow consumer, under each overflow policy.
pub fn mailbox_full(overflow: Overflow) -> MailboxFull {
    super::on_worker(async move {
        let pool = start_with_work(1, true, MAILBOX_WORK, |c| {
            c.mailbox.capacity = MAILBOX_BOUND;
        })
        .await;
        let bus = pool.runtime.bus();
        let (mut refused, mut dropped) = (0, 0);
        let t = Instant::now();
        for _ in 0..MAILBOX_SENDS {
            match bus
                .send_with(AgentId(0), Bytes::from_static(b"m"), overflow)
                .await
            {
                Ok(troupe::Delivery::Delivered) => {}
                Ok(troupe::Delivery::Dropped) => dropped += 1,
                Err(_) => refused += 1,
            }
        }
        let send_ms = t.elapsed().as_secs_f64() * 1000.0;
        let queued = MAILBOX_SENDS - refused - dropped - pool.handled.load(Ordering::Relaxed);
        pool.done.arm(1);
        send(&bus, 0, Bytes::from_static(FIN)).await;
        pool.done.wait().await;
        let handled = pool.handled.load(Ordering::Relaxed);
        pool.runtime.shutdown().await;
        let behaviour = match overflow {
            Overflow::Reject => {
                "`try_send`/`reject`: the send fails at once with `MailboxFull {depth, capacity}`; nothing queues past the bound"
            }
            Overflow::DropNewest => {
                "`drop_newest`: the send succeeds, the message is dropped and counted (`troupe_bus_messages_dropped_total`)"
            }
            Overflow::Wait { .. } => {
                "`wait`: the sender waits for room; nothing is lost and the queue stays at the bound"
            }
        };
        MailboxFull {
            sent: MAILBOX_SENDS,
            handled,
            refused,
            dropped,
            send_ms,
            queued_at_end: queued,
            behaviour: behaviour.to_owned(),
        }
    })
}
