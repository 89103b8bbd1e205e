//! The bus across the cluster, on core NATS (not JetStream: bus messages are not durable).
//!
//! * A direct send or request to `(node, agent)` is a NATS request to
//!   `<cluster>.bus.agent.<node>.<agent>`; that node delivers it to the agent's mailbox (its
//!   bound and overflow policy apply there) and answers with what happened, or the agent's
//!   reply. A request carries its timeout, so both sides give up at the same time.
//! * A publication is sent once to `<cluster>.bus.topic.<topic>`; every other node delivers it
//!   to its own subscribers of the topic.
//! * Every frame carries the sender's trace context, which the receiving handler's span takes
//!   as its parent: one trace shows a cross-node conversation.
//!
//! Publications are handed to NATS through a bounded queue, so a publishing agent never waits
//! on the network; when NATS is away or the queue is full they are dropped and counted.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use troupe::{AgentId, BridgeFuture, BusBridge, BusError, Delivery, RemoteDelivery, TraceContext};

use crate::error::ClusterError;
use crate::node::Cluster;
use crate::wire::{self, BusFrame, BusReply};

/// Publications waiting to go to NATS.
const PUBLISH_QUEUE: usize = 65_536;

/// A send's answer takes at most this long (it only waits for a mailbox, never a handler).
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// The [`BusBridge`] of one node: give it to the runtime builder.
pub struct NatsBridge {
    cluster: Arc<Cluster>,
    publications: mpsc::Sender<(String, Bytes)>,
}

impl std::fmt::Debug for NatsBridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsBridge")
            .field("node", &self.cluster.node())
            .finish()
    }
}

impl Cluster {
    /// The bus bridge for this node's runtime (register it with
    /// [`troupe::RuntimeBuilder::bus_bridge`] before the runtime starts).
    pub fn bridge(self: &Arc<Self>) -> NatsBridge {
        let (tx, mut rx) = mpsc::channel::<(String, Bytes)>(PUBLISH_QUEUE);
        let client = self.client().clone();
        tokio::spawn(async move {
            while let Some((subject, body)) = rx.recv().await {
                let _ = client.publish(subject, body).await;
            }
        });
        NatsBridge {
            cluster: self.clone(),
            publications: tx,
        }
    }
}

fn agent_of(subject: &str) -> Option<u32> {
    subject.rsplit('.').next()?.parse().ok()
}

fn failed(e: &BusError) -> BusReply {
    let code = match e {
        BusError::NoSuchAgent(_) => "no_such_agent",
        BusError::MailboxFull { .. } => "mailbox_full",
        BusError::Timeout { .. } => "timeout",
        BusError::NoReply(_) => "no_reply",
        BusError::ShuttingDown => "shutting_down",
        _ => "failed",
    };
    BusReply::Failed {
        code: code.into(),
        message: e.to_string(),
    }
}

fn error_of(code: &str, message: String, agent: AgentId, timeout: Duration) -> BusError {
    match code {
        "no_such_agent" => BusError::NoSuchAgent(agent),
        "mailbox_full" => BusError::MailboxFull {
            agent,
            depth: 0,
            capacity: 0,
        },
        "timeout" => BusError::Timeout { agent, timeout },
        "no_reply" => BusError::NoReply(agent),
        "shutting_down" => BusError::ShuttingDown,
        _ => BusError::BridgeDown(message),
    }
}

impl NatsBridge {
    async fn ask(
        cluster: Arc<Cluster>,
        node: String,
        agent: AgentId,
        frame: BusFrame,
        timeout: Duration,
    ) -> Result<BusReply, BusError> {
        if !cluster.connected() {
            return Err(BusError::BridgeDown("NATS is unreachable".into()));
        }
        let body = wire::encode(&frame).map_err(BusError::BridgeDown)?;
        let subject = cluster.names().agent(&node, agent.0);
        let request = async_nats::Request::new()
            .payload(body)
            .timeout(Some(timeout));
        match cluster.client().send_request(subject, request).await {
            Ok(msg) => wire::decode(&msg.payload).map_err(BusError::BridgeDown),
            Err(e) => Err(match e.kind() {
                async_nats::client::RequestErrorKind::NoResponders => BusError::NoSuchNode(node),
                async_nats::client::RequestErrorKind::TimedOut => {
                    BusError::Timeout { agent, timeout }
                }
                _ => BusError::BridgeDown(e.to_string()),
            }),
        }
    }
}

impl BusBridge for NatsBridge {
    fn node(&self) -> &str {
        self.cluster.node()
    }

    fn publish(&self, topic: &str, payload: Bytes, trace: TraceContext) {
        let frame = BusFrame::Publish {
            payload: payload.to_vec(),
            trace,
            origin: self.cluster.node().to_owned(),
        };
        let Ok(body) = wire::encode(&frame) else {
            return;
        };
        if self
            .publications
            .try_send((self.cluster.names().topic(topic), body))
            .is_ok()
        {
            if let Some(m) = self.cluster.metrics() {
                m.bus(true, 1);
            }
        }
    }

    fn send(
        &self,
        node: &str,
        agent: AgentId,
        payload: Bytes,
        trace: TraceContext,
    ) -> BridgeFuture<Result<RemoteDelivery, BusError>> {
        let (cluster, node) = (self.cluster.clone(), node.to_owned());
        Box::pin(async move {
            if let Some(m) = cluster.metrics() {
                m.bus(true, 0);
            }
            let frame = BusFrame::Send {
                payload: payload.to_vec(),
                trace,
            };
            match NatsBridge::ask(cluster, node, agent, frame, SEND_TIMEOUT).await? {
                BusReply::Delivered => Ok(RemoteDelivery::Delivered),
                BusReply::Dropped => Ok(RemoteDelivery::Dropped),
                BusReply::Failed { code, message } => {
                    Err(error_of(&code, message, agent, SEND_TIMEOUT))
                }
                BusReply::Reply(_) => Ok(RemoteDelivery::Delivered),
            }
        })
    }

    fn request(
        &self,
        node: &str,
        agent: AgentId,
        payload: Bytes,
        timeout: Duration,
        trace: TraceContext,
    ) -> BridgeFuture<Result<Bytes, BusError>> {
        let (cluster, node) = (self.cluster.clone(), node.to_owned());
        Box::pin(async move {
            if let Some(m) = cluster.metrics() {
                m.bus(true, 2);
            }
            let frame = BusFrame::Request {
                payload: payload.to_vec(),
                timeout_ms: timeout.as_millis() as u64,
                trace,
            };
            // A little more than the agent has, so its own timeout answers first.
            let wire_timeout = timeout + Duration::from_millis(200);
            match NatsBridge::ask(cluster, node, agent, frame, wire_timeout).await {
                Ok(BusReply::Reply(b)) => Ok(Bytes::from(b)),
                Ok(BusReply::Failed { code, message }) => {
                    Err(error_of(&code, message, agent, timeout))
                }
                Ok(_) => Err(BusError::NoReply(agent)),
                Err(BusError::Timeout { .. }) => Err(BusError::Timeout { agent, timeout }),
                Err(e) => Err(e),
            }
        })
    }
}

/// Starts delivering what other nodes send to this node's agents and topics.
pub(crate) async fn listen(
    cluster: Arc<Cluster>,
) -> Result<Vec<tokio::task::JoinHandle<()>>, ClusterError> {
    let mut agents = cluster
        .client()
        .subscribe(cluster.names().agents_of(cluster.node()))
        .await
        .map_err(|e| ClusterError::Unreachable(e.to_string()))?;
    let mut topics = cluster
        .client()
        .subscribe(cluster.names().topics())
        .await
        .map_err(|e| ClusterError::Unreachable(e.to_string()))?;
    let c = cluster.clone();
    let direct = tokio::spawn(async move {
        while let Some(msg) = agents.next().await {
            let (Some(agent), Some(reply)) = (agent_of(&msg.subject), msg.reply.clone()) else {
                continue;
            };
            let c = c.clone();
            // Requests wait for handlers: each in its own task.
            tokio::spawn(async move {
                let answer = deliver(&c, AgentId(agent), &msg.payload).await;
                if let Ok(body) = wire::encode(&answer) {
                    let _ = c.client().publish(reply, body).await;
                }
            });
        }
    });
    let c = cluster.clone();
    let published = tokio::spawn(async move {
        while let Some(msg) = topics.next().await {
            let Some(topic) = c.names().topic_of(&msg.subject) else {
                continue;
            };
            let Ok(BusFrame::Publish {
                payload,
                trace,
                origin,
            }) = wire::decode::<BusFrame>(&msg.payload)
            else {
                continue;
            };
            if origin == c.node() {
                continue;
            }
            let Some(rt) = c.runtime() else { continue };
            if let Some(m) = c.metrics() {
                m.bus(false, 1);
            }
            let _ = rt.bridged_bus(trace).publish(&topic, payload).await;
        }
    });
    Ok(vec![direct, published])
}

/// Delivers one direct send or request to a local agent.
async fn deliver(c: &Cluster, agent: AgentId, body: &[u8]) -> BusReply {
    let Some(rt) = c.runtime() else {
        return BusReply::Failed {
            code: "shutting_down".into(),
            message: "the node is not running".into(),
        };
    };
    match wire::decode::<BusFrame>(body) {
        Ok(BusFrame::Send { payload, trace }) => {
            if let Some(m) = c.metrics() {
                m.bus(false, 0);
            }
            match rt.bridged_bus(trace).send(agent, payload).await {
                Ok(Delivery::Delivered) => BusReply::Delivered,
                Ok(Delivery::Dropped) => BusReply::Dropped,
                Err(e) => failed(&e),
            }
        }
        Ok(BusFrame::Request {
            payload,
            timeout_ms,
            trace,
        }) => {
            if let Some(m) = c.metrics() {
                m.bus(false, 2);
            }
            let timeout = Duration::from_millis(timeout_ms);
            match rt.bridged_bus(trace).request(agent, payload, timeout).await {
                Ok(reply) => BusReply::Reply(reply.to_vec()),
                Err(e) => failed(&e),
            }
        }
        Ok(BusFrame::Publish { .. }) => BusReply::Failed {
            code: "failed".into(),
            message: "a publication sent as a request".into(),
        },
        Err(why) => BusReply::Failed {
            code: "failed".into(),
            message: format!("unreadable bus frame: {why}"),
        },
    }
}
