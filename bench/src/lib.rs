//! Shared helpers for the Troupe benchmarks.
