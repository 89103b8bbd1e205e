//! Trace context across the bus.
//!
//! Task handlers run inside a `troupe.task` span and bus requests inside `troupe.bus.request`;
//! message handlers run inside `troupe.bus.message`. With the `otel` feature, a message carries
//! the sender's OpenTelemetry span context ([`TraceContext`]) and the receiver's span takes it as
//! its parent, so one trace follows a conversation from agent to agent. Without the feature the
//! context is left empty and spans are plain `tracing` spans.

use serde::{Deserialize, Serialize};

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

impl TraceContext {
    /// The current span's context: what a layer carrying work to another process (the
    /// cluster) puts on the wire so the far side's spans join the same trace.
    pub fn current() -> Self {
        current()
    }
}

/// The current span's trace context (empty without the `otel` feature or outside a trace).
#[inline]
pub(crate) fn current() -> TraceContext {
    #[cfg(feature = "otel")]
    {
        use opentelemetry::trace::TraceContextExt;
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        let span = tracing::Span::current();
        if span.is_disabled() {
            return TraceContext::default();
        }
        let cx = span.context();
        let sc = cx.span().span_context().clone();
        if !sc.is_valid() {
            return TraceContext::default();
        }
        TraceContext {
            trace_id: u128::from_be_bytes(sc.trace_id().to_bytes()),
            span_id: u64::from_be_bytes(sc.span_id().to_bytes()),
            flags: sc.trace_flags().to_u8(),
        }
    }
    #[cfg(not(feature = "otel"))]
    TraceContext::default()
}

/// Makes `span` a child of the sender's span described by `trace`.
#[inline]
pub(crate) fn adopt(span: &tracing::Span, trace: &TraceContext) {
    #[cfg(feature = "otel")]
    {
        use opentelemetry::trace::{
            SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
        };
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        if trace.trace_id == 0 || span.is_disabled() {
            return;
        }
        let sc = SpanContext::new(
            TraceId::from_bytes(trace.trace_id.to_be_bytes()),
            SpanId::from_bytes(trace.span_id.to_be_bytes()),
            TraceFlags::new(trace.flags),
            true,
            TraceState::default(),
        );
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(sc));
    }
    #[cfg(not(feature = "otel"))]
    let _ = (span, trace);
}
