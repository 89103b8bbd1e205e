//! The workloads on ractor 0.16 with its default features, as its docs write them: one message
//! enum per actor, `cast` (`send_message`) to tell, `call` with an `RpcReplyPort` to ask. ractor
//! mailboxes are unbounded; there is no capacity to set.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::join_all;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::{
    Done, Latency, MAILBOX_SENDS, MAILBOX_WORK, MailboxFull, SKYNET_FANOUT, SKYNET_LEAVES,
};

enum Msg {
    Tell(#[allow(dead_code)] Bytes),
    Fin,
    Ask(Bytes, RpcReplyPort<Bytes>),
}

struct Sink;

struct SinkState {
    done: Arc<Done>,
    handled: Arc<AtomicU64>,
    work: Duration,
}

impl Actor for Sink {
    type Msg = Msg;
    type State = SinkState;
    type Arguments = SinkState;

    async fn pre_start(
        &self,
        _: ActorRef<Msg>,
        args: SinkState,
    ) -> Result<SinkState, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle(
        &self,
        _: ActorRef<Msg>,
        msg: Msg,
        s: &mut SinkState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            Msg::Tell(_) => {
                s.handled.fetch_add(1, Ordering::Relaxed);
                super::busy(s.work);
            }
            Msg::Fin => s.done.bump(),
            Msg::Ask(b, reply) => {
                let _ = reply.send(b);
            }
        }
        Ok(())
    }
}

async fn start(
    n: usize,
    done: &Arc<Done>,
    work: Duration,
    handled: &Arc<AtomicU64>,
) -> Vec<ActorRef<Msg>> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let (r, _) = Actor::spawn(
            None,
            Sink,
            SinkState {
                done: done.clone(),
                handled: handled.clone(),
                work,
            },
        )
        .await
        .expect("spawn");
        v.push(r);
    }
    v
}

/// `n` sinks that do no work, and their burst counter.
async fn plain(n: usize) -> (Arc<Done>, Vec<ActorRef<Msg>>) {
    let done = Done::shared();
    let sinks = start(n, &done, Duration::ZERO, &Arc::new(AtomicU64::new(0))).await;
    (done, sinks)
}

fn stop_all(v: &[ActorRef<Msg>]) {
    for r in v {
        r.stop(None);
    }
}

/// Tell throughput with `cast`.
pub fn tell(actors: usize, per_actor: u64, payload: usize) -> f64 {
    super::on_worker(async move {
        let (done, sinks) = plain(actors).await;
        let p = Bytes::from(vec![b'x'; payload]);
        let burst = |per: u64| {
            done.arm(actors as u64);
            for _ in 0..per {
                for s in &sinks {
                    s.cast(Msg::Tell(p.clone())).expect("cast");
                }
            }
            for s in &sinks {
                s.cast(Msg::Fin).expect("cast");
            }
            done.wait()
        };
        burst(1).await;
        let t = Instant::now();
        burst(per_actor).await;
        let r = (actors as u64 * per_actor) as f64 / t.elapsed().as_secs_f64();
        stop_all(&sinks);
        r
    })
}

/// Serial `call` to one actor.
pub fn ask_serial(n: u64, payload: usize) -> Latency {
    super::on_worker(async move {
        let (_, sinks) = plain(1).await;
        let p = Bytes::from(vec![b'x'; payload]);
        let l = super::timed_ops(n, || async {
            let r = sinks[0]
                .call(|reply| Msg::Ask(p.clone(), reply), None)
                .await
                .expect("call");
            assert!(r.is_success());
        })
        .await;
        stop_all(&sinks);
        l
    })
}

/// `call` to every actor at once, gathered with `join_all`.
pub fn fan_out(actors: usize, rounds: u64) -> Latency {
    super::on_worker(async move {
        let (_, sinks) = plain(actors).await;
        let p = Bytes::from_static(b"q");
        let l = super::timed_ops(rounds, || async {
            let r = join_all(
                sinks
                    .iter()
                    .map(|a| a.call(|reply| Msg::Ask(p.clone(), reply), None)),
            )
            .await;
            assert!(r.iter().all(|r| r.as_ref().is_ok_and(|c| c.is_success())));
        })
        .await;
        stop_all(&sinks);
        l
    })
}

/// Publishing through a process group (`ractor::pg`): every member gets the message.
pub fn publish(subscribers: usize, messages: u64) -> f64 {
    super::on_worker(async move {
        let (done, sinks) = plain(subscribers).await;
        let group = format!("bench-{}", std::process::id());
        ractor::pg::join(group.clone(), sinks.iter().map(|s| s.get_cell()).collect());
        let p = Bytes::from_static(b"m");
        let t = Instant::now();
        for _ in 0..messages {
            for member in ractor::pg::get_members(&group) {
                member.send_message(Msg::Tell(p.clone())).expect("send");
            }
        }
        done.arm(subscribers as u64);
        for member in ractor::pg::get_members(&group) {
            member.send_message(Msg::Fin).expect("send");
        }
        done.wait().await;
        let r = (messages * subscribers as u64) as f64 / t.elapsed().as_secs_f64();
        stop_all(&sinks);
        r
    })
}

/// Time until `n` actors are spawned (`spawn` returns after `pre_start`), seconds.
pub fn spawn(n: usize) -> f64 {
    super::on_worker(async move {
        let done = Done::shared();
        let h = Arc::new(AtomicU64::new(0));
        let t = Instant::now();
        let sinks = start(n, &done, Duration::ZERO, &h).await;
        let s = t.elapsed().as_secs_f64();
        stop_all(&sinks);
        s
    })
}

/// Resident memory per idle actor after `n` sinks started (run in a fresh process), bytes.
pub fn idle_memory(n: usize) -> f64 {
    super::on_worker(async move {
        let done = Done::shared();
        let h = Arc::new(AtomicU64::new(0));
        let before = super::rss_bytes();
        let sinks = start(n, &done, Duration::ZERO, &h).await;
        tokio::time::sleep(super::SETTLE).await;
        let per = super::per_actor(before, n);
        stop_all(&sinks);
        per
    })
}

/// Unbounded mailbox, slow consumer: every `cast` succeeds and the queue grows.
pub fn mailbox_full() -> MailboxFull {
    super::on_worker(async move {
        let done = Done::shared();
        let handled = Arc::new(AtomicU64::new(0));
        let sinks = start(1, &done, MAILBOX_WORK, &handled).await;
        let t = Instant::now();
        for _ in 0..MAILBOX_SENDS {
            sinks[0]
                .cast(Msg::Tell(Bytes::from_static(b"m")))
                .expect("cast");
        }
        let send_ms = t.elapsed().as_secs_f64() * 1000.0;
        let queued = MAILBOX_SENDS - handled.load(Ordering::Relaxed);
        done.arm(1);
        sinks[0].cast(Msg::Fin).expect("cast");
        done.wait().await;
        stop_all(&sinks);
        MailboxFull {
            sent: MAILBOX_SENDS,
            handled: handled.load(Ordering::Relaxed),
            refused: 0,
            dropped: 0,
            send_ms,
            queued_at_end: queued,
            behaviour: "no bound to set: mailboxes are unbounded, every `cast` succeeds and the queue grows with the backlog".to_owned(),
        }
    })
}

struct Node;

struct NodeArgs {
    num: u64,
    size: u64,
    parent: Option<ActorRef<NodeMsg>>,
    root: Option<tokio::sync::oneshot::Sender<u64>>,
}

enum NodeMsg {
    Sum(u64),
}

struct NodeState {
    parent: Option<ActorRef<NodeMsg>>,
    root: Option<tokio::sync::oneshot::Sender<u64>>,
    pending: u64,
    acc: u64,
}

impl NodeState {
    fn finish(&mut self, me: &ActorRef<NodeMsg>, v: u64) {
        if let Some(p) = self.parent.take() {
            let _ = p.cast(NodeMsg::Sum(v));
        }
        if let Some(r) = self.root.take() {
            let _ = r.send(v);
        }
        me.stop(None);
    }
}

impl Actor for Node {
    type Msg = NodeMsg;
    type State = NodeState;
    type Arguments = NodeArgs;

    async fn pre_start(
        &self,
        me: ActorRef<NodeMsg>,
        a: NodeArgs,
    ) -> Result<NodeState, ActorProcessingErr> {
        let mut s = NodeState {
            parent: a.parent,
            root: a.root,
            pending: 0,
            acc: 0,
        };
        if a.size == 1 {
            s.finish(&me, a.num);
            return Ok(s);
        }
        let child = a.size / SKYNET_FANOUT;
        s.pending = SKYNET_FANOUT;
        for i in 0..SKYNET_FANOUT {
            Actor::spawn(
                None,
                Node,
                NodeArgs {
                    num: a.num + i * child,
                    size: child,
                    parent: Some(me.clone()),
                    root: None,
                },
            )
            .await?;
        }
        Ok(s)
    }

    async fn handle(
        &self,
        me: ActorRef<NodeMsg>,
        msg: NodeMsg,
        s: &mut NodeState,
    ) -> Result<(), ActorProcessingErr> {
        let NodeMsg::Sum(v) = msg;
        s.acc += v;
        s.pending -= 1;
        if s.pending == 0 {
            let v = s.acc;
            s.finish(&me, v);
        }
        Ok(())
    }
}

/// Skynet: 10^6 leaf actors under a tree of 10 children each, summing; seconds.
pub fn skynet() -> f64 {
    super::on_worker(async move {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let t = Instant::now();
        Actor::spawn(
            None,
            Node,
            NodeArgs {
                num: 0,
                size: SKYNET_LEAVES,
                parent: None,
                root: Some(tx),
            },
        )
        .await
        .expect("root spawns");
        let sum = rx.await.expect("skynet answers");
        assert_eq!(sum, super::skynet_sum());
        t.elapsed().as_secs_f64()
    })
}
