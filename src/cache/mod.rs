//! Caching of terminal runs: the decision ([`policy`]), the body reading it relies on (a quick
//! [`scan`] for runs still going, a validating [`sniff`] before storing), the bounded memory
//! [`store`], the shared Redis tier ([`redis`]), the single flight per run ([`coalesce`]) and the
//! validators clients revalidate with ([`etag`]); an operator's [`purge`] drops a stored answer.

pub mod coalesce;
pub mod etag;
pub mod metrics;
pub mod outcome;
pub mod policy;
pub mod purge;
pub mod redis;
pub mod scan;
pub mod sniff;
pub mod store;
pub mod tiers;
pub mod version;

pub use outcome::CacheOutcome;
pub use policy::{Decision, PassReason, Policy, Verdict};
pub use store::{CachedRun, RunStore};
