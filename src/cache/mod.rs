//! Caching of terminal runs: the decision ([`policy`]), the body reading it relies on (a quick
//! [`scan`] for runs still going, a validating [`sniff`] before storing) and the bounded [`store`].

pub mod policy;
pub mod scan;
pub mod sniff;
pub mod store;

pub use policy::{Decision, PassReason, Verdict};
pub use store::{CachedRun, RunStore};
