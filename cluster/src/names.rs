//! Names on NATS: the stream, buckets, consumers and subjects of one Troupe cluster.
//!
//! One work-queue stream holds every accepted task, on subject
//! `<cluster>.tasks.<priority>.<capability>`. JetStream allows one consumer per subject of a
//! work queue, so each (priority, capability) pair has one durable pull consumer, shared by
//! every node that serves the capability: JetStream hands each task to exactly one of them.
//! Capability names are escaped into one subject token (`.`, `*`, `>`, space and other bytes
//! outside `A-Za-z0-9_-` become `~HH`).

use troupe::Priority;

/// The names of one cluster.
#[derive(Debug, Clone)]
pub(crate) struct Names {
    pub(crate) cluster: String,
}

/// `name` as one subject token.
pub(crate) fn escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("~{b:02X}"));
        }
    }
    out
}

impl Names {
    pub(crate) fn new(cluster: &str) -> Self {
        Names {
            cluster: cluster.to_owned(),
        }
    }

    /// The work-queue stream of tasks.
    pub(crate) fn task_stream(&self) -> String {
        format!("{}_TASKS", self.cluster.to_uppercase())
    }

    /// Every task subject.
    pub(crate) fn task_subjects(&self) -> String {
        format!("{}.tasks.>", self.cluster)
    }

    /// The subject of a task of `priority` for `capability`.
    pub(crate) fn task_subject(&self, priority: Priority, capability: &str) -> String {
        format!(
            "{}.tasks.{}.{}",
            self.cluster,
            priority.as_str(),
            escape(capability)
        )
    }

    /// The priority of a task subject.
    pub(crate) fn priority_of(&self, subject: &str) -> Option<Priority> {
        let rest = subject
            .strip_prefix(&self.cluster)?
            .strip_prefix(".tasks.")?;
        rest.split('.').next()?.parse().ok()
    }

    /// The durable consumer of (`priority`, `capability`).
    pub(crate) fn consumer(&self, priority: Priority, capability: &str) -> String {
        format!(
            "{}-{}",
            priority.as_str(),
            escape(capability).replace('~', "_")
        )
    }

    /// The bucket of task outcomes.
    pub(crate) fn outcomes(&self) -> String {
        format!("{}-outcomes", self.cluster)
    }

    /// The bucket of node heartbeats.
    pub(crate) fn nodes(&self) -> String {
        format!("{}-nodes", self.cluster)
    }

    /// Direct sends and requests to agent `agent` of `node`.
    pub(crate) fn agent(&self, node: &str, agent: u32) -> String {
        format!("{}.bus.agent.{node}.{agent}", self.cluster)
    }

    /// Everything addressed to `node`'s agents.
    pub(crate) fn agents_of(&self, node: &str) -> String {
        format!("{}.bus.agent.{node}.*", self.cluster)
    }

    /// Outcomes of tasks `node` accepted with a waiter.
    pub(crate) fn done(&self, node: &str) -> String {
        format!("{}.done.{node}", self.cluster)
    }

    /// Publications to `topic`.
    pub(crate) fn topic(&self, topic: &str) -> String {
        format!("{}.bus.topic.{}", self.cluster, escape(topic))
    }

    /// Every topic.
    pub(crate) fn topics(&self) -> String {
        format!("{}.bus.topic.*", self.cluster)
    }

    /// The topic a subject names (the inverse of [`Names::topic`]).
    pub(crate) fn topic_of(&self, subject: &str) -> Option<String> {
        let token = subject.strip_prefix(&format!("{}.bus.topic.", self.cluster))?;
        unescape(token)
    }
}

fn unescape(token: &str) -> Option<String> {
    let bytes = token.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'~' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_escape_into_one_subject_token_and_back() {
        let n = Names::new("troupe");
        assert_eq!(
            n.task_subject(Priority::High, "llm"),
            "troupe.tasks.high.llm"
        );
        assert_eq!(escape("a.b c*>"), "a~2Eb~20c~2A~3E");
        for t in ["events", "a.b", "x/y:z", "ünï"] {
            assert_eq!(n.topic_of(&n.topic(t)).as_deref(), Some(t));
        }
        assert_eq!(n.consumer(Priority::Low, "a.b"), "low-a_2Eb");
        assert_eq!(
            n.priority_of(&n.task_subject(Priority::Background, "x.y")),
            Some(Priority::Background)
        );
        assert_eq!(n.priority_of("other.tasks.high.x"), None);
    }
}
