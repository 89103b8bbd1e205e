//! Task priorities and a small fixed-size map keyed by them.
//!
//! Troupe has exactly five priority levels. Every per-priority structure (queues, capacities,
//! counters, histograms) is a [`PerPriority`] array indexed by [`Priority::index`], so the hot
//! path never hashes a priority or allocates for one.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A string that is not a priority name.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("unknown priority `{0}` (expected one of critical, high, normal, low, background)")]
pub struct ParsePriorityError(pub String);

/// How urgent a task is. Declared from most to least urgent; `Ord` follows urgency, so
/// `Priority::Critical < Priority::Background`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Served first; use for work whose delay costs money or safety.
    Critical,
    /// Ahead of normal work.
    High,
    /// The default.
    #[default]
    Normal,
    /// Behind normal work, still guaranteed a share.
    Low,
    /// Whatever capacity is left, plus a guaranteed minimum share.
    Background,
}

impl Priority {
    /// All levels, most urgent first.
    pub const ALL: [Priority; 5] = [
        Priority::Critical,
        Priority::High,
        Priority::Normal,
        Priority::Low,
        Priority::Background,
    ];

    /// Number of levels.
    pub const COUNT: usize = 5;

    /// Position of this level in [`Priority::ALL`] (0 = critical).
    #[inline]
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The level at `index` in [`Priority::ALL`], if any.
    #[inline]
    pub const fn from_index(index: usize) -> Option<Priority> {
        match index {
            0 => Some(Priority::Critical),
            1 => Some(Priority::High),
            2 => Some(Priority::Normal),
            3 => Some(Priority::Low),
            4 => Some(Priority::Background),
            _ => None,
        }
    }

    /// The lowercase name used in configs, metric labels and the HTTP API.
    pub const fn as_str(self) -> &'static str {
        match self {
            Priority::Critical => "critical",
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
            Priority::Background => "background",
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Priority {
    type Err = ParsePriorityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Priority::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| ParsePriorityError(s.to_owned()))
    }
}

/// One value per priority level, stored inline.
///
/// Serialises as a table keyed by level name (`{ critical = 1, high = 2, ... }`) so configs read
/// naturally. Plain deserialisation wants every level; config fields use
/// [`PerPriority::deserialize_partial`], where left-out levels keep their defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PerPriority<T>(pub [T; Priority::COUNT]);

impl<T> PerPriority<T> {
    /// Builds the map by calling `f` once per level.
    pub fn from_fn(mut f: impl FnMut(Priority) -> T) -> Self {
        PerPriority(std::array::from_fn(|i| {
            f(Priority::from_index(i).unwrap_or(Priority::Background))
        }))
    }

    /// The value for `p`.
    #[inline]
    pub fn get(&self, p: Priority) -> &T {
        &self.0[p.index()]
    }

    /// The value for `p`, mutably.
    #[inline]
    pub fn get_mut(&mut self, p: Priority) -> &mut T {
        &mut self.0[p.index()]
    }

    /// `(level, value)` pairs, most urgent first.
    pub fn iter(&self) -> impl Iterator<Item = (Priority, &T)> {
        Priority::ALL.into_iter().zip(self.0.iter())
    }

    /// Maps every value.
    pub fn map<U>(&self, mut f: impl FnMut(Priority, &T) -> U) -> PerPriority<U> {
        PerPriority::from_fn(|p| f(p, self.get(p)))
    }
}

impl<T> std::ops::Index<Priority> for PerPriority<T> {
    type Output = T;
    fn index(&self, p: Priority) -> &T {
        self.get(p)
    }
}

impl<T> std::ops::IndexMut<Priority> for PerPriority<T> {
    fn index_mut(&mut self, p: Priority) -> &mut T {
        self.get_mut(p)
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PerPriorityRepr<T> {
    critical: T,
    high: T,
    normal: T,
    low: T,
    background: T,
}

impl<T: Serialize + Clone> Serialize for PerPriority<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let [critical, high, normal, low, background] = self.0.clone();
        PerPriorityRepr {
            critical,
            high,
            normal,
            low,
            background,
        }
        .serialize(s)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PartialRepr<T> {
    critical: Option<T>,
    high: Option<T>,
    normal: Option<T>,
    low: Option<T>,
    background: Option<T>,
}

impl<T: Clone> PerPriority<T> {
    /// Deserialises a table that may leave levels out; those keep their value in `defaults`.
    /// (Config fields use it so `capacity = { normal = 10 }` changes one level only.)
    pub fn deserialize_partial<'de, D>(d: D, defaults: &PerPriority<T>) -> Result<Self, D::Error>
    where
        D: serde::Deserializer<'de>,
        T: Deserialize<'de>,
    {
        let r = PartialRepr::<T>::deserialize(d)?;
        let given = [r.critical, r.high, r.normal, r.low, r.background];
        let mut out = defaults.clone();
        for (slot, v) in out.0.iter_mut().zip(given) {
            if let Some(v) = v {
                *slot = v;
            }
        }
        Ok(out)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for PerPriority<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let r = PerPriorityRepr::<T>::deserialize(d)?;
        Ok(PerPriority([
            r.critical,
            r.high,
            r.normal,
            r.low,
            r.background,
        ]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_order_follows_urgency() {
        for p in Priority::ALL {
            assert_eq!(p.as_str().parse::<Priority>().ok(), Some(p));
            assert_eq!(Priority::from_index(p.index()), Some(p));
        }
        assert!(Priority::Critical < Priority::Background);
        assert!("urgent".parse::<Priority>().is_err());
    }
}
