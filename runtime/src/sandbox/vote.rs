//! The 2-of-3 vote, as a pure state machine the unifier feeds lane results into.
//!
//! A ballot decides as soon as two lanes return equal outputs (equality is a comparator the
//! user may supply), and declares "no quorum" as soon as no pair of lanes can still agree
//! (two failures, or three differing outputs). It keeps accepting the remaining lane afterwards
//! so the final tally (unanimous, majority, no quorum) and the dissenting lane are recorded.

use bytes::Bytes;

use super::model::{Comparator, Lane, LaneResult};

/// What the ballot concluded, the first time it could.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Two lanes agree on this output.
    Agreed { output: Bytes, lanes: [Lane; 2] },
    /// No two lanes can agree any more.
    NoQuorum,
}

/// The final tally, once every lane has answered or timed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VoteResult {
    /// All three lanes returned the same output.
    Unanimous,
    /// Two lanes agreed; the third failed or dissented.
    Majority,
    /// No two lanes agreed.
    NoQuorum,
}

impl VoteResult {
    /// The metric label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            VoteResult::Unanimous => "unanimous",
            VoteResult::Majority => "majority",
            VoteResult::NoQuorum => "no_quorum",
        }
    }
}

#[derive(Default)]
pub(crate) struct Ballot {
    results: [Option<LaneResult>; 3],
    decided: bool,
}

impl Ballot {
    /// Records `lane`'s result; returns the decision the first time one is reached.
    pub(crate) fn add(
        &mut self,
        lane: Lane,
        result: LaneResult,
        eq: &Comparator,
    ) -> Option<Decision> {
        self.results[lane.index()] = Some(result);
        if self.decided {
            return None;
        }
        let decision = self.decide(eq)?;
        self.decided = true;
        Some(decision)
    }

    fn ok(&self, i: usize) -> Option<&Bytes> {
        match &self.results[i] {
            Some(LaneResult::Ok(b)) => Some(b),
            _ => None,
        }
    }

    fn decide(&self, eq: &Comparator) -> Option<Decision> {
        let pairs = [(0, 1), (0, 2), (1, 2)];
        for &(i, j) in &pairs {
            if let (Some(a), Some(b)) = (self.ok(i), self.ok(j)) {
                if eq(a, b) {
                    return Some(Decision::Agreed {
                        output: a.clone(),
                        lanes: [Lane::ALL[i], Lane::ALL[j]],
                    });
                }
            }
        }
        // A pair can still agree if neither side has failed and they are not known to differ.
        let can_agree = |i: usize, j: usize| {
            let open = |k: usize| matches!(self.results[k], None | Some(LaneResult::Ok(_)));
            open(i) && open(j) && !(self.ok(i).is_some() && self.ok(j).is_some())
        };
        if pairs.iter().any(|&(i, j)| can_agree(i, j)) {
            None
        } else {
            Some(Decision::NoQuorum)
        }
    }

    /// True once every lane has a result.
    pub(crate) fn complete(&self) -> bool {
        self.results.iter().all(Option::is_some)
    }

    /// Marks every lane without a result as timed out.
    pub(crate) fn time_out_missing(&mut self) -> Vec<Lane> {
        let mut missing = Vec::new();
        for lane in Lane::ALL {
            if self.results[lane.index()].is_none() {
                self.results[lane.index()] = Some(LaneResult::Timeout);
                missing.push(lane);
            }
        }
        missing
    }

    /// The final tally and the lanes that dissented from the majority (returned a different
    /// output or failed while two others agreed). A skipped lane did not vote: it is neither
    /// in agreement nor dissent, and the vote is at most a majority.
    pub(crate) fn tally(&self, eq: &Comparator) -> (VoteResult, Vec<Lane>) {
        match self.decide(eq) {
            Some(Decision::Agreed { output, .. }) => {
                let skipped =
                    |l: &Lane| matches!(self.results[l.index()], Some(LaneResult::Skipped));
                let dissent: Vec<Lane> = Lane::ALL
                    .into_iter()
                    .filter(|l| !skipped(l))
                    .filter(|l| !self.ok(l.index()).is_some_and(|b| eq(b, &output)))
                    .collect();
                let result = if dissent.is_empty() && !Lane::ALL.iter().any(skipped) {
                    VoteResult::Unanimous
                } else {
                    VoteResult::Majority
                };
                (result, dissent)
            }
            _ => (VoteResult::NoQuorum, Vec::new()),
        }
    }

    /// Every lane's result (lanes without one yet appear as `Timeout`).
    pub(crate) fn results(&self) -> [LaneResult; 3] {
        std::array::from_fn(|i| self.results[i].clone().unwrap_or(LaneResult::Timeout))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eq(a: &Bytes, b: &Bytes) -> bool {
        a == b
    }
    fn ok(s: &'static str) -> LaneResult {
        LaneResult::Ok(Bytes::from_static(s.as_bytes()))
    }

    #[test]
    fn decides_on_the_second_agreeing_lane() {
        let mut b = Ballot::default();
        assert_eq!(b.add(Lane::C, ok("x"), &eq), None);
        let d = b.add(Lane::A, ok("x"), &eq);
        assert_eq!(
            d,
            Some(Decision::Agreed {
                output: Bytes::from("x"),
                lanes: [Lane::A, Lane::C]
            })
        );
        // The third is still recorded but decides nothing new.
        assert_eq!(b.add(Lane::B, ok("lie"), &eq), None);
        assert_eq!(b.tally(&eq), (VoteResult::Majority, vec![Lane::B]));
    }

    #[test]
    fn unanimous_when_all_three_agree() {
        let mut b = Ballot::default();
        b.add(Lane::A, ok("x"), &eq);
        b.add(Lane::B, ok("x"), &eq);
        b.add(Lane::C, ok("x"), &eq);
        assert_eq!(b.tally(&eq), (VoteResult::Unanimous, vec![]));
    }

    #[test]
    fn no_quorum_as_soon_as_no_pair_can_agree() {
        let mut b = Ballot::default();
        assert_eq!(b.add(Lane::A, LaneResult::Timeout, &eq), None);
        assert_eq!(
            b.add(Lane::B, LaneResult::Panic("p".into()), &eq),
            Some(Decision::NoQuorum)
        );
        let mut b = Ballot::default();
        b.add(Lane::A, ok("1"), &eq);
        assert_eq!(b.add(Lane::B, ok("2"), &eq), None);
        assert_eq!(b.add(Lane::C, ok("3"), &eq), Some(Decision::NoQuorum));
        assert_eq!(b.tally(&eq).0, VoteResult::NoQuorum);
        let mut b = Ballot::default();
        b.add(Lane::A, ok("1"), &eq);
        b.add(Lane::B, ok("2"), &eq);
        // C could still side with A or B.
        assert!(!b.complete());
    }

    #[test]
    fn a_custom_comparator_decides_what_agreement_means() {
        let loose = |a: &Bytes, b: &Bytes| a.eq_ignore_ascii_case(b);
        let mut b = Ballot::default();
        b.add(Lane::A, ok("Yes"), &loose);
        assert!(matches!(
            b.add(Lane::B, ok("yes"), &loose),
            Some(Decision::Agreed { .. })
        ));
    }
}
