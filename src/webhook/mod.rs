//! Webhook ingest (issue 18, in progress on this branch): Plextera's signed run events.
//!
//! [`signature`] verifies an event before anything reads it.

pub mod signature;
