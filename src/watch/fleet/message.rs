//! What replicas tell each other over Redis pub/sub about a watched run: a new version of a run
//! still going, or its end (each with its body, up to [`MAX_CARRIED_BODY`]), that its watch
//! stopped (404, key refused), that an event says it should end soon, or that an operator purged
//! its stored answer (every replica drops its memory copy).
//!
//! JSON, one message per wake-up, tagged with the sending replica so it can skip its own. Only
//! the gateway's replicas publish on the channel; a message that does not read is dropped.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Largest run body carried in a message; a larger one is announced without it, and receivers
/// fetch the run themselves.
pub const MAX_CARRIED_BODY: usize = 64 * 1024;

/// One wake-up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// The replica that sent it.
    pub from: String,
    pub run: String,
    #[serde(flatten)]
    pub news: News,
}

/// What happened to the run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum News {
    /// A new version of a run still going; `body` is `None` when it was too large to carry.
    Going {
        etag: String,
        content_type: Option<String>,
        body: Option<String>,
    },
    /// The run ended (it is in the shared tier too); `body` as for `Going`.
    Ended {
        etag: Option<String>,
        content_type: Option<String>,
        body: Option<String>,
    },
    /// Its watch stopped (404, another 4xx, the key refused).
    Stopped,
    /// A run event said it ended, and the confirming call did not see it yet.
    Expect,
    /// An operator purged the run's stored answer (`not_found_only`: a remembered 404 only);
    /// Redis is purged already, memory is each replica's to drop.
    Purged { not_found_only: bool },
}

impl Message {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a message of strings always serializes")
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
    }
}

/// A body to carry: UTF-8 (runs are JSON) and at most [`MAX_CARRIED_BODY`].
pub fn carried(body: &Bytes) -> Option<String> {
    (body.len() <= MAX_CARRIED_BODY)
        .then(|| std::str::from_utf8(body).ok().map(str::to_owned))
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_read_back_as_written() {
        for news in [
            News::Going {
                etag: "W/\"abc\"".to_owned(),
                content_type: Some("application/json".to_owned()),
                body: Some("{\"id\":\"r\"}".to_owned()),
            },
            News::Ended {
                etag: Some("\"strong\"".to_owned()),
                content_type: None,
                body: None,
            },
            News::Stopped,
            News::Expect,
            News::Purged { not_found_only: true },
        ] {
            let message = Message {
                from: "replica-a".to_owned(),
                run: "run-1".to_owned(),
                news,
            };
            assert_eq!(Message::decode(&message.encode()), Some(message));
        }
        assert_eq!(Message::decode(b"{\"kind\":\"ended\"}"), None);
    }

    #[test]
    fn only_small_utf8_bodies_are_carried() {
        assert_eq!(carried(&Bytes::from_static(b"{}")), Some("{}".to_owned()));
        assert_eq!(carried(&Bytes::from(vec![b'a'; MAX_CARRIED_BODY + 1])), None);
        assert_eq!(carried(&Bytes::from_static(&[0xff, 0xfe])), None);
    }
}
