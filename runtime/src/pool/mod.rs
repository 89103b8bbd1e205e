//! The pool: the agent slots, the work groups they pull from, and the capability index that
//! maps a task's target to a group.
//!
//! Its layout is fixed when the runtime starts (agents are never added or removed; a restarted
//! agent moves into the same slot), so every lookup here is an index into a boxed slice, with
//! one hash lookup per submission to resolve a capability name.
//!
//! Groups: one per capability (every kind is one), in first-seen config order, then one per
//! agent for tasks sent to that agent's id. An agent pulls from its own group and from the
//! groups of its capabilities.

mod slot;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

pub(crate) use slot::{AgentSlot, Liveness};
pub use slot::{AgentSpec, AgentState};

use crate::config::RuntimeConfig;
use crate::error::SubmitError;
use crate::ids::AgentId;
use crate::queue::WorkGroup;
use crate::task::{QueuedTask, Target};

/// Agent slots, work groups and the capability index.
pub(crate) struct Pool {
    slots: Box<[AgentSlot]>,
    /// Capability groups first, then one group per agent (at `capabilities + agent index`).
    groups: Box<[Arc<WorkGroup>]>,
    capability_index: HashMap<String, u32>,
    /// The agents of each capability group, in start order (fan-out reads it).
    members: Box<[Box<[u32]>]>,
    /// Origin of the millisecond clock used for agent deadlines.
    epoch: Instant,
}

impl Pool {
    /// Lays out the pool of `config`: slots in tier order, and the children (agent indices in
    /// start order) of each tier. Kinds are checked against the registered factories before.
    pub(crate) fn new(config: &RuntimeConfig) -> (Pool, Vec<Vec<u32>>) {
        // Capability groups: each kind and each extra capability, in first-seen order.
        let mut capability_index: HashMap<String, u32> = HashMap::new();
        let mut capability_names: Vec<Arc<str>> = Vec::new();
        for group in config.tiers.iter().flat_map(|t| &t.agents) {
            for name in std::iter::once(&group.kind).chain(&group.capabilities) {
                if !capability_index.contains_key(name) {
                    capability_index.insert(name.clone(), capability_names.len() as u32);
                    capability_names.push(Arc::from(name.as_str()));
                }
            }
        }
        // Each target's share of each priority's queue: its agents busy plus a fraction of the
        // queue (`queues.kind_share`); none with a single capability (its share would only
        // shrink the one queue everyone uses).
        let mut member_counts = vec![0usize; capability_names.len()];
        for group in config.tiers.iter().flat_map(|t| &t.agents) {
            let mut seen: Vec<u32> = Vec::new();
            for name in std::iter::once(&group.kind).chain(&group.capabilities) {
                if let Some(&c) = capability_index.get(name) {
                    if !seen.contains(&c) {
                        seen.push(c);
                        member_counts[c as usize] += group.count;
                    }
                }
            }
        }
        let shares = capability_names.len() > 1 && config.queues.kind_share < 1.0;
        let share_of = |members: usize| -> [usize; crate::priority::Priority::COUNT] {
            if !shares {
                return [usize::MAX; crate::priority::Priority::COUNT];
            }
            std::array::from_fn(|i| {
                let queued =
                    (config.queues.capacity.0[i] as f64 * config.queues.kind_share) as usize;
                queued.max(1).saturating_add(members)
            })
        };
        let mut groups: Vec<Arc<WorkGroup>> =
            Vec::with_capacity(member_counts.len() + config.total_agents());
        groups.extend(
            member_counts
                .iter()
                .map(|&m| Arc::new(WorkGroup::new(share_of(m)))),
        );
        let group_of = |name: &str| capability_index.get(name).copied().unwrap_or(0) as usize;

        let mut slots = Vec::with_capacity(config.total_agents());
        let mut children_per_tier = Vec::with_capacity(config.tiers.len());
        for (tier_index, tier) in config.tiers.iter().enumerate() {
            let tier_name: Arc<str> = Arc::from(tier.name.as_str());
            let mut children = Vec::new();
            for group in &tier.agents {
                let kind: Arc<str> = capability_names[group_of(&group.kind)].clone();
                let mut caps: Vec<Arc<str>> = vec![kind.clone()];
                for c in &group.capabilities {
                    let name = &capability_names[group_of(c)];
                    if !caps.contains(name) {
                        caps.push(name.clone());
                    }
                }
                let capabilities: Arc<[Arc<str>]> = Arc::from(caps);
                let params = Arc::new(group.params.clone());
                for _ in 0..group.count {
                    let index = slots.len() as u32;
                    let own = Arc::new(WorkGroup::new(share_of(1)));
                    groups.push(own.clone());
                    let mut member_of = Vec::with_capacity(1 + capabilities.len());
                    member_of.push(own);
                    member_of.extend(capabilities.iter().map(|c| groups[group_of(c)].clone()));
                    let spec = AgentSpec {
                        id: AgentId(index),
                        kind: kind.clone(),
                        tier: tier_name.clone(),
                        capabilities: capabilities.clone(),
                        params: params.clone(),
                        restarts: 0,
                    };
                    slots.push(AgentSlot::new(
                        spec,
                        tier_index,
                        member_of.into_boxed_slice(),
                    ));
                    children.push(index);
                }
            }
            children_per_tier.push(children);
        }
        // Own groups were pushed in agent order after the capability groups.
        debug_assert_eq!(groups.len(), capability_names.len() + slots.len());
        let mut members: Vec<Vec<u32>> = vec![Vec::new(); capability_names.len()];
        for slot in &slots {
            for c in slot.spec().capabilities.iter() {
                members[group_of(c)].push(slot.spec().id.0);
            }
        }
        let pool = Pool {
            slots: slots.into_boxed_slice(),
            groups: groups.into_boxed_slice(),
            capability_index,
            members: members.into_iter().map(Vec::into_boxed_slice).collect(),
            epoch: Instant::now(),
        };
        (pool, children_per_tier)
    }

    /// Number of agents.
    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    /// The slot at `index`, an index the pool handed out (a tier child, an idle entry).
    #[inline]
    pub(crate) fn slot(&self, index: u32) -> &AgentSlot {
        &self.slots[index as usize]
    }

    /// Every slot, in id order.
    pub(crate) fn slots(&self) -> impl Iterator<Item = &AgentSlot> {
        self.slots.iter()
    }

    /// `at` as milliseconds since the pool's epoch (the clock of agent deadlines).
    #[inline]
    pub(crate) fn ms_at(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    /// The group a task for `target` is queued on.
    pub(crate) fn resolve(&self, target: &Target) -> Result<u32, SubmitError> {
        match target {
            Target::Capability(c) => self
                .capability_index
                .get(&**c)
                .copied()
                .ok_or_else(|| SubmitError::UnknownCapability(c.to_string())),
            Target::Agent(id) => {
                if (id.0 as usize) < self.slots.len() {
                    Ok(self.capability_index.len() as u32 + id.0)
                } else {
                    Err(SubmitError::UnknownAgent(*id))
                }
            }
        }
    }

    /// Takes a place in group `group`'s share of priority `p`'s queue.
    #[inline]
    pub(crate) fn take_share(
        &self,
        group: u32,
        p: crate::priority::Priority,
    ) -> Result<Option<crate::bound::ShareGuard>, (usize, usize)> {
        match self.groups.get(group as usize) {
            Some(g) => g.take_share(p),
            None => Ok(None),
        }
    }

    /// True if some agent that serves group `group` is not stopped.
    #[inline]
    pub(crate) fn is_live(&self, group: u32) -> bool {
        self.groups.get(group as usize).is_some_and(|g| g.is_live())
    }

    /// Takes every task queued on groups nobody serves any more (every member stopped), for
    /// supervision to answer.
    pub(crate) fn sweep_dead(&self, mut each: impl FnMut(QueuedTask)) {
        for g in self.groups.iter().filter(|g| !g.is_live()) {
            while let Some(task) = g.pop_any() {
                each(task);
            }
        }
    }

    /// Queues `task` on group `group` (its admission slot is reserved) and wakes one idle agent
    /// of that group.
    #[inline]
    pub(crate) fn push(&self, group: u32, task: QueuedTask) {
        let g = &self.groups[group as usize];
        g.push(task);
        let caps = self.capability_index.len();
        if let Some(own) = (group as usize).checked_sub(caps) {
            // An agent's own group: its only member is listed by a flag, not a queue entry.
            let slot = &self.slots[own];
            if slot.take_own_listing() {
                slot.signal().wake_if_idle();
            }
            return;
        }
        // Skip stale idle entries: an agent listed idle may have found work meanwhile.
        while let Some((agent, position)) = g.pop_idle() {
            let slot = &self.slots[agent as usize];
            slot.unlist_idle(position);
            if slot.signal().wake_if_idle() {
                return;
            }
        }
    }

    /// Takes every queued task out of every group, for shutdown to cancel.
    pub(crate) fn sweep(&self, mut each: impl FnMut(QueuedTask)) {
        for g in self.groups.iter() {
            while let Some(task) = g.pop_any() {
                each(task);
            }
        }
    }

    /// Takes the running task away from every agent that still holds one (shutdown gives up on
    /// handlers that would not give their thread back); the number taken.
    pub(crate) fn seize_running(&self, mut each: impl FnMut(QueuedTask)) -> u64 {
        let mut n = 0;
        for slot in self.slots.iter() {
            if let Some(task) = slot.seize_task() {
                n += 1;
                each(task);
            }
        }
        n
    }

    /// Agents not stopped (a handler that never gave its thread back keeps its agent running).
    pub(crate) fn not_stopped(&self) -> u64 {
        self.slots
            .iter()
            .filter(|s| s.state() != crate::pool::AgentState::Stopped)
            .count() as u64
    }

    /// Wakes every agent, even mid-handler (shutdown's cancel phase).
    pub(crate) fn wake_all(&self) {
        for slot in self.slots.iter() {
            slot.signal().force_wake();
        }
    }

    /// The capability names, in group order.
    pub(crate) fn capabilities(&self) -> Vec<String> {
        let mut names: Vec<(u32, &String)> =
            self.capability_index.iter().map(|(n, &g)| (g, n)).collect();
        names.sort_unstable();
        names.into_iter().map(|(_, n)| n.clone()).collect()
    }

    /// Ids of the agents of `kind`, in start order.
    pub(crate) fn agents_of_kind(&self, kind: &str) -> Vec<AgentId> {
        self.slots
            .iter()
            .filter(|s| &*s.spec().kind == kind)
            .map(|s| s.spec().id)
            .collect()
    }

    /// Ids of the agents that serve `capability`, in start order.
    pub(crate) fn agents_with(&self, capability: &str) -> Vec<AgentId> {
        self.members(capability)
            .map(|m| m.iter().map(|&a| AgentId(a)).collect())
            .unwrap_or_default()
    }

    /// Indices of the agents that serve `capability`, in start order; `None` if no agent does.
    pub(crate) fn members(&self, capability: &str) -> Option<&[u32]> {
        let g = *self.capability_index.get(capability)?;
        self.members.get(g as usize).map(|m| &m[..])
    }

    /// Parameters of the first agent group of `kind` in the config (empty if none).
    pub(crate) fn params_of(&self, kind: &str) -> Arc<toml::Table> {
        self.slots
            .iter()
            .find(|s| &*s.spec().kind == kind)
            .map(|s| s.spec().params.clone())
            .unwrap_or_default()
    }
}
