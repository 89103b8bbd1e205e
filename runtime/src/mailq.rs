//! A mailbox's queue: a small preallocated ring in front of an unbounded segment queue.
//!
//! A crossbeam `SegQueue` allocates (and zeroes) a block every 31 messages and frees the old
//! one. Agents that each get one message per round — a fan-out to 928 agents — reach their
//! block boundaries in the same round, so every 31st round paid 928 block allocations (about
//! 4 MB zeroed) and was that workload's p99. Here a mailbox's first 32 waiting messages sit in
//! a fixed `ArrayQueue` that never allocates once it exists (it is allocated by the first
//! message, so an idle agent has none); only a deeper backlog spills into a `SegQueue`.
//!
//! Order: each sender's messages stay in order. A message goes to the ring only while nothing
//! is spilled; once one spills, every later one spills too until the spill is drained, and the
//! consumer takes the ring before the spill. So a sender's later message can never be taken
//! before its earlier one. Messages of different senders racing each other have no order to
//! keep. Lock-free throughout; one consumer (the agent), any number of senders.

use std::sync::atomic::{AtomicUsize, Ordering};

use crossbeam_queue::{ArrayQueue, SegQueue};
use once_cell::race::OnceBox;

/// Messages held without allocating, per mailbox that has ever had mail.
pub(crate) const RING: usize = 32;

/// A multi-sender, single-consumer FIFO: a ring of [`RING`], then an unbounded spill.
pub(crate) struct MailQueue<T> {
    ring: OnceBox<ArrayQueue<T>>,
    spill: SegQueue<T>,
    /// Messages in the spill, or on their way in (counted before the push, so a sender that
    /// sees zero knows no earlier message of anyone's is waiting there).
    spilled: AtomicUsize,
}

impl<T> Default for MailQueue<T> {
    fn default() -> Self {
        MailQueue {
            ring: OnceBox::new(),
            spill: SegQueue::new(),
            spilled: AtomicUsize::new(0),
        }
    }
}

impl<T> MailQueue<T> {
    /// Queues `v` (never fails: bounding is the caller's, see `bound::Bound`).
    #[inline]
    pub(crate) fn push(&self, v: T) {
        let v = if self.spilled.load(Ordering::SeqCst) == 0 {
            let ring = self.ring.get_or_init(|| Box::new(ArrayQueue::new(RING)));
            match ring.push(v) {
                Ok(()) => return,
                Err(v) => v,
            }
        } else {
            v
        };
        self.spilled.fetch_add(1, Ordering::SeqCst);
        self.spill.push(v);
    }

    /// Takes the oldest message. Only the consumer calls this.
    #[inline]
    pub(crate) fn pop(&self) -> Option<T> {
        if let Some(v) = self.ring.get().and_then(ArrayQueue::pop) {
            return Some(v);
        }
        if self.spilled.load(Ordering::SeqCst) == 0 {
            return None;
        }
        // A sender may have counted its message and not pushed it yet: then nothing is taken
        // now, and its push is followed by the wake-up that makes the agent look again.
        let v = self.spill.pop()?;
        self.spilled.fetch_sub(1, Ordering::SeqCst);
        Some(v)
    }

    /// True if nothing is waiting (or on its way into the spill).
    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.ring.get().is_none_or(ArrayQueue::is_empty) && self.spilled.load(Ordering::SeqCst) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn keeps_order_across_the_ring_and_the_spill() {
        let q = MailQueue::default();
        assert!(q.is_empty());
        assert_eq!(q.pop(), None);
        for i in 0..100 {
            q.push(i);
        }
        assert!(!q.is_empty());
        // Half out, more in while the spill is not drained: still in order.
        let mut got: Vec<i32> = (0..50).map(|_| q.pop().unwrap()).collect();
        for i in 100..150 {
            q.push(i);
        }
        while let Some(v) = q.pop() {
            got.push(v);
        }
        assert_eq!(got, (0..150).collect::<Vec<_>>());
        assert!(q.is_empty());
        // Drained: the ring takes mail again.
        q.push(7);
        assert_eq!(q.pop(), Some(7));
    }

    #[test]
    fn each_senders_messages_arrive_in_order_under_contention() {
        const SENDERS: u64 = 4;
        const EACH: u64 = 20_000;
        let q = Arc::new(MailQueue::default());
        let senders: Vec<_> = (0..SENDERS)
            .map(|s| {
                let q = q.clone();
                std::thread::spawn(move || {
                    for i in 0..EACH {
                        q.push((s, i));
                    }
                })
            })
            .collect();
        let mut next = [0u64; SENDERS as usize];
        let mut taken = 0;
        while taken < SENDERS * EACH {
            match q.pop() {
                Some((s, i)) => {
                    assert_eq!(i, next[s as usize], "sender {s} out of order");
                    next[s as usize] += 1;
                    taken += 1;
                }
                None => std::thread::yield_now(),
            }
        }
        for s in senders {
            s.join().unwrap();
        }
        assert!(q.is_empty());
    }
}
