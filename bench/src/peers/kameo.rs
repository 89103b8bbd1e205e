//! The workloads on kameo 0.22, as its docs write them: `Actor` plus `Message<T>` per message
//! type, `tell(..).await` and `ask(..).await` (the requests are `IntoFuture`), spawned with
//! `Spawn::spawn` and its default bounded mailbox (64) unless a workload sets one.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::join_all;
use kameo::actor::{Actor, ActorRef, Spawn};
use kameo::error::Infallible;
use kameo::mailbox;
use kameo::message::{Context, Message};

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
    type Args = Self;
    type Error = Infallible;

    async fn on_start(args: Self, _: ActorRef<Self>) -> Result<Self, Infallible> {
        Ok(args)
    }
}

struct Tell(#[allow(dead_code)] Bytes);
struct Fin;
struct Ask(Bytes);

impl Message<Tell> for Sink {
    type Reply = ();
    async fn handle(&mut self, _: Tell, _: &mut Context<Self, ()>) {
        self.handled.fetch_add(1, Ordering::Relaxed);
        super::busy(self.work);
    }
}

impl Message<Fin> for Sink {
    type Reply = ();
    async fn handle(&mut self, _: Fin, _: &mut Context<Self, ()>) {
        self.done.bump();
    }
}

// `Bytes` is not a kameo `Reply`; a `Result` of anything `Send` is.
impl Message<Ask> for Sink {
    type Reply = Result<Bytes, Infallible>;
    async fn handle(&mut self, m: Ask, _: &mut Context<Self, Self::Reply>) -> Self::Reply {
        Ok(m.0)
    }
}

fn start(
    n: usize,
    done: &Arc<Done>,
    work: Duration,
    handled: &Arc<AtomicU64>,
    bound: Option<usize>,
) -> Vec<ActorRef<Sink>> {
    (0..n)
        .map(|_| {
            let s = Sink {
                done: done.clone(),
                handled: handled.clone(),
                work,
            };
            match bound {
                Some(b) => Sink::spawn_with_mailbox(s, mailbox::bounded(b)),
                None => Sink::spawn(s),
            }
        })
        .collect()
}

/// `n` sinks that do no work, default mailbox, and their burst counter.
fn plain(n: usize) -> (Arc<Done>, Vec<ActorRef<Sink>>) {
    plain_bounded(n, None)
}

/// `n` sinks with a mailbox of `bound` (kameo's default, 64, when `None`).
fn plain_bounded(n: usize, bound: Option<usize>) -> (Arc<Done>, Vec<ActorRef<Sink>>) {
    let done = Done::shared();
    let sinks = start(
        n,
        &done,
        Duration::ZERO,
        &Arc::new(AtomicU64::new(0)),
        bound,
    );
    (done, sinks)
}

async fn stop_all(v: &[ActorRef<Sink>]) {
    for r in v {
        let _ = r.stop_gracefully().await;
    }
}

/// Tell throughput with `tell(..).await` (waits for mailbox room, not for handling).
pub fn tell(actors: usize, per_actor: u64, payload: usize) -> f64 {
    tell_bounded(actors, per_actor, payload, None)
}

/// [`tell`] with every mailbox bounded at `bound` (to compare at Troupe's default of 1 024).
pub fn tell_bounded(actors: usize, per_actor: u64, payload: usize, bound: Option<usize>) -> f64 {
    super::on_worker(async move {
        let (done, sinks) = plain_bounded(actors, bound);
        let p = Bytes::from(vec![b'x'; payload]);
        let burst = async |per: u64| {
            done.arm(actors as u64);
            for _ in 0..per {
                for s in &sinks {
                    s.tell(Tell(p.clone())).await.expect("tell");
                }
            }
            for s in &sinks {
                s.tell(Fin).await.expect("tell");
            }
            done.wait().await;
        };
        burst(1).await;
        let t = Instant::now();
        burst(per_actor).await;
        let r = (actors as u64 * per_actor) as f64 / t.elapsed().as_secs_f64();
        stop_all(&sinks).await;
        r
    })
}

/// Serial `ask(..).await` to one actor.
pub fn ask_serial(n: u64, payload: usize) -> Latency {
    super::on_worker(async move {
        let (_, sinks) = plain(1);
        let p = Bytes::from(vec![b'x'; payload]);
        let l = super::timed_ops(n, || async {
            sinks[0].ask(Ask(p.clone())).await.expect("ask");
        })
        .await;
        stop_all(&sinks).await;
        l
    })
}

/// `ask` every actor at once, gathered with `join_all`.
pub fn fan_out(actors: usize, rounds: u64) -> Latency {
    super::on_worker(async move {
        let (_, sinks) = plain(actors);
        let p = Bytes::from_static(b"q");
        let l = super::timed_ops(rounds, || async {
            let r = join_all(sinks.iter().map(|a| a.ask(Ask(p.clone())).into_future())).await;
            assert!(r.iter().all(Result::is_ok));
        })
        .await;
        stop_all(&sinks).await;
        l
    })
}

/// kameo's core has no topic (pub/sub lives in the separate kameo_actors crate): publishing is
/// a `tell` to each subscriber.
pub fn publish(subscribers: usize, messages: u64) -> f64 {
    super::on_worker(async move {
        let (done, sinks) = plain(subscribers);
        let p = Bytes::from_static(b"m");
        let t = Instant::now();
        for _ in 0..messages {
            for s in &sinks {
                s.tell(Tell(p.clone())).await.expect("tell");
            }
        }
        done.arm(subscribers as u64);
        for s in &sinks {
            s.tell(Fin).await.expect("tell");
        }
        done.wait().await;
        let r = (messages * subscribers as u64) as f64 / t.elapsed().as_secs_f64();
        stop_all(&sinks).await;
        r
    })
}

/// Time until `n` actors have run `on_start` (`wait_for_startup`), seconds.
pub fn spawn(n: usize) -> f64 {
    super::on_worker(async move {
        let done = Done::shared();
        let h = Arc::new(AtomicU64::new(0));
        let t = Instant::now();
        let sinks = start(n, &done, Duration::ZERO, &h, None);
        for s in &sinks {
            s.wait_for_startup().await;
        }
        let s = t.elapsed().as_secs_f64();
        stop_all(&sinks).await;
        s
    })
}

/// Resident memory per idle actor after `n` sinks started (run in a fresh process), bytes.
pub fn idle_memory(n: usize) -> f64 {
    super::on_worker(async move {
        let done = Done::shared();
        let h = Arc::new(AtomicU64::new(0));
        let before = super::rss_bytes();
        let sinks = start(n, &done, Duration::ZERO, &h, None);
        for s in &sinks {
            s.wait_for_startup().await;
        }
        tokio::time::sleep(super::SETTLE).await;
        let per = super::per_actor(before, n);
        stop_all(&sinks).await;
        per
    })
}

/// Bounded mailbox of [`MAILBOX_BOUND`], slow consumer; `try` uses `try_send` (fails when
/// full), otherwise `send().await` (waits for room).
pub fn mailbox_full(try_send: bool) -> MailboxFull {
    super::on_worker(async move {
        let done = Done::shared();
        let handled = Arc::new(AtomicU64::new(0));
        let sinks = start(1, &done, MAILBOX_WORK, &handled, Some(MAILBOX_BOUND));
        let mut refused = 0;
        let t = Instant::now();
        for _ in 0..MAILBOX_SENDS {
            let m = Tell(Bytes::from_static(b"m"));
            if try_send {
                if sinks[0].tell(m).try_send().is_err() {
                    refused += 1;
                }
            } else {
                sinks[0].tell(m).await.expect("tell");
            }
        }
        let send_ms = t.elapsed().as_secs_f64() * 1000.0;
        let queued = MAILBOX_SENDS - refused - handled.load(Ordering::Relaxed);
        done.arm(1);
        sinks[0].tell(Fin).await.expect("tell");
        done.wait().await;
        stop_all(&sinks).await;
        MailboxFull {
            sent: MAILBOX_SENDS,
            handled: handled.load(Ordering::Relaxed),
            refused,
            dropped: 0,
            send_ms,
            queued_at_end: queued,
            behaviour: if try_send {
                "`tell(..).try_send()` fails with `SendError::MailboxFull` at the bound".to_owned()
            } else {
                "`tell(..).await` waits for room: nothing lost, the queue stays at the bound"
                    .to_owned()
            },
        }
    })
}

struct Node {
    parent: Option<ActorRef<Node>>,
    root: Option<tokio::sync::oneshot::Sender<u64>>,
    pending: u64,
    acc: u64,
}

impl Actor for Node {
    type Args = Self;
    type Error = Infallible;
    async fn on_start(args: Self, _: ActorRef<Self>) -> Result<Self, Infallible> {
        Ok(args)
    }
}

struct Go {
    num: u64,
    size: u64,
}
struct Sum(u64);

impl Node {
    async fn finish(&mut self, ctx: &Context<Self, ()>, v: u64) {
        if let Some(p) = self.parent.take() {
            let _ = p.tell(Sum(v)).await;
        }
        if let Some(r) = self.root.take() {
            let _ = r.send(v);
        }
        let _ = ctx.actor_ref().stop_gracefully().await;
    }
}

impl Message<Go> for Node {
    type Reply = ();
    async fn handle(&mut self, g: Go, ctx: &mut Context<Self, ()>) {
        if g.size == 1 {
            self.finish(ctx, g.num).await;
            return;
        }
        let child = g.size / SKYNET_FANOUT;
        self.pending = SKYNET_FANOUT;
        for i in 0..SKYNET_FANOUT {
            let c = Node::spawn(Node {
                parent: Some(ctx.actor_ref().clone()),
                root: None,
                pending: 0,
                acc: 0,
            });
            let _ = c
                .tell(Go {
                    num: g.num + i * child,
                    size: child,
                })
                .await;
        }
    }
}

impl Message<Sum> for Node {
    type Reply = ();
    async fn handle(&mut self, s: Sum, ctx: &mut Context<Self, ()>) {
        self.acc += s.0;
        self.pending -= 1;
        if self.pending == 0 {
            let v = self.acc;
            self.finish(ctx, v).await;
        }
    }
}

/// Skynet: 10^6 leaf actors under a tree of 10 children each, summing; seconds.
pub fn skynet() -> f64 {
    super::on_worker(async move {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let t = Instant::now();
        let root = Node::spawn(Node {
            parent: None,
            root: Some(tx),
            pending: 0,
            acc: 0,
        });
        root.tell(Go {
            num: 0,
            size: SKYNET_LEAVES,
        })
        .await
        .expect("tell");
        let sum = rx.await.expect("skynet answers");
        assert_eq!(sum, super::skynet_sum());
        t.elapsed().as_secs_f64()
    })
}
