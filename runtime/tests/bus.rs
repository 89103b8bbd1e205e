//! The message bus: direct sends, topics, request/reply, and mailbox overflow policies.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{eventually, start};
use troupe::{AgentId, BusError, Delivery, Overflow, RuntimeConfig, Task, TierConfig};

fn pool(n: usize, mailbox: usize) -> RuntimeConfig {
    let mut c = RuntimeConfig::default().tier(TierConfig::new("t").agents("s", n));
    c.mailbox.capacity = mailbox;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_send_reaches_the_agent_and_unknown_agents_are_an_error() {
    let (rt, events) = start(pool(3, 16)).await;
    let bus = rt.bus();
    assert_eq!(bus.send(AgentId(2), "hello").await, Ok(Delivery::Delivered));
    assert!(eventually(Duration::from_secs(1), || events.count("msg:2:hello") == 1).await);
    assert_eq!(
        bus.send(AgentId(9), "x").await,
        Err(BusError::NoSuchAgent(AgentId(9)))
    );
    assert_eq!(
        bus.try_send(AgentId(9), "x"),
        Err(BusError::NoSuchAgent(AgentId(9)))
    );
    let stats = rt.stats().bus;
    assert_eq!(stats.direct, 1);
    assert_eq!(stats.dropped_no_such_agent, 2);
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_reply_and_its_timeout() {
    let (rt, _) = start(pool(2, 16)).await;
    let bus = rt.bus();
    let reply = bus
        .request(AgentId(1), "ping", Duration::from_secs(1))
        .await;
    assert_eq!(reply, Ok(Bytes::from("re:ping")));
    // Agent 0 spends 200 ms on a message; a request behind it with a 20 ms budget times out.
    bus.send(AgentId(0), "slow").await.unwrap();
    let r = bus
        .request(AgentId(0), "late", Duration::from_millis(20))
        .await;
    assert_eq!(
        r,
        Err(BusError::Timeout {
            agent: AgentId(0),
            timeout: Duration::from_millis(20)
        })
    );
    assert_eq!(rt.stats().bus.dropped_timeout, 1);
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_deliver_to_current_subscribers_only() {
    let (rt, events) = start(pool(4, 16)).await;
    let bus = rt.bus();
    for a in [0, 1, 2] {
        bus.subscribe("news", AgentId(a)).unwrap();
    }
    bus.subscribe("news", AgentId(0)).unwrap(); // twice is once
    let r = bus.publish("news", "one").await.unwrap();
    assert_eq!((r.delivered, r.dropped), (3, 0));
    bus.unsubscribe("news", AgentId(1)).unwrap();
    let topic = bus.topic("news");
    assert_eq!(topic.subscribers(), 2);
    let r = topic.publish("two").await.unwrap();
    assert_eq!(r.delivered, 2);
    assert!(eventually(Duration::from_secs(1), || events.count("msg:") == 5).await);
    assert_eq!(events.count("msg:1:two"), 0);
    assert_eq!(events.count("msg:3:"), 0);
    // Nobody listens: nothing delivered, no error.
    assert_eq!(bus.publish("empty", "x").await.unwrap().delivered, 0);
    assert_eq!(
        bus.subscribe("news", AgentId(40)),
        Err(BusError::NoSuchAgent(AgentId(40)))
    );
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_mailbox_rejects_drops_or_waits_as_asked() {
    let (rt, events) = start(pool(1, 2)).await;
    let bus = rt.bus();
    // The agent is busy for 150 ms and reads no mail meanwhile.
    let busy = rt.try_submit(Task::new("s", "sleep:150")).unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(bus.send(AgentId(0), "m1").await, Ok(Delivery::Delivered));
    assert_eq!(bus.send(AgentId(0), "m2").await, Ok(Delivery::Delivered));
    let full = BusError::MailboxFull {
        agent: AgentId(0),
        depth: 2,
        capacity: 2,
    };
    assert_eq!(
        bus.send_with(AgentId(0), "m3", Overflow::Reject).await,
        Err(full.clone())
    );
    assert_eq!(
        bus.send_with(AgentId(0), "m4", Overflow::DropNewest).await,
        Ok(Delivery::Dropped)
    );
    let short = Overflow::Wait {
        timeout: Duration::from_millis(20),
    };
    assert_eq!(bus.send_with(AgentId(0), "m5", short).await, Err(full));
    // Waiting long enough succeeds once the agent drains its mailbox.
    let long = Overflow::Wait {
        timeout: Duration::from_secs(5),
    };
    assert_eq!(
        bus.send_with(AgentId(0), "m6", long).await,
        Ok(Delivery::Delivered)
    );
    assert!(busy.await.is_ok());
    assert!(eventually(Duration::from_secs(1), || events.count("msg:0:") == 3).await);
    let got: Vec<String> = events
        .all()
        .into_iter()
        .filter(|e| e.starts_with("msg:"))
        .collect();
    assert_eq!(got, ["msg:0:m1", "msg:0:m2", "msg:0:m6"]);
    assert_eq!(rt.stats().bus.dropped_mailbox_full, 3);
    // Topics carry their own policy: drop-newest never fails the publisher.
    bus.subscribe("t", AgentId(0)).unwrap();
    let topic = bus.topic_with("t", Overflow::DropNewest);
    let busy = rt.try_submit(Task::new("s", "sleep:50")).unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    let mut dropped = 0;
    for _ in 0..5 {
        dropped += topic.publish("x").await.unwrap().dropped;
    }
    assert_eq!(dropped, 3);
    assert!(busy.await.is_ok());
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_handler_panic_rebuilds_the_agent_and_keeps_its_mailbox() {
    let (rt, events) = start(pool(1, 16)).await;
    let bus = rt.bus();
    bus.send(AgentId(0), "panic").await.unwrap();
    bus.send(AgentId(0), "after").await.unwrap();
    assert!(eventually(Duration::from_secs(2), || events.count("msg:0:after") == 1).await);
    assert_eq!(events.count("restart:0:panicked: message panic"), 1);
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_talk_to_each_other_through_their_context() {
    use troupe::{Agent, AgentContext, AgentSpec, Runtime, TaskError, TaskRequest};
    /// Asks its neighbour (id + 1) to echo and returns the reply.
    struct Asker;
    impl Agent for Asker {
        async fn handle(&mut self, t: TaskRequest, ctx: &AgentContext) -> Result<Bytes, TaskError> {
            let next = AgentId(ctx.id().0 + 1);
            ctx.bus()
                .request(next, t.payload, Duration::from_secs(1))
                .await
                .map_err(|e| TaskError::new(e.to_string()))
        }
        async fn on_message(&mut self, m: troupe::Message, ctx: &AgentContext) -> Option<Bytes> {
            Some(Bytes::from(format!("{} from {:?}", ctx.id(), m.from)))
        }
    }
    let config = RuntimeConfig::default().tier(TierConfig::new("t").agents("a", 2));
    let rt = Runtime::builder(config)
        .register("a", |_: &AgentSpec| Asker)
        .start()
        .await
        .unwrap();
    let out = rt.try_submit(Task::new(AgentId(0), "hi")).unwrap().await;
    assert_eq!(
        out,
        troupe::Outcome::Ok(Bytes::from("1 from Some(AgentId(0))"))
    );
    rt.shutdown().await;
}
