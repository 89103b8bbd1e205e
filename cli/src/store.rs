//! What `GET /v1/tasks/{id}` answers from: a bounded record of submitted tasks.
//!
//! Records are kept for the most recent `capacity` tasks; older ones are forgotten (and answer
//! 404), so the record never grows with the number of tasks served.

use std::collections::VecDeque;
use std::sync::Mutex;

use dashmap::DashMap;
use serde::Serialize;
use troupe::{Outcome, OutcomeKind, Priority, TaskId};

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
        }
    }

    /// The record once `outcome` is known.
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
        }
    }
}

/// Bounded id → record map.
pub struct TaskStore {
    records: DashMap<u64, TaskRecord>,
    order: Mutex<VecDeque<u64>>,
    capacity: usize,
}

impl TaskStore {
    /// A store remembering at most `capacity` tasks.
    pub fn new(capacity: usize) -> Self {
        TaskStore {
            records: DashMap::new(),
            order: Mutex::new(VecDeque::new()),
            capacity: capacity.max(1),
        }
    }

    /// Adds a new task, forgetting the oldest beyond capacity.
    pub fn insert(&self, record: TaskRecord) {
        let id = record.id;
        self.records.insert(id, record);
        let mut order = self.order.lock().unwrap_or_else(|p| p.into_inner());
        order.push_back(id);
        while order.len() > self.capacity {
            if let Some(old) = order.pop_front() {
                self.records.remove(&old);
            }
        }
    }

    /// Replaces a record if it is still remembered.
    pub fn update(&self, record: TaskRecord) {
        if let Some(mut r) = self.records.get_mut(&record.id) {
            *r = record;
        }
    }

    /// The record of `id`.
    pub fn get(&self, id: u64) -> Option<TaskRecord> {
        self.records.get(&id).map(|r| r.clone())
    }
}
