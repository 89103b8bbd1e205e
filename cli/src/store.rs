//! What `GET /v1/tasks/{id}` answers from: a bounded record of submitted tasks.
//!
//! A record keeps a task's status, outcome and output, so the store is bounded twice: by count
//! (`http.task_records`) and by bytes (`http.task_record_bytes`, outputs included). Past either,
//! the oldest records are forgotten first (and answer 404). One output larger than
//! `http.max_record_output_bytes` is not kept at all: its record says it was dropped and why
//! (a `?wait=true` response still carries the output whole). So however large the outputs
//! clients ask for, the store never holds more than its byte bound.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;
use serde::Serialize;
use troupe::{Outcome, OutcomeKind, Priority, TaskId};

/// What a record costs besides its output (the map entry, the strings, the order queue).
const RECORD_OVERHEAD: usize = 160;

/// A task as the API reports it.
#[derive(Debug, Clone, Serialize)]
pub struct TaskRecord {
    /// The id.
    pub id: u64,
    /// `pending` until the outcome is known, then `done`.
    pub status: &'static str,
    /// The priority.
    pub priority: Priority,
    /// The outcome kind, once done.
    pub outcome: Option<OutcomeKind>,
    /// The output (UTF-8, lossy) for `ok`, the message for `error` / `panic`.
    pub detail: Option<String>,
    /// Why `detail` is missing although the task had an output: it was too large to keep.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail_dropped: Option<String>,
}

impl TaskRecord {
    /// A record for a task that has not finished.
    pub fn pending(id: TaskId, priority: Priority) -> Self {
        TaskRecord {
            id: id.0,
            status: "pending",
            priority,
            outcome: None,
            detail: None,
            detail_dropped: None,
        }
    }

    /// The record once `outcome` is known, with the whole output.
    pub fn done(id: TaskId, priority: Priority, outcome: &Outcome) -> Self {
        let detail = match outcome {
            Outcome::Ok(b) => Some(String::from_utf8_lossy(b).into_owned()),
            Outcome::Error(e) => Some(e.to_string()),
            Outcome::Panic(m) => Some(m.clone()),
            Outcome::Timeout | Outcome::Cancelled => None,
        };
        TaskRecord {
            id: id.0,
            status: "done",
            priority,
            outcome: Some(outcome.kind()),
            detail,
            detail_dropped: None,
        }
    }

    /// This record as the store keeps it: an output over `max_output` bytes is dropped, and
    /// the record says so.
    fn capped(mut self, max_output: usize) -> Self {
        if let Some(d) = &self.detail {
            if d.len() > max_output {
                self.detail_dropped = Some(format!(
                    "the output ({} bytes) is larger than the {max_output} bytes a record keeps \
                     (`http.max_record_output_bytes`); it was returned to `?wait=true` only",
                    d.len()
                ));
                self.detail = None;
            }
        }
        self
    }

    fn size(&self) -> usize {
        RECORD_OVERHEAD
            + self.detail.as_ref().map_or(0, String::len)
            + self.detail_dropped.as_ref().map_or(0, String::len)
    }
}

/// Bounded id → record map.
pub struct TaskStore {
    records: DashMap<u64, TaskRecord>,
    order: Mutex<VecDeque<u64>>,
    bytes: AtomicUsize,
    max_records: usize,
    max_bytes: usize,
    max_output: usize,
}

impl TaskStore {
    /// A store of at most `max_records` records and `max_bytes` bytes, keeping outputs of at
    /// most `max_output` bytes.
    pub fn new(max_records: usize, max_bytes: usize, max_output: usize) -> Self {
        TaskStore {
            records: DashMap::new(),
            order: Mutex::new(VecDeque::new()),
            bytes: AtomicUsize::new(0),
            max_records: max_records.max(1),
            max_bytes: max_bytes.max(RECORD_OVERHEAD),
            max_output,
        }
    }

    /// Adds a new task, forgetting the oldest beyond the bounds.
    pub fn insert(&self, record: TaskRecord) {
        let record = record.capped(self.max_output);
        let id = record.id;
        self.bytes.fetch_add(record.size(), Ordering::AcqRel);
        if let Some(old) = self.records.insert(id, record) {
            self.bytes.fetch_sub(old.size(), Ordering::AcqRel);
        }
        self.order
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(id);
        self.evict();
    }

    /// Replaces a record if it is still remembered.
    pub fn update(&self, record: TaskRecord) {
        let record = record.capped(self.max_output);
        if let Some(mut r) = self.records.get_mut(&record.id) {
            self.bytes.fetch_add(record.size(), Ordering::AcqRel);
            self.bytes.fetch_sub(r.size(), Ordering::AcqRel);
            *r = record;
        }
        self.evict();
    }

    /// Forgets the oldest records until both bounds hold.
    fn evict(&self) {
        let mut order = self.order.lock().unwrap_or_else(|p| p.into_inner());
        while order.len() > self.max_records || self.bytes.load(Ordering::Acquire) > self.max_bytes
        {
            let Some(old) = order.pop_front() else { break };
            if let Some((_, r)) = self.records.remove(&old) {
                self.bytes.fetch_sub(r.size(), Ordering::AcqRel);
            }
        }
    }

    /// The record of `id`.
    pub fn get(&self, id: u64) -> Option<TaskRecord> {
        self.records.get(&id).map(|r| r.clone())
    }

    /// Records remembered.
    pub fn count(&self) -> usize {
        self.records.len()
    }

    /// Records not final yet (`pending`).
    pub fn pending(&self) -> usize {
        self.records
            .iter()
            .filter(|r| r.status == "pending")
            .count()
    }

    /// Bytes the records hold now.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_stays_under_its_byte_bound_and_says_when_it_dropped_an_output() {
        let store = TaskStore::new(1_000_000, 1 << 20, 64 << 10);
        for i in 0..100u64 {
            store.insert(TaskRecord::pending(TaskId(i), Priority::Normal));
            let out = Outcome::Ok(troupe::Bytes::from(vec![b'x'; 60 << 10]));
            store.update(TaskRecord::done(TaskId(i), Priority::Normal, &out));
            assert!(store.bytes() <= 1 << 20, "{}", store.bytes());
        }
        // The oldest went first; the newest are kept whole.
        assert!(store.get(0).is_none());
        assert_eq!(
            store.get(99).unwrap().detail.as_ref().map(String::len),
            Some(60 << 10)
        );
        // An output over the per-record cap is dropped, and the record says why.
        store.insert(TaskRecord::pending(TaskId(100), Priority::Normal));
        let big = Outcome::Ok(troupe::Bytes::from(vec![b'y'; 100 << 10]));
        store.update(TaskRecord::done(TaskId(100), Priority::Normal, &big));
        let r = store.get(100).unwrap();
        assert!(r.detail.is_none());
        assert!(r.detail_dropped.unwrap().contains("102400 bytes"));
        assert_eq!(r.outcome, Some(OutcomeKind::Ok));
    }
}
