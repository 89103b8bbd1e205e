//! What an agent is: the [`Agent`] trait, the factory that builds (and rebuilds) one, and the
//! context handed to its handlers.
//!
//! An agent owns its state. Its handlers take `&mut self` and may hold it across `.await`, so an
//! agent can keep a connection, a cache or a conversation without locks. The runtime runs each
//! agent as its own Tokio task and never runs two handlers of one agent at once; an agent that
//! awaits I/O yields its thread to the others.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;

use crate::bus::{Bus, Message};
use crate::handle::RuntimeHandle;
use crate::ids::AgentId;
use crate::pool::AgentSpec;
use crate::sandbox::model::Lane;
use crate::supervisor::policy::ExitReason;
use crate::task::{TaskError, TaskRequest};

/// An error from an agent's factory or lifecycle hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentError(pub Cow<'static, str>);

impl AgentError {
    /// An error with this message.
    pub fn new(message: impl Into<Cow<'static, str>>) -> Self {
        AgentError(message.into())
    }
}

impl fmt::Display for AgentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for AgentError {}

/// An agent: state plus handlers.
///
/// Only [`handle`](Agent::handle) is required. Every method is `async` and takes `&mut self`, so
/// state may be borrowed across awaits. A panic in any method is caught by the runtime: the task
/// in hand ends with outcome `panic` (or is retried), the instance is dropped, and the supervisor
/// builds a new one from the factory.
///
/// ```
/// use bytes::Bytes;
/// use troupe::{Agent, AgentContext, TaskError, TaskRequest};
///
/// /// Counts the bytes it has seen and answers with the running total.
/// struct Counter { seen: u64 }
///
/// impl Agent for Counter {
///     async fn handle(&mut self, task: TaskRequest, _ctx: &AgentContext) -> Result<Bytes, TaskError> {
///         self.seen += task.payload.len() as u64;
///         Ok(Bytes::from(self.seen.to_string()))
///     }
/// }
/// ```
pub trait Agent: Send + 'static {
    /// Runs one task and returns its output, or an error that becomes outcome `error`.
    fn handle(
        &mut self,
        task: TaskRequest,
        ctx: &AgentContext,
    ) -> impl Future<Output = Result<Bytes, TaskError>> + Send;

    /// Receives a bus message. For a request (see [`Message::is_request`]) the returned bytes
    /// are the reply; returning `None` to a request makes the caller's request fail with
    /// `NoReply`. The default ignores messages.
    fn on_message(
        &mut self,
        msg: Message,
        ctx: &AgentContext,
    ) -> impl Future<Output = Option<Bytes>> + Send {
        let _ = (msg, ctx);
        async { None }
    }

    /// Runs once after the instance is built, before it takes any work.
    fn on_start(
        &mut self,
        ctx: &AgentContext,
    ) -> impl Future<Output = Result<(), AgentError>> + Send {
        let _ = ctx;
        async { Ok(()) }
    }

    /// Runs on a rebuilt instance, after `on_start`, with the reason the previous one ended.
    fn on_restart(
        &mut self,
        ctx: &AgentContext,
        cause: &ExitReason,
    ) -> impl Future<Output = Result<(), AgentError>> + Send {
        let _ = (ctx, cause);
        async { Ok(()) }
    }

    /// Runs when the agent is stopped on purpose (shutdown or a sibling restart).
    fn on_stop(&mut self, ctx: &AgentContext) -> impl Future<Output = ()> + Send {
        let _ = ctx;
        async {}
    }
}

/// Builds agents of one kind. A supervisor calls it again to rebuild an agent after a crash.
///
/// Any `Fn(&AgentSpec) -> A` is a factory; implement the trait directly when building can fail.
pub trait AgentFactory: Send + Sync + 'static {
    /// The agent type built.
    type Agent: Agent;

    /// Builds a fresh instance for the slot described by `spec`.
    fn build(&self, spec: &AgentSpec) -> Result<Self::Agent, AgentError>;
}

impl<F, A> AgentFactory for F
where
    F: Fn(&AgentSpec) -> A + Send + Sync + 'static,
    A: Agent,
{
    type Agent = A;

    fn build(&self, spec: &AgentSpec) -> Result<A, AgentError> {
        Ok(self(spec))
    }
}

/// Handed to every handler: who the agent is, and a bus handle that sends as this agent.
pub struct AgentContext {
    runtime: RuntimeHandle,
    id: AgentId,
    kind: Arc<str>,
    tier: Arc<str>,
    lane: Option<Lane>,
    bus: Bus,
    /// The kind's limiter (pool agents), resolved once per incarnation.
    pub(crate) limiter: Option<Arc<crate::limit::KindLimiter>>,
    /// Set by [`AgentContext::retry_after`] for the task in hand, ns (0: not set).
    retry_after: std::sync::atomic::AtomicU64,
}

impl AgentContext {
    /// The context of pool agent `spec`: its bus sends as it.
    pub(crate) fn for_agent(runtime: RuntimeHandle, spec: &AgentSpec) -> Self {
        let bus = runtime.bus_as(Some(spec.id));
        let limiter = runtime.core().limiter(&spec.kind);
        AgentContext {
            runtime,
            id: spec.id,
            kind: spec.kind.clone(),
            tier: spec.tier.clone(),
            lane: None,
            bus,
            limiter,
            retry_after: Default::default(),
        }
    }

    /// The context of an agent instance running in a sandbox lane. It is not a pool member:
    /// its id is outside the pool and its bus sends anonymously.
    pub(crate) fn for_lane(
        runtime: RuntimeHandle,
        id: AgentId,
        kind: Arc<str>,
        lane: Lane,
    ) -> Self {
        let bus = runtime.bus();
        AgentContext {
            runtime,
            id,
            kind,
            tier: Arc::from("sandbox"),
            lane: Some(lane),
            bus,
            limiter: None,
            retry_after: Default::default(),
        }
    }

    /// This agent's id. Sandbox lane instances have ids outside the pool.
    pub fn id(&self) -> AgentId {
        self.id
    }

    /// This agent's kind.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The error to return when an upstream refused for now and said when to come back (an
    /// API answering "rate limit exceeded, retry after N ms"): every agent of this kind holds
    /// off for `after`, and the task is tried again after it — whatever its retry policy —
    /// unless its deadline comes first, when it ends `timeout`. The pool slows down; the task
    /// does not fail.
    ///
    /// ```ignore
    /// if response.status == 429 {
    ///     return Err(ctx.retry_after(Duration::from_millis(retry_ms), "rate limited"));
    /// }
    /// ```
    ///
    /// On a sandbox lane it is an ordinary error.
    pub fn retry_after(
        &self,
        after: std::time::Duration,
        message: impl Into<Cow<'static, str>>,
    ) -> TaskError {
        let ns = u64::try_from(after.as_nanos()).unwrap_or(u64::MAX).max(1);
        self.retry_after
            .store(ns, std::sync::atomic::Ordering::Release);
        TaskError::new(message)
    }

    /// Takes what [`AgentContext::retry_after`] set for the task in hand.
    pub(crate) fn take_retry_after(&self) -> Option<std::time::Duration> {
        // A plain load first: the common case (nothing set) writes nothing.
        if self.retry_after.load(std::sync::atomic::Ordering::Acquire) == 0 {
            return None;
        }
        match self
            .retry_after
            .swap(0, std::sync::atomic::Ordering::AcqRel)
        {
            0 => None,
            ns => Some(std::time::Duration::from_nanos(ns)),
        }
    }

    /// The tier this agent belongs to (`sandbox` for lane instances).
    pub fn tier(&self) -> &str {
        &self.tier
    }

    /// The sandbox lane this instance runs in, or `None` for a pool agent.
    pub fn lane(&self) -> Option<Lane> {
        self.lane
    }

    /// The bus, sending as this agent (messages carry this agent as `from`).
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// A handle to the runtime, to submit sub-tasks.
    pub fn runtime(&self) -> RuntimeHandle {
        self.runtime.clone()
    }
}

impl fmt::Debug for AgentContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentContext")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("lane", &self.lane)
            .finish_non_exhaustive()
    }
}
