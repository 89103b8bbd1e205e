//! The bus across processes: the extension point a cluster layer implements so agents on
//! different nodes can talk.
//!
//! A [`BusBridge`] registered with [`RuntimeBuilder::bus_bridge`](crate::RuntimeBuilder::bus_bridge)
//! is handed every topic publication made on this node (to deliver to the topic's subscribers
//! on the other nodes), and carries [`Bus::remote`](crate::Bus::remote) sends and requests to
//! an agent on another node. What arrives from other nodes is delivered through
//! [`RuntimeHandle::bridged_bus`](crate::RuntimeHandle::bridged_bus): an ordinary bus handle
//! (the receiving mailbox's bound and overflow policy apply) whose publications are not handed
//! back to the bridge, and whose messages carry the sender's trace context.
//!
//! Without a bridge none of this costs anything but a branch on publication.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;

use crate::error::BusError;
use crate::ids::AgentId;
use crate::trace::TraceContext;

/// A future the bridge returns.
pub type BridgeFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What a send to an agent on another node did there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoteDelivery {
    /// It is in the agent's mailbox.
    Delivered,
    /// The mailbox was full and the receiving node's policy dropped it.
    Dropped,
}

/// Carries bus traffic to the other nodes of a cluster. See the module docs.
pub trait BusBridge: Send + Sync + 'static {
    /// This node's name: a remote address naming it is delivered locally.
    fn node(&self) -> &str;

    /// A publication made on this node: deliver it to `topic`'s subscribers on the others.
    fn publish(&self, topic: &str, payload: Bytes, trace: TraceContext);

    /// Sends to `agent` on `node`, with the receiving node's overflow policy.
    fn send(
        &self,
        node: &str,
        agent: AgentId,
        payload: Bytes,
        trace: TraceContext,
    ) -> BridgeFuture<Result<RemoteDelivery, BusError>>;

    /// Asks `agent` on `node` and waits up to `timeout` for the reply.
    fn request(
        &self,
        node: &str,
        agent: AgentId,
        payload: Bytes,
        timeout: Duration,
        trace: TraceContext,
    ) -> BridgeFuture<Result<Bytes, BusError>>;
}
