//! The message bus between agents: direct sends, topics, and request/reply.
//!
//! Every agent has a bounded mailbox. What happens when it is full is the sender's choice, per
//! send or per topic ([`Overflow`]): refuse with [`BusError::MailboxFull`], drop the new message
//! and count it, or wait for room up to a timeout. Nothing on the send path takes a lock: a
//! mailbox is a lock-free queue ([`MailQueue`](crate::mailq::MailQueue): a small ring, then
//! an unbounded spill) behind a [`Bound`](crate::bound::Bound); the topic registry and
//! each topic's subscriber list are immutable snapshots swapped atomically when someone creates
//! a topic or (un)subscribes, so a publication is two atomic loads and a hash lookup.
//!
//! Fan-out ([`Bus::fan_out`], [`Bus::request_all`], [`Bus::request_any`]) sends one request
//! to every (or any `n`) agent with a capability, or to a topic's subscribers, under one
//! deadline, and returns one [`Reply`] per agent asked — partial results when the deadline
//! passes.
//!
//! Topics are bounded: names are 1–128 characters of `A-Z a-z 0-9 _ - . : /`, a registry holds
//! at most `mailbox.max_topics`, publishing to a name nobody subscribes to creates nothing,
//! and a topic is removed when its last subscriber leaves and no [`Topic`] handle holds it.
//!
//! During shutdown's drain the bus stays open to agents (they may finish conversations for the
//! work they hold) and is closed to senders outside the pool; once the drain deadline passes it
//! is closed to everyone.
//!
//! Messages carry a [`TraceContext`], so a trace can follow a conversation from agent to agent.
//!
//! The bus owns the mailboxes (one per pool agent, addressed by [`AgentId`]), the topics and
//! its counters; it knows the pool to wake the agent a message is for and to find the agents
//! of a capability.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use serde::Serialize;
use tokio::sync::oneshot;

use crate::bound::Bound;
use crate::bridge::{BusBridge, RemoteDelivery};
pub use crate::config::Overflow;
use crate::error::BusError;
use crate::gather::{Gather, GatherSlot};
use crate::ids::AgentId;
use crate::mailq::MailQueue;
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
    reply: Option<ReplyTo>,
    /// When it was sent, in the bus's latency clock (see `BusCore::stamp`).
    sent_at: u64,
}

/// Where the answer to a request goes.
#[derive(Debug)]
pub(crate) enum ReplyTo {
    /// A single request's caller.
    One(oneshot::Sender<Bytes>),
    /// One recipient's place in a fan-out.
    Fan(GatherSlot),
}

impl ReplyTo {
    /// Answers the request.
    pub(crate) fn send(self, answer: Bytes) {
        match self {
            ReplyTo::One(tx) => {
                let _ = tx.send(answer);
            }
            ReplyTo::Fan(slot) => slot.send(answer),
        }
    }
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
    pub(crate) fn take_reply(&mut self) -> Option<ReplyTo> {
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

/// Who a fan-out asks.
#[derive(Debug, Clone, Copy)]
pub enum Recipients<'a> {
    /// Every agent that serves this capability (every kind is a capability).
    Capability(&'a str),
    /// Every current subscriber of this topic.
    Topic(&'a str),
    /// These agents.
    Agents(&'a [AgentId]),
}

/// How many of the recipients a fan-out asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// All of them.
    All,
    /// At most `n` of them, those with the fewest messages waiting first (ties broken in
    /// rotation, so repeated fan-outs spread over the recipients).
    Any(usize),
}

/// One agent's answer to a fan-out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// It replied with these bytes.
    Ok(Bytes),
    /// It had not replied when the deadline passed.
    Timeout,
    /// It handled the request without replying, or was restarted while holding it.
    NoReply,
    /// The request never reached it: its mailbox was full, or the bus refused to send.
    Refused(BusError),
}

impl Reply {
    /// The reply, if there is one.
    pub fn ok(&self) -> Option<&Bytes> {
        match self {
            Reply::Ok(b) => Some(b),
            _ => None,
        }
    }
}

/// What a fan-out gathered: one entry per agent asked, in the order they were asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FanOut {
    /// Each agent asked and its answer.
    pub replies: Vec<(AgentId, Reply)>,
}

impl FanOut {
    /// The agents that replied, with their replies.
    pub fn ok(&self) -> impl Iterator<Item = (AgentId, &Bytes)> {
        self.replies
            .iter()
            .filter_map(|(a, r)| r.ok().map(|b| (*a, b)))
    }

    /// How many agents were asked.
    pub fn asked(&self) -> usize {
        self.replies.len()
    }

    /// How many replied.
    pub fn replied(&self) -> usize {
        self.ok().count()
    }

    /// True if every agent asked replied.
    pub fn complete(&self) -> bool {
        self.replies.iter().all(|(_, r)| matches!(r, Reply::Ok(_)))
    }
}

/// Longest topic name, in bytes.
pub const MAX_TOPIC_NAME: usize = 128;

/// Why `name` cannot be a topic name, if it cannot.
fn topic_name_error(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        return Some("must not be empty");
    }
    if name.len() > MAX_TOPIC_NAME {
        return Some("is longer than 128 bytes");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'/'))
    {
        return Some("may hold only A-Z a-z 0-9 _ - . : /");
    }
    None
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
    /// Topics in the registry now.
    pub topics: usize,
    /// Send to handler start, over all kinds.
    pub delivery: LatencySummary,
}

/// Why a message was not delivered: the `reason` label values, in counter order.
pub(crate) const DROP_REASONS: [&str; 3] = ["mailbox_full", "no_such_agent", "timeout"];

/// The bus's counters, resolved once.
struct BusTelemetry {
    messages: [StripedCounter; 3],
    delivery: [LatencyHistogram; 3],
    /// The clock of send-to-handler latency, `None` when latency is not kept. quanta's clock
    /// reads the CPU's time-stamp counter where it is invariant: a message's two stamps cost a
    /// few nanoseconds where `Instant::now` is a vDSO call (a tenth of an agent's time on a
    /// 928-way fan-out on this VM).
    clock: Option<quanta::Clock>,
    /// By reason, in [`DROP_REASONS`] order.
    dropped: [StripedCounter; 3],
}

const MAILBOX_FULL: usize = 0;
const NO_SUCH_AGENT: usize = 1;
const TIMED_OUT: usize = 2;

/// A bounded mailbox of bus messages.
struct Mailbox {
    queue: MailQueue<Message>,
    bound: Bound,
}

type Registry = HashMap<Arc<str>, Arc<TopicInner>>;

/// The bus's state: one mailbox per pool agent, the topics, the counters.
pub(crate) struct BusCore {
    mailboxes: Box<[Mailbox]>,
    pool: Arc<Pool>,
    /// Read by every publication, replaced whole when a topic is added or removed.
    topics: ArcSwap<Registry>,
    max_topics: usize,
    telemetry: BusTelemetry,
    default_overflow: Overflow,
    phase: Arc<Phase>,
    /// Rotates the start of `Want::Any` picks.
    rotation: AtomicUsize,
    /// Carries publications and remote sends to other nodes, when a cluster layer set one.
    bridge: Option<Arc<dyn BusBridge>>,
}

impl BusCore {
    /// A bus for `pool`'s agents, each with a mailbox of `capacity` messages.
    pub(crate) fn new(
        pool: Arc<Pool>,
        capacity: usize,
        max_topics: usize,
        default_overflow: Overflow,
        phase: Arc<Phase>,
        latency_histograms: bool,
        bridge: Option<Arc<dyn BusBridge>>,
    ) -> Self {
        BusCore {
            mailboxes: (0..pool.len())
                .map(|_| Mailbox {
                    queue: MailQueue::default(),
                    bound: Bound::new(capacity),
                })
                .collect(),
            pool,
            topics: ArcSwap::from_pointee(HashMap::new()),
            max_topics,
            telemetry: BusTelemetry {
                messages: std::array::from_fn(|_| StripedCounter::default()),
                delivery: std::array::from_fn(|_| LatencyHistogram::new(latency_histograms)),
                clock: latency_histograms.then(crate::telemetry::latency_clock),
                dropped: std::array::from_fn(|_| StripedCounter::default()),
            },
            default_overflow,
            phase,
            rotation: AtomicUsize::new(0),
            bridge,
        }
    }

    /// True if a sender may send: agents until the drain deadline, outside callers until
    /// shutdown begins.
    #[inline]
    fn open_to(&self, internal: bool) -> bool {
        self.phase.admits(internal)
    }

    /// The topic named `name`, if it exists.
    fn find_topic(&self, name: &str) -> Option<Arc<TopicInner>> {
        self.topics.load().get(name).cloned()
    }

    /// The topic named `name`, created with `overflow` if it does not exist.
    fn topic_or_create(&self, name: &str, overflow: Overflow) -> Result<Arc<TopicInner>, BusError> {
        if let Some(t) = self.find_topic(name) {
            return Ok(t);
        }
        if let Some(reason) = topic_name_error(name) {
            return Err(BusError::InvalidTopic {
                topic: name.chars().take(64).collect(),
                reason,
            });
        }
        let mut created: Option<Result<Arc<TopicInner>, BusError>> = None;
        self.topics.rcu(|registry| {
            created = None;
            if let Some(t) = registry.get(name) {
                created = Some(Ok(t.clone()));
                return Arc::clone(registry);
            }
            if registry.len() >= self.max_topics {
                created = Some(Err(BusError::TooManyTopics {
                    limit: self.max_topics,
                }));
                return Arc::clone(registry);
            }
            let t = Arc::new(TopicInner {
                name: Arc::from(name),
                subscribers: ArcSwap::from_pointee(Vec::new()),
                overflow,
                retired: AtomicBool::new(false),
            });
            created = Some(Ok(t.clone()));
            let mut next = Registry::clone(registry);
            next.insert(t.name.clone(), t);
            Arc::new(next)
        });
        created.unwrap_or(Err(BusError::TooManyTopics {
            limit: self.max_topics,
        }))
    }

    /// Removes `name` if nobody subscribes to it and nothing but the registry and `held`
    /// references of the caller hold it.
    fn retire_if_unused(&self, name: &str, held: usize) {
        let mut removed: Option<Arc<TopicInner>> = None;
        self.topics.rcu(|registry| {
            removed = None;
            match registry.get(name) {
                Some(t) if t.subscribers.load().is_empty() && Arc::strong_count(t) == 1 + held => {
                    removed = Some(t.clone());
                    let mut next = Registry::clone(registry);
                    next.remove(name);
                    Arc::new(next)
                }
                _ => Arc::clone(registry),
            }
        });
        if let Some(t) = removed {
            t.retired.store(true, Ordering::Release);
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
        if let Some(clock) = &self.telemetry.clock {
            self.telemetry.delivery[msg.kind.index()]
                .record(clock.delta_as_nanos(msg.sent_at, clock.raw()));
        }
    }

    /// A send stamp for a message, in the latency clock's raw ticks (0 when latency is not
    /// kept: no clock read at all).
    #[inline]
    fn stamp(&self) -> u64 {
        self.telemetry.clock.as_ref().map_or(0, quanta::Clock::raw)
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
            topics: self.topics.load().len(),
            delivery: LatencyHistogram::merged(&self.telemetry.delivery),
        }
    }
}

pub(crate) struct TopicInner {
    name: Arc<str>,
    subscribers: ArcSwap<Vec<u32>>,
    overflow: Overflow,
    /// Set when the registry dropped it; a handle still holding it resolves the name again.
    retired: AtomicBool,
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

impl Drop for Topic {
    fn drop(&mut self) {
        // The last handle of a topic nobody subscribes to takes it out of the registry.
        if !self.inner.retired.load(Ordering::Acquire) && self.inner.subscribers.load().is_empty() {
            self.bus.core.retire_if_unused(&self.inner.name, 1);
        }
    }
}

impl Topic {
    /// Checks `name` against the topic name rules (1–128 bytes of `A-Z a-z 0-9 _ - . : /`),
    /// for callers that take topic names from users.
    pub fn validate_name(name: &str) -> Result<(), BusError> {
        match topic_name_error(name) {
            None => Ok(()),
            Some(reason) => Err(BusError::InvalidTopic {
                topic: name.chars().take(64).collect(),
                reason,
            }),
        }
    }

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
        let payload = payload.into();
        match self.current() {
            Some(t) => self.bus.publish_inner(&t, payload, t.overflow).await,
            None => {
                self.bus
                    .publish_inner(&self.inner, payload, self.inner.overflow)
                    .await
            }
        }
    }

    /// Publishes without ever waiting: a full mailbox counts as dropped even under `Wait`.
    pub fn try_publish(&self, payload: impl Into<Bytes>) -> Result<PublishReport, BusError> {
        let payload = payload.into();
        match self.current() {
            Some(t) => self.bus.try_publish_inner(&t, payload),
            None => self.bus.try_publish_inner(&self.inner, payload),
        }
    }

    /// The registry's topic of this name if this handle's was retired (and re-created since).
    #[inline]
    fn current(&self) -> Option<Arc<TopicInner>> {
        if self.inner.retired.load(Ordering::Acquire) {
            self.bus.core.find_topic(&self.inner.name)
        } else {
            None
        }
    }
}

/// A handle to the bus. Cheap to clone. From an agent's context it sends as that agent.
#[derive(Clone)]
pub struct Bus {
    core: Arc<BusCore>,
    from: Option<AgentId>,
    /// Held by one of the runtime's own agents (open until the drain deadline).
    internal: bool,
    /// Delivering what a bridge brought from another node: not handed back to the bridge,
    /// and carrying the remote sender's trace context.
    inbound: Option<TraceContext>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus").field("from", &self.from).finish()
    }
}

impl Bus {
    pub(crate) fn new(core: Arc<BusCore>, from: Option<AgentId>, internal: bool) -> Self {
        Bus {
            core,
            from,
            internal,
            inbound: None,
        }
    }

    /// The bus for what a bridge delivers from another node, carrying `trace`.
    pub(crate) fn inbound(core: Arc<BusCore>, trace: TraceContext) -> Self {
        Bus {
            core,
            from: None,
            internal: false,
            inbound: Some(trace),
        }
    }

    /// Hands a publication made here to the bridge, for the other nodes' subscribers.
    #[inline]
    fn bridge_publish(&self, topic: &str, payload: &Bytes) {
        if self.inbound.is_some() {
            return;
        }
        if let Some(b) = &self.core.bridge {
            b.publish(topic, payload.clone(), crate::trace::current());
        }
    }

    /// An agent on another node of the cluster (`node` is its name; this node's own name
    /// reaches the local agent). Needs a bus bridge (a cluster layer); without one every call
    /// fails with [`BusError::NoSuchNode`].
    pub fn remote<'a>(&'a self, node: &'a str) -> Remote<'a> {
        Remote { bus: self, node }
    }

    fn message(&self, kind: MessageKind, topic: Option<Arc<str>>, payload: Bytes) -> Message {
        Message {
            from: self.from,
            topic,
            payload,
            trace: self.inbound.unwrap_or_else(crate::trace::current),
            kind,
            reply: None,
            sent_at: self.core.stamp(),
        }
    }

    fn check_open(&self) -> Result<(), BusError> {
        if self.core.open_to(self.internal) {
            Ok(())
        } else {
            Err(BusError::ShuttingDown)
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
        let (tx, rx) = oneshot::channel();
        let mut msg = self.message(MessageKind::Request, None, payload);
        msg.reply = Some(ReplyTo::One(tx));
        let until = Instant::now() + timeout;
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
    /// nobody subscribes to delivers nothing, creates nothing and is not an error; a name that
    /// cannot be a topic is [`BusError::InvalidTopic`].
    pub async fn publish(
        &self,
        topic: &str,
        payload: impl Into<Bytes>,
    ) -> Result<PublishReport, BusError> {
        let payload = payload.into();
        match self.core.find_topic(topic) {
            Some(t) => {
                let overflow = t.overflow;
                let report = self.publish_inner(&t, payload.clone(), overflow).await?;
                self.bridge_publish(topic, &payload);
                Ok(report)
            }
            None => {
                if let Some(reason) = topic_name_error(topic) {
                    return Err(BusError::InvalidTopic {
                        topic: topic.chars().take(64).collect(),
                        reason,
                    });
                }
                self.check_open()?;
                self.bridge_publish(topic, &payload);
                Ok(PublishReport::default())
            }
        }
    }

    /// Resolves (creating if needed) a topic with the default overflow policy. Keep the
    /// handle for hot loops: publishing through it skips the name lookup.
    pub fn topic(&self, name: &str) -> Result<Topic, BusError> {
        self.topic_with(name, self.core.default_overflow)
    }

    /// Resolves a topic, creating it with `overflow` as its policy if it does not exist yet
    /// (an existing topic keeps the policy it was created with). Refused with
    /// [`BusError::InvalidTopic`] for a bad name and [`BusError::TooManyTopics`] when the
    /// registry is full.
    pub fn topic_with(&self, name: &str, overflow: Overflow) -> Result<Topic, BusError> {
        let inner = self.core.topic_or_create(name, overflow)?;
        Ok(Topic {
            inner,
            bus: self.clone(),
        })
    }

    /// Subscribes `agent` to `topic` (created with the default policy if new). Subscribing
    /// twice is a no-op.
    pub fn subscribe(&self, topic: &str, agent: AgentId) -> Result<(), BusError> {
        self.check_agent(agent)?;
        let t = self
            .core
            .topic_or_create(topic, self.core.default_overflow)?;
        t.subscribers.rcu(|subs| {
            let mut subs = Vec::clone(subs);
            if !subs.contains(&agent.0) {
                subs.push(agent.0);
            }
            subs
        });
        Ok(())
    }

    /// Unsubscribes `agent` from `topic`. Unsubscribing a non-subscriber is a no-op. A topic
    /// left without subscribers, and without handles, is removed.
    pub fn unsubscribe(&self, topic: &str, agent: AgentId) -> Result<(), BusError> {
        self.check_agent(agent)?;
        let Some(t) = self.core.find_topic(topic) else {
            return Ok(());
        };
        t.subscribers.rcu(|subs| {
            subs.iter()
                .copied()
                .filter(|&s| s != agent.0)
                .collect::<Vec<_>>()
        });
        drop(t);
        self.core.retire_if_unused(topic, 0);
        Ok(())
    }

    /// Sends one request to each agent of `to` (at most `n` of them with [`Want::Any`]) and
    /// gathers their replies until every one has answered or `timeout` passes; one [`Reply`]
    /// per agent asked, in the order asked. The sender itself is never asked. A full mailbox
    /// refuses that agent's request at once ([`Reply::Refused`]); the others still go.
    ///
    /// Fails as a whole only when nobody can be asked: the capability or topic has no agents
    /// (other than the sender), a name is invalid, or the bus is closed.
    pub async fn fan_out(
        &self,
        to: Recipients<'_>,
        want: Want,
        payload: impl Into<Bytes>,
        timeout: Duration,
    ) -> Result<FanOut, BusError> {
        use tracing::Instrument;
        // One span for the whole conversation: each request carries its context, so every
        // answering handler's span is its child.
        let span = tracing::debug_span!(
            "troupe.bus.fan_out",
            timeout_ms = timeout.as_millis() as u64,
            asked = tracing::field::Empty,
            replied = tracing::field::Empty
        );
        let out = self
            .fan_out_inner(to, want, payload.into(), timeout)
            .instrument(span.clone())
            .await;
        if let Ok(out) = &out {
            span.record("asked", out.asked());
            span.record("replied", out.replied());
        }
        out
    }

    async fn fan_out_inner(
        &self,
        to: Recipients<'_>,
        want: Want,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<FanOut, BusError> {
        self.check_open()?;
        let deadline = Instant::now() + timeout;
        let me = self.from.map(|a| a.0);
        let mut agents: Vec<u32> = match to {
            Recipients::Capability(c) => self
                .core
                .pool
                .members(c)
                .ok_or_else(|| BusError::NoSuchCapability(c.to_owned()))?
                .iter()
                .copied()
                .filter(|&a| Some(a) != me)
                .collect(),
            Recipients::Topic(name) => {
                if let Some(reason) = topic_name_error(name) {
                    return Err(BusError::InvalidTopic {
                        topic: name.chars().take(64).collect(),
                        reason,
                    });
                }
                self.core
                    .find_topic(name)
                    .map(|t| {
                        t.subscribers
                            .load()
                            .iter()
                            .copied()
                            .filter(|&a| Some(a) != me)
                            .collect()
                    })
                    .unwrap_or_default()
            }
            Recipients::Agents(ids) => ids.iter().map(|a| a.0).filter(|&a| Some(a) != me).collect(),
        };
        if let Want::Any(n) = want {
            if n < agents.len() {
                self.pick_least_loaded(&mut agents, n);
            }
        }
        if agents.is_empty() {
            return Err(match to {
                Recipients::Capability(c) => BusError::NoSuchCapability(c.to_owned()),
                Recipients::Topic(t) => BusError::NoSubscribers(t.to_owned()),
                Recipients::Agents(_) => BusError::NoSuchAgent(AgentId(u32::MAX)),
            });
        }

        // Every slot fills its cell once (answered, or dropped unanswered: a refused request's
        // slot is dropped at once), so the wait ends when all are in or at the deadline.
        let gather = Gather::new(agents.len());
        let mut refused: Vec<(usize, BusError)> = Vec::new();
        for (i, &a) in agents.iter().enumerate() {
            let mut msg = self.message(MessageKind::Request, None, payload.clone());
            msg.reply = Some(ReplyTo::Fan(gather.slot(i as u32)));
            if let Err(e) = self.try_deliver(AgentId(a), msg, Overflow::Reject) {
                refused.push((i, e));
            }
        }
        let timed_out = tokio::time::timeout_at(deadline.into(), gather.all())
            .await
            .is_err();
        let mut replies: Vec<(AgentId, Reply)> = agents
            .iter()
            .enumerate()
            .map(|(i, &a)| {
                let reply = match gather.get(i) {
                    Some(Some(b)) => Reply::Ok(b),
                    Some(None) => Reply::NoReply,
                    None => Reply::Timeout,
                };
                (AgentId(a), reply)
            })
            .collect();
        for (i, e) in refused {
            replies[i].1 = Reply::Refused(e);
        }
        if timed_out {
            let late = replies
                .iter()
                .filter(|(_, r)| matches!(r, Reply::Timeout))
                .count();
            self.core.telemetry.dropped[TIMED_OUT].increment(late as u64);
        }
        Ok(FanOut { replies })
    }

    /// Asks every agent with `capability` (but the sender); see [`Bus::fan_out`].
    pub async fn request_all(
        &self,
        capability: &str,
        payload: impl Into<Bytes>,
        timeout: Duration,
    ) -> Result<FanOut, BusError> {
        self.fan_out(
            Recipients::Capability(capability),
            Want::All,
            payload,
            timeout,
        )
        .await
    }

    /// Asks at most `n` agents with `capability`, the least loaded first; see
    /// [`Bus::fan_out`].
    pub async fn request_any(
        &self,
        capability: &str,
        n: usize,
        payload: impl Into<Bytes>,
        timeout: Duration,
    ) -> Result<FanOut, BusError> {
        self.fan_out(
            Recipients::Capability(capability),
            Want::Any(n),
            payload,
            timeout,
        )
        .await
    }

    /// Keeps the `n` agents of `agents` with the fewest messages waiting, starting the scan at
    /// a rotating offset so equal candidates take turns.
    fn pick_least_loaded(&self, agents: &mut Vec<u32>, n: usize) {
        let start = self.core.rotation.fetch_add(n, Ordering::Relaxed) % agents.len();
        agents.rotate_left(start);
        least_loaded(agents, n, |a: u32| {
            self.core
                .mailboxes
                .get(a as usize)
                .map_or(usize::MAX, |m| m.bound.len())
        });
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

/// Keeps the `n` of `agents` with the lowest `load`, in order. Each agent's load is read
/// once: mailboxes fill and drain while the sort runs, and a key that changes between
/// comparisons is not a total order (the standard sort may panic on one). Stable, so among
/// equally loaded agents the given order decides.
fn least_loaded(agents: &mut Vec<u32>, n: usize, load: impl Fn(u32) -> usize) {
    agents.sort_by_cached_key(|&a| load(a));
    agents.truncate(n);
}

/// An address on another node; see [`Bus::remote`].
#[derive(Clone, Copy)]
pub struct Remote<'a> {
    bus: &'a Bus,
    node: &'a str,
}

impl std::fmt::Debug for Remote<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").field("node", &self.node).finish()
    }
}

impl Remote<'_> {
    fn bridge(&self) -> Result<Option<&Arc<dyn BusBridge>>, BusError> {
        let Some(b) = &self.bus.core.bridge else {
            return Err(BusError::NoSuchNode(self.node.to_owned()));
        };
        // This node's own name is the local agent.
        Ok((b.node() != self.node).then_some(b))
    }

    /// Sends to `agent` on the node, with the receiving mailbox's overflow policy there.
    pub async fn send(
        &self,
        agent: AgentId,
        payload: impl Into<Bytes>,
    ) -> Result<Delivery, BusError> {
        self.bus.check_open()?;
        match self.bridge()? {
            None => self.bus.send(agent, payload).await,
            Some(b) => {
                let r = b
                    .send(self.node, agent, payload.into(), crate::trace::current())
                    .await?;
                Ok(match r {
                    RemoteDelivery::Delivered => Delivery::Delivered,
                    RemoteDelivery::Dropped => Delivery::Dropped,
                })
            }
        }
    }

    /// Asks `agent` on the node and waits up to `timeout` for its reply, as [`Bus::request`].
    pub async fn request(
        &self,
        agent: AgentId,
        payload: impl Into<Bytes>,
        timeout: Duration,
    ) -> Result<Bytes, BusError> {
        use tracing::Instrument;
        self.bus.check_open()?;
        match self.bridge()? {
            None => self.bus.request(agent, payload, timeout).await,
            Some(b) => {
                let span = tracing::debug_span!(
                    "troupe.bus.request",
                    to = agent.0,
                    node = self.node,
                    timeout_ms = timeout.as_millis() as u64
                );
                let fut = async {
                    b.request(
                        self.node,
                        agent,
                        payload.into(),
                        timeout,
                        crate::trace::current(),
                    )
                    .await
                };
                fut.instrument(span).await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::least_loaded;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn the_least_loaded_pick_reads_each_load_once_and_keeps_the_given_order_on_ties() {
        // Under traffic every read of a mailbox may see another length; read per comparison,
        // the sort sees no total order (and the standard sort may panic on that).
        let reads = AtomicUsize::new(0);
        let mut agents: Vec<u32> = (0..200).collect();
        least_loaded(&mut agents, 5, |a| {
            let r = reads.fetch_add(1, Ordering::Relaxed);
            (a as usize * 7919 + r * 104_729) % 13
        });
        assert_eq!(reads.load(Ordering::Relaxed), 200);
        assert_eq!(agents.len(), 5);
        let mut agents: Vec<u32> = (0..50).collect();
        least_loaded(&mut agents, 4, |a| (a % 10) as usize);
        assert_eq!(agents, [0, 10, 20, 30]);
    }
}
