//! A clustered runtime embedded in a program, through the crate's public API only: two
//! runtimes in one process join one NATS (a real `nats-server`, required in CI), a task
//! submitted to one runs where its kind lives, and the bus reaches the other runtime's agent.

use std::time::Duration;

use troupe::{
    Agent, AgentContext, AgentId, AgentSpec, Bytes, Runtime, RuntimeConfig, TaskError, TaskRequest,
    TierConfig,
};
use troupe_cluster::testing::NatsServer;
use troupe_cluster::{Cluster, ClusterConfig, ClusterTask, TaskStatus};

struct Upper;

impl Agent for Upper {
    async fn handle(&mut self, task: TaskRequest, _: &AgentContext) -> Result<Bytes, TaskError> {
        Ok(Bytes::from(task.payload.to_ascii_uppercase()))
    }

    async fn on_message(&mut self, msg: troupe::Message, _: &AgentContext) -> Option<Bytes> {
        msg.is_request()
            .then(|| Bytes::from(format!("re:{}", String::from_utf8_lossy(&msg.payload))))
    }
}

/// Answers with the key its task carries: the cluster's id for the task.
struct Key;

impl Agent for Key {
    async fn handle(&mut self, task: TaskRequest, _: &AgentContext) -> Result<Bytes, TaskError> {
        Ok(Bytes::from(format!("{:?}", task.key)))
    }
}

/// A runtime with `n` agents of `kind`, joined to the cluster as `node`.
async fn join(url: &str, node: &str, kind: &'static str) -> (Runtime, std::sync::Arc<Cluster>) {
    let config = ClusterConfig {
        urls: vec![url.to_owned()],
        node: node.to_owned(),
        ..ClusterConfig::default()
    };
    let cluster = Cluster::connect(config).await.unwrap();
    let runtime = Runtime::builder(
        RuntimeConfig::default().tier(TierConfig::new("t").agents(kind, 2).agents("key", 1)),
    )
    .register(kind, |_: &AgentSpec| Upper)
    .register("key", |_: &AgentSpec| Key)
    .bus_bridge(cluster.bridge())
    .start()
    .await
    .unwrap();
    cluster.join(runtime.handle(), None).await.unwrap();
    (runtime, cluster)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_clustered_runtime_submits_anywhere_and_talks_across() {
    let d = tempfile::tempdir().unwrap();
    let Some(server) = NatsServer::for_test(d.path()) else {
        return;
    };
    let url = server.url();
    // The NATS server needs a moment to listen; `connect` waits for it.
    let (rt_a, a) = join(&url, "a", "upper").await;
    let (rt_b, b) = join(&url, "b", "shout").await;
    // `shout` lives on b only: submitted on a, it runs on b.
    let accepted = a
        .submit(ClusterTask::new("shout", "hello").waited())
        .await
        .unwrap();
    let record = a
        .wait(accepted.id, Duration::from_secs(10), true)
        .await
        .unwrap()
        .expect("an outcome");
    assert_eq!(
        (record.detail.as_deref(), record.node.as_str()),
        (Some("HELLO"), "b")
    );
    assert!(matches!(
        b.status(accepted.id).await.unwrap(),
        TaskStatus::Done(_)
    ));
    // The handler sees the cluster's id as the task's key (what it keys side effects by).
    let keyed = a
        .submit(ClusterTask::new("key", "").waited())
        .await
        .unwrap();
    let record = a
        .wait(keyed.id, Duration::from_secs(10), true)
        .await
        .unwrap()
        .expect("an outcome");
    assert_eq!(record.detail, Some(format!("Some({})", keyed.id)));
    // a's bus asks an agent of b.
    let reply = rt_a
        .bus()
        .remote("b")
        .request(AgentId(1), "ping", Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(reply, Bytes::from("re:ping"));
    // Leaving: stop pulling, shut the runtime down, then leave.
    for (rt, c) in [(rt_a, a), (rt_b, b)] {
        c.stop_pulling();
        rt.shutdown().await;
        c.leave().await;
    }
}
