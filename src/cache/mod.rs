//! Caching of terminal runs: the decision ([`policy`]), the body sniffing it relies on ([`sniff`])
//! and the bounded store ([`store`]).

pub mod policy;
pub mod sniff;
pub mod store;

pub use policy::{Decision, PassReason, Verdict};
pub use store::{CachedRun, RunStore};
