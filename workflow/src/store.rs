//! The durable history: one SQLite file (WAL), written by one thread of its own so no async
//! thread ever blocks on the disk, read through a second connection on the blocking pool.
//!
//! Writes are queued and committed in batches (one transaction per batch); the operations
//! whose durability a caller relies on (an execution's start) carry an acknowledgement sent
//! after their batch committed. With `synchronous = NORMAL` in WAL mode a commit survives the
//! process being killed (kill -9); an operating-system crash may lose the last moments.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::error::WorkflowError;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS executions(
  id INTEGER PRIMARY KEY,
  workflow TEXT NOT NULL,
  definition TEXT NOT NULL,
  input TEXT NOT NULL,
  status TEXT NOT NULL,
  started_ms INTEGER NOT NULL,
  ended_ms INTEGER,
  failed_step TEXT,
  error TEXT
);
CREATE INDEX IF NOT EXISTS executions_by_workflow ON executions(workflow, started_ms);
CREATE INDEX IF NOT EXISTS executions_by_status ON executions(status, started_ms);
CREATE TABLE IF NOT EXISTS steps(
  execution INTEGER NOT NULL,
  name TEXT NOT NULL,
  status TEXT NOT NULL,
  attempts INTEGER NOT NULL,
  target TEXT,
  agent INTEGER,
  queue_us INTEGER,
  exec_us INTEGER,
  started_ms INTEGER,
  ended_ms INTEGER,
  output TEXT,
  output_bytes INTEGER,
  error TEXT,
  PRIMARY KEY(execution, name)
);
CREATE TABLE IF NOT EXISTS events(
  execution INTEGER NOT NULL,
  seq INTEGER NOT NULL,
  at_ms INTEGER NOT NULL,
  elapsed_ms INTEGER NOT NULL,
  kind TEXT NOT NULL,
  step TEXT,
  detail TEXT,
  PRIMARY KEY(execution, seq)
);
";

/// One step's row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    /// The step.
    pub name: String,
    /// `pending`, `running`, `succeeded`, `failed`, `skipped`, `cancelled`.
    pub status: String,
    /// Tasks submitted for it (retries and the fallback included).
    pub attempts: u32,
    /// The kind or capability of the last attempt.
    pub target: Option<String>,
    /// The agent that ran the last attempt.
    pub agent: Option<u32>,
    /// Time the last attempt waited in the pool's queue, µs.
    pub queue_us: Option<u64>,
    /// Time the last attempt's handler ran, µs.
    pub exec_us: Option<u64>,
    /// Unix ms it was first submitted.
    pub started_ms: Option<u64>,
    /// Unix ms it ended.
    pub ended_ms: Option<u64>,
    /// Its output (what dependants receive), when it succeeded.
    pub output: Option<String>,
    /// The output's size in bytes.
    pub output_bytes: Option<u64>,
    /// Why it failed or was skipped.
    pub error: Option<String>,
}

impl StepRecord {
    pub(crate) fn pending(name: &str) -> Self {
        StepRecord {
            name: name.to_owned(),
            status: "pending".into(),
            attempts: 0,
            target: None,
            agent: None,
            queue_us: None,
            exec_us: None,
            started_ms: None,
            ended_ms: None,
            output: None,
            output_bytes: None,
            error: None,
        }
    }
}

/// One execution's row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecutionRecord {
    /// Its id.
    pub id: u64,
    /// The workflow.
    pub workflow: String,
    /// `running`, `succeeded`, `failed`, `cancelled`, `timed_out`.
    pub status: String,
    /// Its input.
    pub input: String,
    /// Unix ms it started.
    pub started_ms: u64,
    /// Unix ms it ended.
    pub ended_ms: Option<u64>,
    /// The step that failed it.
    pub failed_step: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
}

/// One event, as stored and as streamed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// The execution.
    pub execution: u64,
    /// Its place in the execution's events, from 1.
    pub seq: u64,
    /// Unix ms.
    pub at_ms: u64,
    /// Since the execution started (or resumed), ms, on the runtime's clock.
    pub elapsed_ms: u64,
    /// What happened: `started`, `resumed`, `step_queued`, `step_started`, `step_retried`,
    /// `step_fallback`, `step_finished`, `step_skipped`, `warned`, `escalated`, `finished`.
    pub kind: String,
    /// The step, for step events (and a step's `warned` / `escalated`).
    pub step: Option<String>,
    /// The outcome, the reason, the agent.
    pub detail: Option<String>,
}

/// What the list query filters by.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Filter {
    /// Only this workflow.
    pub workflow: Option<String>,
    /// Only this status.
    pub status: Option<String>,
    /// Started at or after (Unix ms).
    pub since_ms: Option<u64>,
    /// Started before (Unix ms).
    pub until_ms: Option<u64>,
    /// At most this many (default 50, at most 1000).
    pub limit: Option<u32>,
    /// Skip this many (newest first).
    pub offset: Option<u32>,
}

/// A page of executions, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Page {
    /// The executions.
    pub executions: Vec<ExecutionRecord>,
    /// The offset of the next page, if there is more.
    pub next_offset: Option<u32>,
}

pub(crate) enum Op {
    Start {
        record: ExecutionRecord,
        definition: String,
        steps: Vec<String>,
        done: oneshot::Sender<Result<(), WorkflowError>>,
    },
    Step(u64, StepRecord),
    Event(Event),
    End(ExecutionRecord),
    Prune {
        max_age: Duration,
        max_count: u64,
        now_ms: u64,
    },
    Flush(oneshot::Sender<()>),
}

/// The history: a writer thread and a reader connection.
#[derive(Clone)]
pub(crate) struct Store {
    tx: mpsc::Sender<Op>,
    reader: Arc<Mutex<Connection>>,
    pub(crate) path: PathBuf,
}

fn open(path: &Path) -> Result<Connection, WorkflowError> {
    let c = Connection::open(path)?;
    c.busy_timeout(Duration::from_secs(5))?;
    c.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")?;
    Ok(c)
}

impl Store {
    /// Opens (creating) the file and starts the writer.
    pub(crate) fn open(path: &Path) -> Result<Store, WorkflowError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| WorkflowError::Store(format!("{}: {e}", dir.display())))?;
        }
        let writer = open(path)?;
        writer.execute_batch(SCHEMA)?;
        let reader = open(path)?;
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("troupe-workflow-history".into())
            .spawn(move || write_loop(writer, rx))
            .map_err(|e| WorkflowError::Store(e.to_string()))?;
        Ok(Store {
            tx,
            reader: Arc::new(Mutex::new(reader)),
            path: path.to_owned(),
        })
    }

    pub(crate) fn send(&self, op: Op) {
        // The writer only stops when every Store is dropped.
        let _ = self.tx.send(op);
    }

    /// Waits until everything sent so far is committed.
    pub(crate) async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        self.send(Op::Flush(tx));
        let _ = rx.await;
    }

    /// Runs `f` on the reader connection, off the async threads.
    pub(crate) async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, WorkflowError> + Send + 'static,
    ) -> Result<T, WorkflowError> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let c = reader.lock().unwrap_or_else(|p| p.into_inner());
            f(&c)
        })
        .await
        .map_err(|e| WorkflowError::Store(e.to_string()))?
    }
}

fn write_loop(mut c: Connection, rx: mpsc::Receiver<Op>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while let Ok(op) = rx.try_recv() {
            batch.push(op);
            if batch.len() >= 1024 {
                break;
            }
        }
        let mut acks = Vec::new();
        let result = (|| -> Result<(), rusqlite::Error> {
            let t = c.transaction()?;
            for op in batch {
                apply(&t, op, &mut acks)?;
            }
            t.commit()
        })();
        let result = result.map_err(WorkflowError::from);
        if let Err(e) = &result {
            tracing::error!(error = %e, "could not write the workflow history");
        }
        for ack in acks {
            match ack {
                Ack::Start(done) => {
                    let _ = done.send(result.clone());
                }
                Ack::Flush(done) => {
                    let _ = done.send(());
                }
            }
        }
    }
}

enum Ack {
    Start(oneshot::Sender<Result<(), WorkflowError>>),
    Flush(oneshot::Sender<()>),
}

// The statements of every execution are prepared once per connection (rusqlite's statement
// cache): parsing SQL was a tenth of the engine's CPU.
fn apply(c: &Connection, op: Op, acks: &mut Vec<Ack>) -> Result<(), rusqlite::Error> {
    match op {
        Op::Start {
            record: r,
            definition,
            steps,
            done,
        } => {
            c.prepare_cached(
                "INSERT OR REPLACE INTO executions(id, workflow, definition, input, status, started_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![r.id, r.workflow, definition, r.input, r.status, r.started_ms])?;
            for s in steps {
                c.prepare_cached(
                    "INSERT OR IGNORE INTO steps(execution, name, status, attempts) VALUES (?1, ?2, 'pending', 0)",
                )?
                .execute(params![r.id, s])?;
            }
            acks.push(Ack::Start(done));
        }
        Op::Step(execution, s) => {
            c.prepare_cached(
                "INSERT OR REPLACE INTO steps(execution, name, status, attempts, target, agent, queue_us,
                   exec_us, started_ms, ended_ms, output, output_bytes, error)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            )?
            .execute(params![
                    execution,
                    s.name,
                    s.status,
                    s.attempts,
                    s.target,
                    s.agent,
                    s.queue_us,
                    s.exec_us,
                    s.started_ms,
                    s.ended_ms,
                    s.output,
                    s.output_bytes,
                    s.error
                ])?;
        }
        Op::Event(e) => {
            c.prepare_cached(
                "INSERT OR REPLACE INTO events(execution, seq, at_ms, elapsed_ms, kind, step, detail)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                    e.execution,
                    e.seq,
                    e.at_ms,
                    e.elapsed_ms,
                    e.kind,
                    e.step,
                    e.detail
                ])?;
        }
        Op::End(r) => {
            c.prepare_cached(
                "UPDATE executions SET status = ?2, ended_ms = ?3, failed_step = ?4, error = ?5 WHERE id = ?1",
            )?
            .execute(params![r.id, r.status, r.ended_ms, r.failed_step, r.error])?;
        }
        Op::Prune {
            max_age,
            max_count,
            now_ms,
        } => {
            let cutoff =
                now_ms.saturating_sub(u64::try_from(max_age.as_millis()).unwrap_or(u64::MAX));
            // Ended executions older than the age bound, then the oldest ended ones past the
            // count bound; running ones are never pruned.
            let doomed = "SELECT id FROM executions WHERE status != 'running' AND
                 (ended_ms < ?1 OR id NOT IN (SELECT id FROM executions ORDER BY id DESC LIMIT ?2))";
            for table in ["steps", "events"] {
                c.execute(
                    &format!("DELETE FROM {table} WHERE execution IN ({doomed})"),
                    params![cutoff, max_count],
                )?;
            }
            c.execute(
                &format!("DELETE FROM executions WHERE id IN ({doomed})"),
                params![cutoff, max_count],
            )?;
        }
        Op::Flush(done) => acks.push(Ack::Flush(done)),
    }
    Ok(())
}

fn execution_of(row: &rusqlite::Row<'_>) -> rusqlite::Result<ExecutionRecord> {
    Ok(ExecutionRecord {
        id: row.get(0)?,
        workflow: row.get(1)?,
        status: row.get(2)?,
        input: row.get(3)?,
        started_ms: row.get(4)?,
        ended_ms: row.get(5)?,
        failed_step: row.get(6)?,
        error: row.get(7)?,
    })
}

const EXECUTION_COLUMNS: &str =
    "id, workflow, status, input, started_ms, ended_ms, failed_step, error";

pub(crate) fn get_execution(
    c: &Connection,
    id: u64,
) -> Result<Option<(ExecutionRecord, String)>, WorkflowError> {
    Ok(c.query_row(
        &format!("SELECT {EXECUTION_COLUMNS}, definition FROM executions WHERE id = ?1"),
        params![id],
        |row| Ok((execution_of(row)?, row.get::<_, String>(8)?)),
    )
    .optional()?)
}

pub(crate) fn get_steps(c: &Connection, id: u64) -> Result<Vec<StepRecord>, WorkflowError> {
    let mut st = c.prepare(
        "SELECT name, status, attempts, target, agent, queue_us, exec_us, started_ms, ended_ms,
                output, output_bytes, error FROM steps WHERE execution = ?1 ORDER BY rowid",
    )?;
    let rows = st.query_map(params![id], |r| {
        Ok(StepRecord {
            name: r.get(0)?,
            status: r.get(1)?,
            attempts: r.get(2)?,
            target: r.get(3)?,
            agent: r.get(4)?,
            queue_us: r.get(5)?,
            exec_us: r.get(6)?,
            started_ms: r.get(7)?,
            ended_ms: r.get(8)?,
            output: r.get(9)?,
            output_bytes: r.get(10)?,
            error: r.get(11)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub(crate) fn get_events(c: &Connection, id: u64) -> Result<Vec<Event>, WorkflowError> {
    let mut st = c.prepare(
        "SELECT execution, seq, at_ms, elapsed_ms, kind, step, detail FROM events
         WHERE execution = ?1 ORDER BY seq",
    )?;
    let rows = st.query_map(params![id], |r| {
        Ok(Event {
            execution: r.get(0)?,
            seq: r.get(1)?,
            at_ms: r.get(2)?,
            elapsed_ms: r.get(3)?,
            kind: r.get(4)?,
            step: r.get(5)?,
            detail: r.get(6)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub(crate) fn running(c: &Connection) -> Result<Vec<u64>, WorkflowError> {
    let mut st = c.prepare("SELECT id FROM executions WHERE status = 'running' ORDER BY id")?;
    let rows = st.query_map([], |r| r.get::<_, u64>(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub(crate) fn max_id(c: &Connection) -> Result<u64, WorkflowError> {
    Ok(
        c.query_row("SELECT COALESCE(MAX(id), 0) FROM executions", [], |r| {
            r.get(0)
        })?,
    )
}

pub(crate) fn max_seq(c: &Connection, id: u64) -> Result<u64, WorkflowError> {
    Ok(c.query_row(
        "SELECT COALESCE(MAX(seq), 0) FROM events WHERE execution = ?1",
        params![id],
        |r| r.get(0),
    )?)
}

pub(crate) fn list(c: &Connection, f: &Filter) -> Result<Page, WorkflowError> {
    let limit = f.limit.unwrap_or(50).clamp(1, 1000);
    let offset = f.offset.unwrap_or(0);
    let mut st = c.prepare(&format!(
        "SELECT {EXECUTION_COLUMNS} FROM executions
         WHERE (?1 IS NULL OR workflow = ?1) AND (?2 IS NULL OR status = ?2)
           AND (?3 IS NULL OR started_ms >= ?3) AND (?4 IS NULL OR started_ms < ?4)
         ORDER BY id DESC LIMIT ?5 OFFSET ?6"
    ))?;
    let rows = st.query_map(
        params![
            f.workflow,
            f.status,
            f.since_ms,
            f.until_ms,
            limit + 1,
            offset
        ],
        execution_of,
    )?;
    let mut executions: Vec<ExecutionRecord> = rows.collect::<Result<_, _>>()?;
    let more = executions.len() > limit as usize;
    executions.truncate(limit as usize);
    Ok(Page {
        executions,
        next_offset: more.then_some(offset + limit),
    })
}
