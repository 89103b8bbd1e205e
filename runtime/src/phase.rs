//! The runtime's lifecycle phase, read by every part that must behave differently once shutdown
//! begins: admission and the bus refuse callers outside the pool while the drain runs, and
//! everyone once it ends; agents cancel the work in hand.
//!
//! One atomic, written only by the runtime's shutdown, so reading it costs a load.

use std::sync::atomic::{AtomicU8, Ordering};

use crossbeam_utils::CachePadded;

/// Where the runtime is in its life. The order matters: each phase includes the ones before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub(crate) enum Stage {
    /// Taking work.
    Running = 0,
    /// Shutdown began: no new work is admitted; queued work drains.
    Draining = 1,
    /// The drain deadline passed: what is left is cancelled.
    Cancelling = 2,
    /// Shutdown finished.
    Stopped = 3,
}

/// The shared phase flag. Padded to its own cache line: every send and submission reads it, and
/// as a small allocation of its own it would otherwise share a line with whatever is allocated
/// next to it.
#[derive(Debug, Default)]
pub(crate) struct Phase(CachePadded<AtomicU8>);

impl Phase {
    /// Moves to `stage` (shutdown only moves forward).
    pub(crate) fn enter(&self, stage: Stage) {
        self.0.store(stage as u8, Ordering::SeqCst);
    }

    /// True once shutdown has begun (closed to callers outside the pool).
    #[inline]
    pub(crate) fn is_closed(&self) -> bool {
        self.0.load(Ordering::SeqCst) != Stage::Running as u8
    }

    /// True if work from this side may still come in: callers outside the pool until the
    /// drain begins, agents (`internal`) until it ends.
    #[inline]
    pub(crate) fn admits(&self, internal: bool) -> bool {
        let stage = self.0.load(Ordering::SeqCst);
        stage == Stage::Running as u8 || (internal && stage == Stage::Draining as u8)
    }

    /// True once shutdown has given up draining and cancels what is left.
    #[inline]
    pub(crate) fn is_cancelling(&self) -> bool {
        self.0.load(Ordering::Acquire) >= Stage::Cancelling as u8
    }

    /// True once shutdown has finished.
    #[inline]
    pub(crate) fn is_stopped(&self) -> bool {
        self.0.load(Ordering::Acquire) == Stage::Stopped as u8
    }
}
