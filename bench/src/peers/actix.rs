//! The workloads on actix 0.13, as its docs write them: `Actor` + `Handler` per message type,
//! `do_send` for fire-and-forget (it ignores the mailbox bound), `send` for request/response.
//! Two threads like the other systems: the system arbiter (which also runs the driver) and one
//! more arbiter; actors are placed round-robin over the two.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytes::Bytes;
use futures_util::future::join_all;

use super::{
    Done, Latency, MAILBOX_BOUND, MAILBOX_SENDS, MAILBOX_WORK, MailboxFull, SKYNET_FANOUT,
    SKYNET_LEAVES,
};

struct Sink {
    done: Arc<Done>,
    handled: Arc<AtomicU64>,
    work: Duration,
}

impl Actor for Sink {
    type Context = Context<Self>;
}

struct Tell(#[allow(dead_code)] Bytes);
impl Message for Tell {
    type Result = ();
}

struct Fin;
impl Message for Fin {
    type Result = ();
}

struct Ask(Bytes);
impl Message for Ask {
    type Result = Bytes;
}

impl Handler<Tell> for Sink {
    type Result = ();
    fn handle(&mut self, _: Tell, _: &mut Self::Context) {
        self.handled.fetch_add(1, Ordering::Relaxed);
        super::busy(self.work);
    }
}

impl Handler<Fin> for Sink {
    type Result = ();
    fn handle(&mut self, _: Fin, _: &mut Self::Context) {
        self.done.bump();
    }
}

impl Handler<Ask> for Sink {
    type Result = MessageResult<Ask>;
    fn handle(&mut self, m: Ask, _: &mut Self::Context) -> MessageResult<Ask> {
        MessageResult(m.0)
    }
}

/// Runs `f` in an actix system with two arbiters.
fn run<T: Send + 'static, F: Future<Output = T> + 'static>(
    f: impl FnOnce(Vec<ArbiterHandle>) -> F,
) -> T {
    let sys = actix::System::new();
    let out = sys.block_on(async move {
        let extra = Arbiter::new();
        let arbiters = vec![Arbiter::current(), extra.handle()];
        let out = f(arbiters).await;
        extra.stop();
        out
    });
    drop(sys);
    out
}

fn start_sinks(
    arbiters: &[ArbiterHandle],
    n: usize,
    done: &Arc<Done>,
    work: Duration,
    capacity: usize,
    handled: &Arc<AtomicU64>,
) -> Vec<Addr<Sink>> {
    (0..n)
        .map(|i| {
            let (done, handled) = (done.clone(), handled.clone());
            // Actor 0 on the second arbiter, so a single actor does not share the driver's thread.
            // The capacity must be set before the address exists, so in the constructor.
            Sink::start_in_arbiter(&arbiters[(i + 1) % arbiters.len()], move |ctx| {
                ctx.set_mailbox_capacity(capacity);
                Sink {
                    done,
                    handled,
                    work,
                }
            })
        })
        .collect()
}

/// Default mailbox capacity of actix contexts.
const DEFAULT_CAPACITY: usize = 16;

/// `n` sinks with no work and the default capacity, and their burst counter.
fn plain_sinks(arbiters: &[ArbiterHandle], n: usize) -> (Arc<Done>, Vec<Addr<Sink>>) {
    let done = Done::shared();
    let handled = Arc::new(AtomicU64::new(0));
    let sinks = start_sinks(
        arbiters,
        n,
        &done,
        Duration::ZERO,
        DEFAULT_CAPACITY,
        &handled,
    );
    (done, sinks)
}

/// Tell throughput with `do_send`.
pub fn tell_do_send(actors: usize, per_actor: u64, payload: usize) -> f64 {
    run(move |arbiters| async move {
        let (done, sinks) = plain_sinks(&arbiters, actors);
        let p = Bytes::from(vec![b'x'; payload]);
        let burst = |per: u64| {
            done.arm(actors as u64);
            for _ in 0..per {
                for s in &sinks {
                    s.do_send(Tell(p.clone()));
                }
            }
            for s in &sinks {
                s.do_send(Fin);
            }
            done.wait()
        };
        burst(1).await;
        let t = Instant::now();
        burst(per_actor).await;
        (actors as u64 * per_actor) as f64 / t.elapsed().as_secs_f64()
    })
}

/// Tell throughput with `send` (each send awaited: actix's `send` resolves once handled).
pub fn tell_send(actors: usize, per_actor: u64, payload: usize) -> f64 {
    run(move |arbiters| async move {
        let (_, sinks) = plain_sinks(&arbiters, actors);
        let p = Bytes::from(vec![b'x'; payload]);
        let t = Instant::now();
        for _ in 0..per_actor {
            for s in &sinks {
                s.send(Tell(p.clone())).await.expect("delivered");
            }
        }
        (actors as u64 * per_actor) as f64 / t.elapsed().as_secs_f64()
    })
}

/// Serial `send(..).await` to one actor.
pub fn ask_serial(n: u64, payload: usize) -> Latency {
    run(move |arbiters| async move {
        let done = Done::shared();
        let h = Arc::new(AtomicU64::new(0));
        let sink = start_sinks(&arbiters, 1, &done, Duration::ZERO, DEFAULT_CAPACITY, &h).remove(0);
        let p = Bytes::from(vec![b'x'; payload]);
        super::timed_ops(n, || async {
            sink.send(Ask(p.clone())).await.expect("reply");
        })
        .await
    })
}

/// `send` to every actor at once, gathered with `join_all`.
pub fn fan_out(actors: usize, rounds: u64) -> Latency {
    run(move |arbiters| async move {
        let (_, sinks) = plain_sinks(&arbiters, actors);
        let p = Bytes::from_static(b"q");
        super::timed_ops(rounds, || async {
            let r = join_all(sinks.iter().map(|a| a.send(Ask(p.clone())))).await;
            assert!(r.iter().all(Result::is_ok));
        })
        .await
    })
}

/// actix has no topic: publishing is `do_send` to each subscriber's `Recipient`.
pub fn publish(subscribers: usize, messages: u64) -> f64 {
    run(move |arbiters| async move {
        let done = Done::shared();
        let h = Arc::new(AtomicU64::new(0));
        let subs: Vec<Recipient<Tell>> = start_sinks(
            &arbiters,
            subscribers,
            &done,
            Duration::ZERO,
            DEFAULT_CAPACITY,
            &h,
        )
        .into_iter()
        .map(Addr::recipient)
        .collect();
        let p = Bytes::from_static(b"m");
        let t = Instant::now();
        for _ in 0..messages {
            for s in &subs {
                s.do_send(Tell(p.clone()));
            }
        }
        // Wait for delivery: every sink has handled `messages`.
        while h.load(Ordering::Relaxed) < messages * subscribers as u64 {
            actix_rt::task::yield_now().await;
        }
        (messages * subscribers as u64) as f64 / t.elapsed().as_secs_f64()
    })
}

/// Resident memory per idle actor after `n` sinks started (run in a fresh process), bytes.
pub fn idle_memory(n: usize) -> f64 {
    run(move |arbiters| async move {
        let done = Done::shared();
        let h = Arc::new(AtomicU64::new(0));
        let before = super::rss_bytes();
        let sinks = start_sinks(&arbiters, n, &done, Duration::ZERO, DEFAULT_CAPACITY, &h);
        actix_rt::time::sleep(super::SETTLE).await;
        let per = super::per_actor(before, n);
        drop(sinks);
        per
    })
}

struct Started(Arc<Done>);
impl Actor for Started {
    type Context = Context<Self>;
    fn started(&mut self, _: &mut Self::Context) {
        self.0.bump();
    }
}

/// Time until `n` actors have all run `started`, seconds.
pub fn spawn(n: usize) -> f64 {
    run(move |arbiters| async move {
        let done = Done::shared();
        done.arm(n as u64);
        let t = Instant::now();
        let addrs: Vec<Addr<Started>> = (0..n)
            .map(|i| {
                let d = done.clone();
                Started::start_in_arbiter(&arbiters[i % arbiters.len()], move |_| Started(d))
            })
            .collect();
        done.wait().await;
        let s = t.elapsed().as_secs_f64();
        drop(addrs);
        s
    })
}

/// Bounded mailbox (capacity set with `set_mailbox_capacity`), slow consumer; `mode` is
/// `do_send`, `try_send` or `send`.
pub fn mailbox_full(mode: &str) -> MailboxFull {
    let mode = mode.to_owned();
    run(move |arbiters| async move {
        let done = Done::shared();
        let handled = Arc::new(AtomicU64::new(0));
        let sink =
            start_sinks(&arbiters, 1, &done, MAILBOX_WORK, MAILBOX_BOUND, &handled).remove(0);
        let mut refused = 0;
        let t = Instant::now();
        for _ in 0..MAILBOX_SENDS {
            let m = Tell(Bytes::from_static(b"m"));
            match mode.as_str() {
                "do_send" => sink.do_send(m),
                "try_send" => {
                    if sink.try_send(m).is_err() {
                        refused += 1;
                    }
                }
                _ => sink.send(m).await.expect("delivered"),
            }
        }
        let send_ms = t.elapsed().as_secs_f64() * 1000.0;
        let queued = MAILBOX_SENDS - refused - handled.load(Ordering::Relaxed);
        done.arm(1);
        sink.do_send(Fin);
        done.wait().await;
        let behaviour = match mode.as_str() {
            "do_send" => {
                "`do_send` ignores the capacity: every message is queued, the mailbox grows past its bound"
            }
            "try_send" => "`try_send` fails with `SendError::Full` once the bound is reached",
            _ => {
                "`send(..).await` resolves only after the message is handled: the sender runs at the consumer's pace, one message in flight"
            }
        };
        MailboxFull {
            sent: MAILBOX_SENDS,
            handled: handled.load(Ordering::Relaxed),
            refused,
            dropped: 0,
            send_ms,
            queued_at_end: queued,
            behaviour: behaviour.to_owned(),
        }
    })
}

struct Node {
    parent: Option<Recipient<Sum>>,
    root: Option<tokio::sync::oneshot::Sender<u64>>,
    pending: u64,
    acc: u64,
}

struct Sum(u64);
impl Message for Sum {
    type Result = ();
}

struct Go {
    num: u64,
    size: u64,
}
impl Message for Go {
    type Result = ();
}

impl Actor for Node {
    type Context = Context<Self>;
}

impl Node {
    fn finish(&mut self, ctx: &mut Context<Self>, v: u64) {
        if let Some(p) = self.parent.take() {
            p.do_send(Sum(v));
        }
        if let Some(r) = self.root.take() {
            let _ = r.send(v);
        }
        ctx.stop();
    }
}

impl Handler<Go> for Node {
    type Result = ();
    fn handle(&mut self, g: Go, ctx: &mut Context<Self>) {
        if g.size == 1 {
            self.finish(ctx, g.num);
            return;
        }
        let child = g.size / SKYNET_FANOUT;
        self.pending = SKYNET_FANOUT;
        let me = ctx.address().recipient();
        for i in 0..SKYNET_FANOUT {
            let c = Node {
                parent: Some(me.clone()),
                root: None,
                pending: 0,
                acc: 0,
            }
            .start();
            c.do_send(Go {
                num: g.num + i * child,
                size: child,
            });
        }
    }
}

impl Handler<Sum> for Node {
    type Result = ();
    fn handle(&mut self, s: Sum, ctx: &mut Context<Self>) {
        self.acc += s.0;
        self.pending -= 1;
        if self.pending == 0 {
            let v = self.acc;
            self.finish(ctx, v);
        }
    }
}

/// Skynet: a tree of actors, 10 children each, 10^6 leaves, summing their numbers; seconds.
/// Children start on the spawning actor's arbiter (actix's `start`), so it runs on one thread.
pub fn skynet() -> f64 {
    run(move |_| async move {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let t = Instant::now();
        let root = Node {
            parent: None,
            root: Some(tx),
            pending: 0,
            acc: 0,
        }
        .start();
        root.do_send(Go {
            num: 0,
            size: SKYNET_LEAVES,
        });
        let sum = rx.await.expect("skynet answers");
        assert_eq!(sum, super::skynet_sum());
        t.elapsed().as_secs_f64()
    })
}
