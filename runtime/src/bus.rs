//! The message bus between agents: direct sends, topics, and request/reply.
//!
//! Every agent has a bounded mailbox. What happens when it is full is the sender's choice, per
//! send or per topic ([`Overflow`]): refuse with [`BusError::MailboxFull`], drop the new message
//! and count it, or wait for room up to a timeout. Nothing on the send path takes a lock: a
//! mailbox is a lock-free queue behind a [`Bound`](crate::bound::Bound), and a topic's
//! subscriber list is an immutable snapshot swapped atomically when someone (un)subscribes.
//!
//! Messages carry a [`TraceContext`], so a trace can follow a conversation from agent to agent.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::agent::AgentId;
use crate::error::BusError;
use crate::runtime::Shared;

/// What a send does when the recipient's mailbox is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "policy")]
pub enum Overflow {
    /// Fail the send with [`BusError::MailboxFull`].
    #[default]
    Reject,
    /// Drop the new message and count it in `troupe_bus_messages_dropped_total`.
    DropNewest,
    /// Wait for room, up to `timeout`; then fail like `Reject`.
    Wait {
        /// Longest wait for room.
        #[serde(with = "humantime_serde")]
        timeout: Duration,
    },
}

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
}

/// W3C trace context carried by a message (all zero when tracing is off).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceContext {
    /// The trace id; 0 means "no trace".
    pub trace_id: u128,
    /// The span that sent the message.
    pub span_id: u64,
    /// W3C trace flags (bit 0: sampled).
    pub flags: u8,
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
    pub(crate) kind: MessageKind,
    pub(crate) reply: Option<oneshot::Sender<Bytes>>,
    pub(crate) sent_at: Instant,
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
    shared: Arc<Shared>,
    from: Option<AgentId>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus").field("from", &self.from).finish()
    }
}

impl Bus {
    pub(crate) fn new(shared: Arc<Shared>, from: Option<AgentId>) -> Self {
        Bus { shared, from }
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
        if self.shared.is_closed() {
            Err(BusError::ShuttingDown)
        } else {
            Ok(())
        }
    }

    /// Sends to `to` with the runtime's default overflow policy (`mailbox.overflow`).
    pub async fn send(&self, to: AgentId, payload: impl Into<Bytes>) -> Result<Delivery, BusError> {
        let policy = self.shared.config.mailbox.overflow;
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
        let policy = match self.shared.config.mailbox.overflow {
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
                self.shared.telemetry.bus_dropped_timeout.increment(1);
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
        self.topic_with(name, self.shared.config.mailbox.overflow)
    }

    /// Resolves a topic, creating it with `overflow` as its policy if it does not exist yet
    /// (an existing topic keeps the policy it was created with).
    pub fn topic_with(&self, name: &str, overflow: Overflow) -> Topic {
        let inner = if let Some(t) = self.shared.topics.get(name) {
            t.clone()
        } else {
            self.shared
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
        self.shared
            .slot(agent)
            .ok_or(BusError::NoSuchAgent(agent))?;
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
        self.shared
            .slot(agent)
            .ok_or(BusError::NoSuchAgent(agent))?;
        if let Some(t) = self.shared.topics.get(topic) {
            t.subscribers.rcu(|subs| {
                subs.iter()
                    .copied()
                    .filter(|&s| s != agent.0)
                    .collect::<Vec<_>>()
            });
        }
        Ok(())
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
        let t = &self.shared.telemetry;
        for &s in subs.iter() {
            let Some(slot) = self.shared.agents.get(s as usize) else {
                continue;
            };
            if slot.mailbox.bound.try_reserve().is_err() {
                t.bus_dropped_mailbox_full.increment(1);
                report.dropped += 1;
                continue;
            }
            slot.mailbox.queue.push(self.message(
                MessageKind::Publish,
                Some(topic.name.clone()),
                payload.clone(),
            ));
            slot.signal.notify();
            report.delivered += 1;
        }
        t.bus_messages[MessageKind::Publish.index()].increment(report.delivered as u64);
        Ok(report)
    }

    /// The recipient's slot, counting a send to nobody.
    fn recipient(&self, to: AgentId) -> Result<&crate::slot::AgentSlot, BusError> {
        self.shared.slot(to).ok_or_else(|| {
            self.shared.telemetry.bus_dropped_no_such_agent.increment(1);
            BusError::NoSuchAgent(to)
        })
    }

    /// Puts a message into a mailbox slot already reserved, and wakes the agent.
    #[inline]
    fn push(&self, slot: &crate::slot::AgentSlot, msg: Message) -> Delivery {
        self.shared.telemetry.bus_messages[msg.kind.index()].increment(1);
        slot.mailbox.queue.push(msg);
        slot.signal.notify();
        Delivery::Delivered
    }

    /// Counts a full mailbox and describes it.
    fn full(&self, to: AgentId, slot: &crate::slot::AgentSlot, depth: usize) -> BusError {
        self.shared.telemetry.bus_dropped_mailbox_full.increment(1);
        BusError::MailboxFull {
            agent: to,
            depth,
            capacity: slot.mailbox.bound.capacity(),
        }
    }

    #[inline]
    fn try_deliver(
        &self,
        to: AgentId,
        msg: Message,
        overflow: Overflow,
    ) -> Result<Delivery, BusError> {
        let slot = self.recipient(to)?;
        match slot.mailbox.bound.try_reserve() {
            Ok(()) => Ok(self.push(slot, msg)),
            Err(depth) => {
                let error = self.full(to, slot, depth);
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
        let slot = self.recipient(to)?;
        match slot
            .mailbox
            .bound
            .reserve_until(Instant::now() + timeout)
            .await
        {
            Ok(()) => Ok(self.push(slot, msg)),
            Err(depth) => Err(self.full(to, slot, depth)),
        }
    }
}
