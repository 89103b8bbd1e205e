//! Agents and helpers shared by the integration tests.
#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use troupe::{
    Agent, AgentContext, AgentSpec, ExitReason, Message, Runtime, RuntimeConfig, TaskError,
    TaskRequest,
};

/// A test agent whose behaviour is chosen by the payload:
/// `ok` / anything else → echo; `error` → error; `panic` → panic; `hang` → sleeps an hour;
/// `sleep:N` → sleeps N ms then echoes; `who` → answers with its own id.
pub struct Scripted {
    pub id: u32,
    pub events: Events,
}

/// A shared log of lifecycle events, e.g. `start:3`, `stop:3`, `restart:3:panicked: boom`.
#[derive(Clone, Default)]
pub struct Events(pub Arc<Mutex<Vec<String>>>);

impl Events {
    pub fn push(&self, e: String) {
        self.0.lock().unwrap().push(e);
    }
    pub fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
    pub fn count(&self, prefix: &str) -> usize {
        self.all().iter().filter(|e| e.starts_with(prefix)).count()
    }
}

impl Agent for Scripted {
    async fn handle(&mut self, task: TaskRequest, ctx: &AgentContext) -> Result<Bytes, TaskError> {
        let p = task.payload.clone();
        match &p[..] {
            b"error" => Err(TaskError::new("scripted error")),
            b"panic" => panic!("scripted panic"),
            b"hang" => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(p)
            }
            b"who" => Ok(Bytes::from(ctx.id().to_string())),
            // The submitter's key, failing the first attempt (so a retry shows it kept).
            b"key" if task.attempt == 1 => Err(TaskError::new("first attempt fails")),
            b"key" => Ok(Bytes::from(format!("{:?}", task.key))),
            other if other.starts_with(b"sleep:") => {
                let ms: u64 = std::str::from_utf8(&other[6..]).unwrap().parse().unwrap();
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok(p)
            }
            _ => Ok(p),
        }
    }

    async fn on_message(&mut self, msg: Message, ctx: &AgentContext) -> Option<Bytes> {
        self.events.push(format!(
            "msg:{}:{}",
            ctx.id(),
            String::from_utf8_lossy(&msg.payload)
        ));
        if &msg.payload[..] == b"panic" {
            panic!("message panic");
        }
        if &msg.payload[..] == b"slow" {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        msg.is_request().then(|| {
            let mut reply = b"re:".to_vec();
            reply.extend_from_slice(&msg.payload);
            Bytes::from(reply)
        })
    }

    async fn on_start(&mut self, _ctx: &AgentContext) -> Result<(), troupe::AgentError> {
        self.events.push(format!("start:{}", self.id));
        Ok(())
    }

    async fn on_restart(
        &mut self,
        _ctx: &AgentContext,
        cause: &ExitReason,
    ) -> Result<(), troupe::AgentError> {
        self.events.push(format!("restart:{}:{}", self.id, cause));
        Ok(())
    }

    async fn on_stop(&mut self, _ctx: &AgentContext) {
        self.events.push(format!("stop:{}", self.id));
    }
}

/// Keeps the deliberate panics of the test agents out of the test output; any other panic is
/// still printed by the default hook.
pub fn quiet_scripted_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let msg = info
                .payload()
                .downcast_ref::<&str>()
                .copied()
                .unwrap_or_default();
            if msg != "scripted panic" && msg != "message panic" {
                default(info);
            }
        }));
    });
}

/// Starts a runtime with every kind in `config` served by [`Scripted`].
pub async fn start(config: RuntimeConfig) -> (Runtime, Events) {
    quiet_scripted_panics();
    let events = Events::default();
    let mut builder = Runtime::builder(config.clone());
    let mut kinds: Vec<String> = config
        .tiers
        .iter()
        .flat_map(|t| t.agents.iter().map(|a| a.kind.clone()))
        .collect();
    kinds.dedup();
    for kind in kinds {
        let ev = events.clone();
        builder = builder.register(kind, move |spec: &AgentSpec| Scripted {
            id: spec.id.0,
            events: ev.clone(),
        });
    }
    let rt = builder.start().await.expect("runtime starts");
    (rt, events)
}

/// Counts how many times a closure ran; handy for factories.
#[derive(Clone, Default)]
pub struct Count(pub Arc<AtomicUsize>);

impl Count {
    pub fn bump(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }
    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// Waits until every queued task has been taken by an agent (the queues are empty): the way
/// to know a task is in a handler without guessing a sleep. Panics after 10 s.
pub async fn picked(rt: &troupe::RuntimeHandle) {
    assert!(
        eventually(Duration::from_secs(10), || {
            rt.health().queues.iter().all(|q| q.depth == 0)
        })
        .await,
        "tasks stayed queued: {:?}",
        rt.health().queues
    );
}

/// Polls `f` every millisecond until it holds or `limit` passes.
pub async fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + limit;
    while std::time::Instant::now() < end {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    f()
}
