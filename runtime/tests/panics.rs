//! A caught agent panic is reported once, as a tracing event, not by the default panic hook;
//! panics elsewhere in the process still reach the hook that was there before. (Its own test
//! binary: the panic hook and the tracing subscriber are process-wide.)

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tracing_subscriber::layer::SubscriberExt;
use troupe::{
    Agent, AgentContext, Bytes, Outcome, Runtime, RuntimeConfig, Task, TaskError, TaskRequest,
    TierConfig,
};

struct Boom;

impl Agent for Boom {
    async fn handle(&mut self, task: TaskRequest, _: &AgentContext) -> Result<Bytes, TaskError> {
        if &task.payload[..] == b"panic" {
            panic!("boom in a handler");
        }
        Ok(task.payload)
    }
}

/// The fields of every `troupe::panic` event, as `name=value` strings.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<Vec<String>>>>);

struct Fields<'a>(&'a mut Vec<String>);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.push(format!("{}={:?}", field.name(), value));
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.push(format!("{}={}", field.name(), value));
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Captured {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if event.metadata().target() == "troupe::panic" {
            let mut fields = Vec::new();
            event.record(&mut Fields(&mut fields));
            self.0.lock().unwrap().push(fields);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caught_panic_is_one_structured_event_and_other_panics_keep_their_hook() {
    let captured = Captured::default();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(captured.clone()))
        .expect("the only subscriber of this test binary");
    // Stands in for the default hook: counts what reaches it.
    let printed = Arc::new(AtomicUsize::new(0));
    let seen = printed.clone();
    std::panic::set_hook(Box::new(move |info| {
        seen.fetch_add(1, Ordering::SeqCst);
        eprintln!("{info}");
    }));

    let rt =
        Runtime::builder(RuntimeConfig::default().tier(TierConfig::new("t").agents("boom", 2)))
            .register("boom", |_spec| Boom)
            .start()
            .await
            .unwrap();
    let handle = rt.try_submit(Task::new("boom", "panic")).unwrap();
    let id = handle.id();
    assert_eq!(handle.await, Outcome::Panic("boom in a handler".into()));
    assert!(
        rt.try_submit(Task::new("boom", "fine"))
            .unwrap()
            .await
            .is_ok()
    );

    let events = captured.0.lock().unwrap().clone();
    assert_eq!(events.len(), 1, "one event per caught panic: {events:?}");
    let e = &events[0];
    assert!(e.iter().any(|f| f == "panic=boom in a handler"), "{e:?}");
    assert!(e.iter().any(|f| f == &format!("task={}", id.0)), "{e:?}");
    assert!(e.iter().any(|f| f.starts_with("agent=")), "{e:?}");
    assert!(
        e.iter()
            .any(|f| f.starts_with("location=") && f.contains("panics.rs")),
        "{e:?}"
    );
    assert!(
        !e.iter().any(|f| f.starts_with("backtrace=")),
        "no backtrace unless asked: {e:?}"
    );
    assert_eq!(
        printed.load(Ordering::SeqCst),
        0,
        "the default hook stayed quiet"
    );

    // A panic that is not an agent's still goes to the previous hook.
    let _ = std::panic::catch_unwind(|| panic!("not an agent"));
    assert_eq!(printed.load(Ordering::SeqCst), 1);
    assert_eq!(captured.0.lock().unwrap().len(), 1);
    rt.shutdown().await;
}
