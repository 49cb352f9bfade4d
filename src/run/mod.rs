//! A workflow run's identity and status: the validated id ([`id`]) and the bounded table of
//! statuses ([`status`]) that every label and cache decision is drawn from.

pub mod id;
pub mod status;
