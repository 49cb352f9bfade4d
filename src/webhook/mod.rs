//! Webhook ingest (issue 18, in progress on this branch): Plextera's signed run events.
//!
//! [`signature`] verifies an event before anything reads it; [`event`] reads the verified
//! envelope; [`seen`] remembers event ids so a redelivery does nothing. Still to come: the
//! listener on its own port, the confirming call that ends every wait on the run, metrics, the
//! demo's events and `sign-webhook`.

pub mod event;
pub mod seen;
pub mod signature;
