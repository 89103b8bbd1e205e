//! What travels on NATS, in versioned envelopes.
//!
//! Tasks and bus frames are postcard inside a one-byte version tag: compact, and a node that
//! reads a version it does not know refuses it by name instead of misreading it. Outcome and
//! node records are JSON, because people read them too (`nats kv get`).

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use troupe::{OutcomeKind, Priority, TraceContext};

/// The version tag of every postcard envelope.
pub(crate) const VERSION: u8 = 1;

/// A task as it waits in the stream.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct TaskEnvelope {
    /// The capability (or kind) that runs it.
    pub(crate) target: String,
    pub(crate) priority: Priority,
    pub(crate) payload: Vec<u8>,
    /// Total time it may take, from acceptance, in ms (0: the runtime's default).
    pub(crate) timeout_ms: u64,
    /// Unix time of acceptance, ms: the deadline counts from it on every delivery.
    pub(crate) accepted_at_ms: u64,
    /// Extra attempts after a failure (the task's own retry policy, on the node that runs it).
    pub(crate) retries: u32,
    /// Run in the tri-sandbox.
    pub(crate) sandboxed: bool,
    /// The submitter's trace.
    pub(crate) trace: TraceContext,
    /// The node it was accepted on.
    pub(crate) accepted_by: String,
    /// Someone waits on `accepted_by` for the outcome: tell it when it is recorded.
    pub(crate) notify: bool,
}

/// A bus message between nodes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) enum BusFrame {
    /// A direct send (answered with a [`BusReply`]).
    Send {
        payload: Vec<u8>,
        trace: TraceContext,
    },
    /// A request (answered with a [`BusReply`]).
    Request {
        payload: Vec<u8>,
        timeout_ms: u64,
        trace: TraceContext,
    },
    /// A topic publication (no answer). `origin` skips the publishing node's own copy.
    Publish {
        payload: Vec<u8>,
        trace: TraceContext,
        origin: String,
    },
}

/// The answer to a remote send or request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) enum BusReply {
    Delivered,
    Dropped,
    Reply(Vec<u8>),
    /// The receiving node's `BusError`, as text.
    Failed {
        code: String,
        message: String,
    },
}

/// Encodes `value` in a versioned envelope.
pub(crate) fn encode<T: Serialize>(value: &T) -> Result<Bytes, String> {
    let out = vec![VERSION];
    postcard::to_extend(value, out)
        .map(Bytes::from)
        .map_err(|e| e.to_string())
}

/// Decodes a versioned envelope.
pub(crate) fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, String> {
    match bytes.split_first() {
        Some((&VERSION, body)) => postcard::from_bytes(body).map_err(|e| e.to_string()),
        Some((v, _)) => Err(format!("envelope version {v} (this node reads {VERSION})")),
        None => Err("an empty envelope".into()),
    }
}

/// A task's one recorded outcome, as the outcome bucket keeps it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OutcomeRecord {
    /// The task id (its stream sequence).
    pub id: u64,
    /// Always `done`.
    pub status: String,
    /// The priority.
    pub priority: Priority,
    /// How it ended.
    pub outcome: OutcomeKind,
    /// The output (UTF-8, lossy) for `ok`, the message for `error` / `panic`.
    pub detail: Option<String>,
    /// The node that recorded it.
    pub node: String,
    /// Deliveries it took (more than 1: a node died while running it).
    pub attempts: u64,
    /// Unix time it was recorded, ms (0 in records written before this field existed).
    #[serde(default)]
    pub at_ms: u64,
}

/// A node's heartbeat record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeRecord {
    /// Its name.
    pub node: String,
    /// What its pool serves.
    pub capabilities: Vec<String>,
    /// Agents in its pool.
    pub agents: usize,
    /// Tasks queued per priority, most urgent first.
    pub queue_depths: Vec<usize>,
    /// Tasks without an outcome on it.
    pub outstanding: u64,
    /// Whether its pool is ready.
    pub ready: bool,
    /// Unix time of the heartbeat, ms.
    pub at_ms: u64,
}

/// Unix time now, ms.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_and_refuse_other_versions() {
        let t = TaskEnvelope {
            target: "llm".into(),
            priority: Priority::High,
            payload: b"hello".to_vec(),
            timeout_ms: 500,
            accepted_at_ms: 42,
            retries: 1,
            sandboxed: false,
            trace: TraceContext::default(),
            accepted_by: "a".into(),
            notify: true,
        };
        let bytes = encode(&t).unwrap();
        assert_eq!(decode::<TaskEnvelope>(&bytes).unwrap(), t);
        let mut other = bytes.to_vec();
        other[0] = 9;
        assert!(
            decode::<TaskEnvelope>(&other)
                .unwrap_err()
                .contains("version 9")
        );
    }
}
