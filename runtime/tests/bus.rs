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
    let topic = bus.topic("news").unwrap();
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
    common::picked(&rt).await;
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
    let topic = bus.topic_with("t", Overflow::DropNewest).unwrap();
    bus.subscribe("t", AgentId(0)).unwrap();
    let busy = rt.try_submit(Task::new("s", "sleep:50")).unwrap();
    common::picked(&rt).await;
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

/// Searchers answer requests with their id. A number N: agent 3 never replies, agent 4 waits
/// N ms first. `hold`: waits 300 ms first. A task `fan:TOPIC` fans out to the topic's
/// subscribers from the agent's own bus and answers with who was asked and what came back.
struct Searcher;

impl troupe::Agent for Searcher {
    async fn handle(
        &mut self,
        t: troupe::TaskRequest,
        ctx: &troupe::AgentContext,
    ) -> Result<Bytes, troupe::TaskError> {
        let text = String::from_utf8_lossy(&t.payload).into_owned();
        let Some(topic) = text.strip_prefix("fan:") else {
            return Ok(t.payload);
        };
        let out = ctx
            .bus()
            .fan_out(
                troupe::Recipients::Topic(topic),
                troupe::Want::All,
                "0",
                Duration::from_secs(2),
            )
            .await
            .map_err(|e| troupe::TaskError::new(e.to_string()))?;
        let summary: Vec<String> = out
            .replies
            .iter()
            .map(|(a, r)| match r {
                troupe::Reply::Ok(_) => format!("{}:ok", a.0),
                troupe::Reply::Refused(BusError::MailboxFull { .. }) => format!("{}:full", a.0),
                other => format!("{}:{other:?}", a.0),
            })
            .collect();
        Ok(Bytes::from(summary.join(" ")))
    }
    async fn on_message(
        &mut self,
        m: troupe::Message,
        ctx: &troupe::AgentContext,
    ) -> Option<Bytes> {
        if &m.payload[..] == b"hold" {
            tokio::time::sleep(Duration::from_millis(300)).await;
        } else {
            let ms: u64 = std::str::from_utf8(&m.payload).ok()?.parse().ok()?;
            if ctx.id().0 == 3 {
                return None;
            }
            if ctx.id().0 == 4 {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
        }
        Some(Bytes::from(format!("found by {}", ctx.id().0)))
    }
}

async fn searchers(n: usize) -> troupe::Runtime {
    let config = RuntimeConfig::default().tier(
        TierConfig::new("t")
            .agents("planner", 1)
            .agents("searcher", n),
    );
    troupe::Runtime::builder(config)
        .register("planner", |_spec| Searcher)
        .register("searcher", |_spec| Searcher)
        .start()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_to_a_capability_gives_one_answer_per_agent_with_partial_results_at_the_deadline() {
    use troupe::Reply;
    // Agents 1..=4 search; 3 never replies, 4 replies after 2 s.
    let rt = searchers(4).await;
    let bus = rt.bus();
    let out = bus
        .request_all("searcher", "2000", Duration::from_millis(200))
        .await
        .unwrap();
    let by_agent: Vec<(u32, Reply)> = out.replies.iter().map(|(a, r)| (a.0, r.clone())).collect();
    assert_eq!(
        by_agent,
        [
            (1, Reply::Ok(Bytes::from("found by 1"))),
            (2, Reply::Ok(Bytes::from("found by 2"))),
            (3, Reply::NoReply),
            (4, Reply::Timeout),
        ]
    );
    assert_eq!((out.asked(), out.replied(), out.complete()), (4, 2, false));
    assert_eq!(rt.stats().bus.dropped_timeout, 1);
    // Any-N asks only N of them.
    let out = bus
        .request_any("searcher", 2, "0", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(out.asked(), 2);
    // Unknown capabilities and empty topics are errors for the whole fan-out.
    assert_eq!(
        bus.request_all("wizard", "0", Duration::from_secs(1)).await,
        Err(BusError::NoSuchCapability("wizard".into()))
    );
    assert_eq!(
        bus.fan_out(
            troupe::Recipients::Topic("nobody"),
            troupe::Want::All,
            "0",
            Duration::from_secs(1)
        )
        .await,
        Err(BusError::NoSubscribers("nobody".into()))
    );
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_to_topic_subscribers_skips_the_sender_and_reports_full_mailboxes() {
    let mut config = RuntimeConfig::default().tier(TierConfig::new("t").agents("searcher", 3));
    config.mailbox.capacity = 1;
    let rt = troupe::Runtime::builder(config)
        .register("searcher", |_spec| Searcher)
        .start()
        .await
        .unwrap();
    let bus = rt.bus();
    for a in 0..3 {
        bus.subscribe("jobs", AgentId(a)).unwrap();
    }
    // Agent 2 takes a slow request out of its mailbox; then its one mailbox slot is filled.
    let slow = {
        let bus = bus.clone();
        tokio::spawn(async move {
            bus.request(AgentId(2), "hold", Duration::from_secs(5))
                .await
        })
    };
    // (A delivery is recorded when the agent takes the message out of its mailbox.)
    assert!(
        eventually(Duration::from_secs(2), || rt.stats().bus.delivery.count
            == 1)
        .await
    );
    assert_eq!(bus.try_send(AgentId(2), "x"), Ok(Delivery::Delivered));
    // Agent 0 fans out to its own topic: it is not asked itself, agent 2 is refused at once.
    let out = rt
        .try_submit(Task::new(AgentId(0), "fan:jobs"))
        .unwrap()
        .await;
    assert_eq!(out, troupe::Outcome::Ok(Bytes::from("1:ok 2:full")));
    assert_eq!(slow.await.unwrap(), Ok(Bytes::from("found by 2")));
    rt.shutdown().await;
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_are_bounded_by_name_and_number_and_leave_with_their_last_subscriber() {
    let mut config = pool(2, 16);
    config.mailbox.max_topics = 2;
    let (rt, _) = start(config).await;
    let bus = rt.bus();
    // Bad names are refused, whatever the operation.
    for bad in ["", "has space", &"x".repeat(129), "ümlaut"] {
        assert!(
            matches!(
                bus.publish(bad, "m").await,
                Err(BusError::InvalidTopic { .. })
            ),
            "{bad:?}"
        );
        assert!(matches!(
            bus.subscribe(bad, AgentId(0)),
            Err(BusError::InvalidTopic { .. })
        ));
    }
    // Publishing to a name nobody subscribes to creates nothing.
    for i in 0..100 {
        let r = bus.publish(&format!("nobody.{i}"), "m").await.unwrap();
        assert_eq!((r.delivered, r.dropped), (0, 0));
    }
    assert_eq!(rt.stats().bus.topics, 0);
    bus.subscribe("a", AgentId(0)).unwrap();
    bus.subscribe("b", AgentId(1)).unwrap();
    assert_eq!(
        bus.subscribe("c", AgentId(0)),
        Err(BusError::TooManyTopics { limit: 2 })
    );
    // The last subscriber leaving frees the name...
    bus.unsubscribe("a", AgentId(0)).unwrap();
    assert_eq!(rt.stats().bus.topics, 1);
    bus.subscribe("c", AgentId(0)).unwrap();
    // ...unless a handle holds the topic: then it goes with the last handle.
    let held = bus.topic("c").unwrap();
    bus.unsubscribe("c", AgentId(0)).unwrap();
    assert_eq!(rt.stats().bus.topics, 2);
    drop(held);
    assert_eq!(rt.stats().bus.topics, 1);
    // A handle outliving its topic's removal still reaches a re-created topic of that name.
    let stale = bus.topic("d").unwrap();
    bus.subscribe("d", AgentId(1)).unwrap();
    bus.unsubscribe("d", AgentId(1)).unwrap();
    let again = stale.clone();
    drop(stale);
    drop(again); // last handle: "d" is removed
    let stale = bus.topic("d").unwrap();
    bus.subscribe("d", AgentId(1)).unwrap();
    assert_eq!(stale.try_publish("m").unwrap().delivered, 1);
    rt.shutdown().await;
}
