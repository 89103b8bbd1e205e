//! The message bus between agents: direct sends, topics, and request/reply.
//!
//! Every agent has a bounded mailbox. What happens when it is full is the sender's choice, per
//! send or per topic ([`Overflow`]): refuse with [`BusError::MailboxFull`], drop the new message
//! and count it, or wait for room up to a timeout. Nothing on the send path takes a lock: a
//! mailbox is a lock-free queue behind a [`Bound`](crate::bound::Bound), and a topic's
//! subscriber list is an immutable snapshot swapped atomically when someone (un)subscribes.
//!
//! Messages carry a [`TraceContext`], so a trace can follow a conversation from agent to agent.
//!
//! The bus owns the mailboxes (one per pool agent, addressed by [`AgentId`]), the topics and
//! its counters; it knows the pool only to wake the agent a message is for.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use crossbeam_queue::SegQueue;
use dashmap::DashMap;
use serde::Serialize;
use tokio::sync::oneshot;

use crate::bound::Bound;
pub use crate::config::Overflow;
use crate::error::BusError;
use crate::ids::AgentId;
use crate::phase::Phase;
use crate::pool::Pool;
use crate::telemetry::{LatencyHistogram, LatencySummary, StripedCounter};
pub use crate::trace::TraceContext;

/// Which bus operation produced a message; also the `kind` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageKind {
    /// A direct send to one agent.
    Direct,
    /// A topic publication.
    Publish,
    /// A request that expects a reply.
    Request,
}

impl MessageKind {
    /// The metric label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            MessageKind::Direct => "direct",
            MessageKind::Publish => "publish",
            MessageKind::Request => "request",
        }
    }

    pub(crate) const fn index(self) -> usize {
        self as usize
    }

    /// All kinds, in label order.
    pub(crate) const ALL: [MessageKind; 3] = [
        MessageKind::Direct,
        MessageKind::Publish,
        MessageKind::Request,
    ];
}

/// A message as delivered to [`Agent::on_message`](crate::Agent::on_message).
#[derive(Debug)]
pub struct Message {
    /// The sending agent, or `None` when sent from outside the pool.
    pub from: Option<AgentId>,
    /// The topic, for publications.
    pub topic: Option<Arc<str>>,
    /// The body.
    pub payload: Bytes,
    /// Trace context of the sender.
    pub trace: TraceContext,
    kind: MessageKind,
    reply: Option<oneshot::Sender<Bytes>>,
    sent_at: Instant,
}

impl Message {
    /// True if the sender waits for a reply (return it from `on_message`).
    pub fn is_request(&self) -> bool {
        self.kind == MessageKind::Request
    }

    /// How the message was sent.
    pub fn kind(&self) -> MessageKind {
        self.kind
    }

    /// Takes the reply channel of a request (the receiving agent's loop answers it).
    pub(crate) fn take_reply(&mut self) -> Option<oneshot::Sender<Bytes>> {
        self.reply.take()
    }
}

/// Whether a send put the message in the mailbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// It is in the recipient's mailbox.
    Delivered,
    /// The mailbox was full and the policy was `DropNewest`: it was dropped and counted.
    Dropped,
}

/// What a publication reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PublishReport {
    /// Subscribers whose mailbox took the message.
    pub delivered: usize,
    /// Subscribers whose mailbox was full (dropped or refused, per the topic's policy).
    pub dropped: usize,
}

/// Bus totals.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BusStats {
    /// Direct sends delivered to a mailbox.
    pub direct: u64,
    /// Publications delivered (one per subscriber reached).
    pub publish: u64,
    /// Requests delivered.
    pub request: u64,
    /// Dropped because a mailbox was full.
    pub dropped_mailbox_full: u64,
    /// Dropped because the recipient did not exist.
    pub dropped_no_such_agent: u64,
    /// Requests whose reply did not come in time.
    pub dropped_timeout: u64,
    /// Send to handler start, over all kinds.
    pub delivery: LatencySummary,
}

/// Why a message was not delivered: the `reason` label values, in counter order.
pub(crate) const DROP_REASONS: [&str; 3] = ["mailbox_full", "no_such_agent", "timeout"];

/// The bus's counters, resolved once.
struct BusTelemetry {
    messages: [StripedCounter; 3],
    delivery: [LatencyHistogram; 3],
    /// By reason, in [`DROP_REASONS`] order.
    dropped: [StripedCounter; 3],
}

const MAILBOX_FULL: usize = 0;
const NO_SUCH_AGENT: usize = 1;
const TIMED_OUT: usize = 2;

/// A bounded mailbox of bus messages.
struct Mailbox {
    queue: SegQueue<Message>,
    bound: Bound,
}

/// The bus's state: one mailbox per pool agent, the topics, the counters.
pub(crate) struct BusCore {
    mailboxes: Box<[Mailbox]>,
    pool: Arc<Pool>,
    topics: DashMap<String, Arc<TopicInner>>,
    telemetry: BusTelemetry,
    default_overflow: Overflow,
    phase: Arc<Phase>,
}

impl BusCore {
    /// A bus for `pool`'s agents, each with a mailbox of `capacity` messages.
    pub(crate) fn new(
        pool: Arc<Pool>,
        capacity: usize,
        default_overflow: Overflow,
        phase: Arc<Phase>,
        latency_histograms: bool,
    ) -> Self {
        BusCore {
            mailboxes: (0..pool.len())
                .map(|_| Mailbox {
                    queue: SegQueue::new(),
                    bound: Bound::new(capacity),
                })
                .collect(),
            pool,
            topics: DashMap::new(),
            telemetry: BusTelemetry {
                messages: std::array::from_fn(|_| StripedCounter::default()),
                delivery: std::array::from_fn(|_| LatencyHistogram::new(latency_histograms)),
                dropped: std::array::from_fn(|_| StripedCounter::default()),
            },
            default_overflow,
            phase,
        }
    }

    /// The next message for agent `index`, freeing its mailbox slot.
    #[inline]
    pub(crate) fn pop(&self, index: u32) -> Option<Message> {
        let mailbox = &self.mailboxes[index as usize];
        let msg = mailbox.queue.pop()?;
        mailbox.bound.release();
        Some(msg)
    }

    /// True if agent `index` has mail waiting.
    #[inline]
    pub(crate) fn has_mail(&self, index: u32) -> bool {
        !self.mailboxes[index as usize].queue.is_empty()
    }

    /// Records that `msg` reached its handler.
    #[inline]
    pub(crate) fn delivered(&self, msg: &Message) {
        let nanos = u64::try_from(msg.sent_at.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.telemetry.delivery[msg.kind.index()].record(nanos);
    }

    /// Messages of `kind` delivered to a mailbox.
    pub(crate) fn messages(&self, kind: MessageKind) -> u64 {
        self.telemetry.messages[kind.index()].get()
    }

    /// Messages dropped for [`DROP_REASONS`]`[reason]`.
    pub(crate) fn dropped(&self, reason: usize) -> u64 {
        self.telemetry.dropped[reason].get()
    }

    /// Send-to-handler latency of `kind`.
    pub(crate) fn delivery(&self, kind: MessageKind) -> &LatencyHistogram {
        &self.telemetry.delivery[kind.index()]
    }

    /// Totals since start.
    pub(crate) fn stats(&self) -> BusStats {
        BusStats {
            direct: self.messages(MessageKind::Direct),
            publish: self.messages(MessageKind::Publish),
            request: self.messages(MessageKind::Request),
            dropped_mailbox_full: self.dropped(MAILBOX_FULL),
            dropped_no_such_agent: self.dropped(NO_SUCH_AGENT),
            dropped_timeout: self.dropped(TIMED_OUT),
            delivery: LatencyHistogram::merged(&self.telemetry.delivery),
        }
    }
}

pub(crate) struct TopicInner {
    name: Arc<str>,
    subscribers: ArcSwap<Vec<u32>>,
    overflow: Overflow,
}

/// A resolved topic. Publishing through it skips the name lookup; keep one for hot loops.
#[derive(Clone)]
pub struct Topic {
    inner: Arc<TopicInner>,
    bus: Bus,
}

impl std::fmt::Debug for Topic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Topic")
            .field("name", &self.inner.name)
            .field("subscribers", &self.inner.subscribers.load().len())
            .finish()
    }
}

impl Topic {
    /// The topic's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Number of subscribers right now.
    pub fn subscribers(&self) -> usize {
        self.inner.subscribers.load().len()
    }

    /// Publishes to every current subscriber with the topic's overflow policy.
    pub async fn publish(&self, payload: impl Into<Bytes>) -> Result<PublishReport, BusError> {
        self.bus
            .publish_inner(&self.inner, payload.into(), self.inner.overflow)
            .await
    }

    /// Publishes without ever waiting: a full mailbox counts as dropped even under `Wait`.
    pub fn try_publish(&self, payload: impl Into<Bytes>) -> Result<PublishReport, BusError> {
        self.bus.try_publish_inner(&self.inner, payload.into())
    }
}

/// A handle to the bus. Cheap to clone. From an agent's context it sends as that agent.
#[derive(Clone)]
pub struct Bus {
    core: Arc<BusCore>,
    from: Option<AgentId>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus").field("from", &self.from).finish()
    }
}

impl Bus {
    pub(crate) fn new(core: Arc<BusCore>, from: Option<AgentId>) -> Self {
        Bus { core, from }
    }

    fn message(&self, kind: MessageKind, topic: Option<Arc<str>>, payload: Bytes) -> Message {
        Message {
            from: self.from,
            topic,
            payload,
            trace: crate::trace::current(),
            kind,
            reply: None,
            sent_at: Instant::now(),
        }
    }

    fn check_open(&self) -> Result<(), BusError> {
        if self.core.phase.is_closed() {
            Err(BusError::ShuttingDown)
        } else {
            Ok(())
        }
    }

    /// Sends to `to` with the runtime's default overflow policy (`mailbox.overflow`).
    pub async fn send(&self, to: AgentId, payload: impl Into<Bytes>) -> Result<Delivery, BusError> {
        let policy = self.core.default_overflow;
        self.send_with(to, payload, policy).await
    }

    /// Sends to `to` with an explicit overflow policy.
    pub async fn send_with(
        &self,
        to: AgentId,
        payload: impl Into<Bytes>,
        overflow: Overflow,
    ) -> Result<Delivery, BusError> {
        self.check_open()?;
        let msg = self.message(MessageKind::Direct, None, payload.into());
        self.deliver(to, msg, overflow).await
    }

    /// Sends to `to` without waiting: under a `Wait` default policy a full mailbox is refused.
    pub fn try_send(&self, to: AgentId, payload: impl Into<Bytes>) -> Result<Delivery, BusError> {
        self.check_open()?;
        let policy = match self.core.default_overflow {
            Overflow::Wait { .. } => Overflow::Reject,
            other => other,
        };
        let msg = self.message(MessageKind::Direct, None, payload.into());
        self.try_deliver(to, msg, policy)
    }

    /// Sends a request to `to` and waits up to `timeout` for the reply.
    pub async fn request(
        &self,
        to: AgentId,
        payload: impl Into<Bytes>,
        timeout: Duration,
    ) -> Result<Bytes, BusError> {
        use tracing::Instrument;
        let span = tracing::debug_span!(
            "troupe.bus.request",
            to = to.0,
            timeout_ms = timeout.as_millis() as u64
        );
        self.request_inner(to, payload.into(), timeout)
            .instrument(span)
            .await
    }

    async fn request_inner(
        &self,
        to: AgentId,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, BusError> {
        self.check_open()?;
        let started = Instant::now();
        let (tx, rx) = oneshot::channel();
        let mut msg = self.message(MessageKind::Request, None, payload);
        msg.reply = Some(tx);
        let until = started + timeout;
        let policy = Overflow::Wait { timeout };
        match self.deliver(to, msg, policy).await? {
            Delivery::Delivered => {}
            Delivery::Dropped => return Err(BusError::NoReply(to)),
        }
        match tokio::time::timeout_at(until.into(), rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(BusError::NoReply(to)),
            Err(_) => {
                self.core.telemetry.dropped[TIMED_OUT].increment(1);
                Err(BusError::Timeout { agent: to, timeout })
            }
        }
    }

    /// Publishes to a topic by name with the topic's overflow policy. Publishing to a topic
    /// nobody subscribes to delivers nothing and is not an error.
    pub async fn publish(
        &self,
        topic: &str,
        payload: impl Into<Bytes>,
    ) -> Result<PublishReport, BusError> {
        let t = self.topic(topic);
        let overflow = t.inner.overflow;
        self.publish_inner(&t.inner, payload.into(), overflow).await
    }

    /// Resolves (creating if needed) a topic with the default overflow policy.
    pub fn topic(&self, name: &str) -> Topic {
        self.topic_with(name, self.core.default_overflow)
    }

    /// Resolves a topic, creating it with `overflow` as its policy if it does not exist yet
    /// (an existing topic keeps the policy it was created with).
    pub fn topic_with(&self, name: &str, overflow: Overflow) -> Topic {
        let inner = if let Some(t) = self.core.topics.get(name) {
            t.clone()
        } else {
            self.core
                .topics
                .entry(name.to_owned())
                .or_insert_with(|| {
                    Arc::new(TopicInner {
                        name: Arc::from(name),
                        subscribers: ArcSwap::from_pointee(Vec::new()),
                        overflow,
                    })
                })
                .clone()
        };
        Topic {
            inner,
            bus: self.clone(),
        }
    }

    /// Subscribes `agent` to `topic`. Subscribing twice is a no-op.
    pub fn subscribe(&self, topic: &str, agent: AgentId) -> Result<(), BusError> {
        self.check_agent(agent)?;
        let t = self.topic(topic);
        t.inner.subscribers.rcu(|subs| {
            let mut subs = Vec::clone(subs);
            if !subs.contains(&agent.0) {
                subs.push(agent.0);
            }
            subs
        });
        Ok(())
    }

    /// Unsubscribes `agent` from `topic`. Unsubscribing a non-subscriber is a no-op.
    pub fn unsubscribe(&self, topic: &str, agent: AgentId) -> Result<(), BusError> {
        self.check_agent(agent)?;
        if let Some(t) = self.core.topics.get(topic) {
            t.subscribers.rcu(|subs| {
                subs.iter()
                    .copied()
                    .filter(|&s| s != agent.0)
                    .collect::<Vec<_>>()
            });
        }
        Ok(())
    }

    fn check_agent(&self, agent: AgentId) -> Result<(), BusError> {
        if (agent.0 as usize) < self.core.mailboxes.len() {
            Ok(())
        } else {
            Err(BusError::NoSuchAgent(agent))
        }
    }

    /// Subscribes the sending agent itself (from an agent's context).
    pub fn subscribe_self(&self, topic: &str) -> Result<(), BusError> {
        match self.from {
            Some(me) => self.subscribe(topic, me),
            None => Err(BusError::NoSuchAgent(AgentId(u32::MAX))),
        }
    }

    async fn publish_inner(
        &self,
        topic: &TopicInner,
        payload: Bytes,
        overflow: Overflow,
    ) -> Result<PublishReport, BusError> {
        if let Overflow::Wait { .. } = overflow {
            self.check_open()?;
            let subs = topic.subscribers.load_full();
            let mut report = PublishReport::default();
            for &s in subs.iter() {
                let msg = self.message(
                    MessageKind::Publish,
                    Some(topic.name.clone()),
                    payload.clone(),
                );
                match self.deliver(AgentId(s), msg, overflow).await {
                    Ok(Delivery::Delivered) => report.delivered += 1,
                    Ok(Delivery::Dropped) | Err(BusError::MailboxFull { .. }) => {
                        report.dropped += 1
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(report)
        } else {
            self.try_publish_inner(topic, payload)
        }
    }

    fn try_publish_inner(
        &self,
        topic: &TopicInner,
        payload: Bytes,
    ) -> Result<PublishReport, BusError> {
        self.check_open()?;
        let subs = topic.subscribers.load();
        let mut report = PublishReport::default();
        let t = &self.core.telemetry;
        for &s in subs.iter() {
            let Some(mailbox) = self.core.mailboxes.get(s as usize) else {
                continue;
            };
            if mailbox.bound.try_reserve().is_err() {
                t.dropped[MAILBOX_FULL].increment(1);
                report.dropped += 1;
                continue;
            }
            mailbox.queue.push(self.message(
                MessageKind::Publish,
                Some(topic.name.clone()),
                payload.clone(),
            ));
            self.core.pool.slot(s).signal().notify();
            report.delivered += 1;
        }
        t.messages[MessageKind::Publish.index()].increment(report.delivered as u64);
        Ok(report)
    }

    /// The recipient's mailbox, counting a send to nobody.
    fn recipient(&self, to: AgentId) -> Result<&Mailbox, BusError> {
        self.core.mailboxes.get(to.0 as usize).ok_or_else(|| {
            self.core.telemetry.dropped[NO_SUCH_AGENT].increment(1);
            BusError::NoSuchAgent(to)
        })
    }

    /// Puts a message into a mailbox slot already reserved, and wakes the agent.
    #[inline]
    fn push(&self, to: AgentId, mailbox: &Mailbox, msg: Message) -> Delivery {
        self.core.telemetry.messages[msg.kind.index()].increment(1);
        mailbox.queue.push(msg);
        self.core.pool.slot(to.0).signal().notify();
        Delivery::Delivered
    }

    /// Counts a full mailbox and describes it.
    fn full(&self, to: AgentId, mailbox: &Mailbox, depth: usize) -> BusError {
        self.core.telemetry.dropped[MAILBOX_FULL].increment(1);
        BusError::MailboxFull {
            agent: to,
            depth,
            capacity: mailbox.bound.capacity(),
        }
    }

    #[inline]
    fn try_deliver(
        &self,
        to: AgentId,
        msg: Message,
        overflow: Overflow,
    ) -> Result<Delivery, BusError> {
        let mailbox = self.recipient(to)?;
        match mailbox.bound.try_reserve() {
            Ok(()) => Ok(self.push(to, mailbox, msg)),
            Err(depth) => {
                let error = self.full(to, mailbox, depth);
                match overflow {
                    Overflow::DropNewest => Ok(Delivery::Dropped),
                    Overflow::Reject | Overflow::Wait { .. } => Err(error),
                }
            }
        }
    }

    async fn deliver(
        &self,
        to: AgentId,
        msg: Message,
        overflow: Overflow,
    ) -> Result<Delivery, BusError> {
        let Overflow::Wait { timeout } = overflow else {
            return self.try_deliver(to, msg, overflow);
        };
        let mailbox = self.recipient(to)?;
        match mailbox.bound.reserve_until(Instant::now() + timeout).await {
            Ok(()) => Ok(self.push(to, mailbox, msg)),
            Err(depth) => Err(self.full(to, mailbox, depth)),
        }
    }
}
