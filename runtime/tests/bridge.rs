//! The bus bridge extension point (what the cluster layer implements), exercised through the
//! public API only: two runtimes in one process joined by an in-memory bridge.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use common::{Events, Scripted, eventually, quiet_scripted_panics};
use troupe::{
    AgentId, AgentSpec, BridgeFuture, BusBridge, BusError, Delivery, RemoteDelivery, Runtime,
    RuntimeConfig, RuntimeHandle, TierConfig, TraceContext,
};

/// Carries this node's traffic straight into `peer`'s runtime, as a cluster layer would over
/// the network.
#[derive(Clone)]
struct Loopback {
    me: &'static str,
    peer_name: &'static str,
    peer: Arc<OnceLock<RuntimeHandle>>,
    published: Arc<Mutex<Vec<(String, Bytes, TraceContext)>>>,
    sends: Arc<AtomicUsize>,
}

impl Loopback {
    fn new(me: &'static str, peer_name: &'static str) -> Self {
        Loopback {
            me,
            peer_name,
            peer: Arc::default(),
            published: Arc::default(),
            sends: Arc::default(),
        }
    }

    fn peer(&self, node: &str) -> Result<RuntimeHandle, BusError> {
        if node != self.peer_name {
            return Err(BusError::NoSuchNode(node.to_owned()));
        }
        self.peer
            .get()
            .cloned()
            .ok_or_else(|| BusError::BridgeDown("peer not started".into()))
    }
}

impl BusBridge for Loopback {
    fn node(&self) -> &str {
        self.me
    }

    fn publish(&self, topic: &str, payload: Bytes, trace: TraceContext) {
        self.published
            .lock()
            .unwrap()
            .push((topic.to_owned(), payload.clone(), trace));
        if let Ok(peer) = self.peer(self.peer_name) {
            let topic = topic.to_owned();
            tokio::spawn(async move {
                let _ = peer.bridged_bus(trace).publish(&topic, payload).await;
            });
        }
    }

    fn send(
        &self,
        node: &str,
        agent: AgentId,
        payload: Bytes,
        trace: TraceContext,
    ) -> BridgeFuture<Result<RemoteDelivery, BusError>> {
        self.sends.fetch_add(1, Ordering::Relaxed);
        let peer = self.peer(node);
        Box::pin(async move {
            match peer?.bridged_bus(trace).send(agent, payload).await? {
                Delivery::Delivered => Ok(RemoteDelivery::Delivered),
                Delivery::Dropped => Ok(RemoteDelivery::Dropped),
            }
        })
    }

    fn request(
        &self,
        node: &str,
        agent: AgentId,
        payload: Bytes,
        timeout: Duration,
        trace: TraceContext,
    ) -> BridgeFuture<Result<Bytes, BusError>> {
        let peer = self.peer(node);
        Box::pin(async move {
            peer?
                .bridged_bus(trace)
                .request(agent, payload, timeout)
                .await
        })
    }
}

async fn node(bridge: Loopback, events: Events) -> Runtime {
    quiet_scripted_panics();
    let config = RuntimeConfig::default().tier(TierConfig::new("t").agents("s", 2));
    Runtime::builder(config)
        .register("s", move |spec: &AgentSpec| Scripted {
            id: spec.id.0,
            events: events.clone(),
        })
        .bus_bridge(bridge)
        .start()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridge_carries_sends_requests_and_publications_to_the_other_node() {
    let (ev_a, ev_b) = (Events::default(), Events::default());
    let (bridge_a, bridge_b) = (Loopback::new("a", "b"), Loopback::new("b", "a"));
    let a = node(bridge_a.clone(), ev_a.clone()).await;
    let b = node(bridge_b.clone(), ev_b.clone()).await;
    let _ = bridge_a.peer.set(b.handle());
    let _ = bridge_b.peer.set(a.handle());

    let bus = a.bus();
    // Request/reply across nodes, and the same timeout semantics as a local request.
    assert_eq!(
        bus.remote("b")
            .request(AgentId(1), "ping", Duration::from_secs(1))
            .await,
        Ok(Bytes::from("re:ping"))
    );
    bus.remote("b").send(AgentId(0), "slow").await.unwrap();
    assert!(matches!(
        bus.remote("b")
            .request(AgentId(0), "late", Duration::from_millis(20))
            .await,
        Err(BusError::Timeout { .. })
    ));
    // A send lands in the remote agent's mailbox, not the local one.
    assert_eq!(
        bus.remote("b").send(AgentId(1), "hello").await,
        Ok(Delivery::Delivered)
    );
    assert!(eventually(Duration::from_secs(1), || ev_b.count("msg:1:hello") == 1).await);
    assert_eq!(ev_a.count("msg:1:hello"), 0);
    // This node's own name is the local agent; an unknown node is an error.
    assert_eq!(
        bus.remote("a").send(AgentId(1), "local").await,
        Ok(Delivery::Delivered)
    );
    assert!(eventually(Duration::from_secs(1), || ev_a.count("msg:1:local") == 1).await);
    assert_eq!(
        bus.remote("zz").send(AgentId(1), "x").await,
        Err(BusError::NoSuchNode("zz".into()))
    );
    let sends_before = bridge_a.sends.load(Ordering::Relaxed);

    // A topic reaches subscribers on both nodes, and what a bridge delivers is not handed
    // back to the bridge (no echo between nodes).
    a.bus().subscribe("news", AgentId(0)).unwrap();
    b.bus().subscribe("news", AgentId(1)).unwrap();
    let report = a.bus().publish("news", "extra").await.unwrap();
    assert_eq!(report.delivered, 1, "the local part of the fan-out");
    assert!(eventually(Duration::from_secs(1), || ev_b.count("msg:1:extra") == 1).await);
    assert_eq!(ev_a.count("msg:0:extra"), 1);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        bridge_b.published.lock().unwrap().is_empty(),
        "a bridged publication must not be bridged again"
    );
    assert_eq!(bridge_a.published.lock().unwrap().len(), 1);
    // Nobody local listens to a topic: the other nodes still hear of it.
    a.bus().publish("only-there", "x").await.unwrap();
    assert_eq!(bridge_a.published.lock().unwrap().len(), 2);
    assert_eq!(bridge_a.sends.load(Ordering::Relaxed), sends_before);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_bridge_a_remote_address_is_an_unknown_node() {
    let events = Events::default();
    let config = RuntimeConfig::default().tier(TierConfig::new("t").agents("s", 1));
    let rt = Runtime::builder(config)
        .register("s", move |spec: &AgentSpec| Scripted {
            id: spec.id.0,
            events: events.clone(),
        })
        .start()
        .await
        .unwrap();
    assert_eq!(
        rt.bus().remote("other").send(AgentId(0), "x").await,
        Err(BusError::NoSuchNode("other".into()))
    );
    rt.shutdown().await;
}
