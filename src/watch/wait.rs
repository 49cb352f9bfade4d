//! What a client asks of a hold: `?wait=` or `Prefer: wait=` (how long), `Accept:
//! text/event-stream` (a stream instead), read at the edge into a [`WaitAsk`].
//!
//! `?wait=` takes a non-negative number of seconds (`30`, `0.5`) or a duration with a unit
//! (`500ms`, `30s`, `2m`, as `humantime` reads them); anything else is the client's mistake, 400
//! `INVALID_WAIT`. `Prefer: wait=N` is RFC 7240's: seconds, and a preference the server may ignore,
//! so one it cannot read is ignored rather than refused. The query wins when both are given, and
//! the first `wait` of either counts. The cap (`watch.max_wait`) is applied by [`crate::watch`], which also names the wait applied in
//! `Preference-Applied`.

use std::time::Duration;

use http::header::ACCEPT;
use http::{HeaderMap, HeaderName};

/// Longest wait written in a request that is read at all (a year): beyond it, the number is
/// nonsense, and `Duration` arithmetic must not overflow.
const LONGEST_READ: Duration = Duration::from_secs(365 * 24 * 3600);

/// `Prefer` (RFC 7240).
pub const PREFER: HeaderName = HeaderName::from_static("prefer");

/// How long a client asked to be held, before the cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitAsk {
    pub wait: Duration,
    /// Asked with `Prefer: wait=` (answered with `Preference-Applied`), not `?wait=`.
    pub preferred: bool,
}

/// `?wait=` was given but is not a wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidWait;

/// The wait asked for by `query` (the URI's query string) or the `Prefer` header, if any.
pub fn wait_ask(query: Option<&str>, headers: &HeaderMap) -> Result<Option<WaitAsk>, InvalidWait> {
    if let Some(value) = query.and_then(query_wait) {
        return parse_wait(value).map(|wait| {
            Some(WaitAsk {
                wait,
                preferred: false,
            })
        });
    }
    Ok(prefer_wait(headers).map(|wait| WaitAsk {
        wait,
        preferred: true,
    }))
}

/// The first `wait` parameter's value in a query string (other parameters stay ignored).
fn query_wait(query: &str) -> Option<&str> {
    query.split('&').find_map(|pair| match pair.split_once('=') {
        Some(("wait", value)) => Some(value),
        None if pair == "wait" => Some(""),
        _ => None,
    })
}

/// Seconds (`30`, `0.5`) or a duration with a unit (`500ms`, `2m`).
pub fn parse_wait(value: &str) -> Result<Duration, InvalidWait> {
    let value = value.trim();
    if value.is_empty() || value.len() > 32 {
        return Err(InvalidWait);
    }
    if value.bytes().all(|byte| byte.is_ascii_digit() || byte == b'.') {
        let seconds: f64 = value.parse().map_err(|_| InvalidWait)?;
        // A number too large for a `Duration` is just a long wait, capped like any other.
        return Duration::try_from_secs_f64(seconds.min(LONGEST_READ.as_secs_f64())).map_err(|_| InvalidWait);
    }
    // A unit is required here: `humantime` reads "30s", "500ms", "2m", "1m30s".
    if !value.as_bytes()[0].is_ascii_digit() {
        return Err(InvalidWait);
    }
    humantime::parse_duration(value)
        .map(|wait| wait.min(LONGEST_READ))
        .map_err(|_| InvalidWait)
}

/// `Prefer: wait=N` (RFC 7240 §4.3): whole seconds; a value that is not one is ignored.
fn prefer_wait(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get_all(PREFER)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .find_map(|preference| {
            let preference = preference.split(';').next()?.trim();
            let (name, value) = preference.split_once('=')?;
            if !name.trim().eq_ignore_ascii_case("wait") {
                return None;
            }
            let seconds: u64 = value.trim().trim_matches('"').parse().ok()?;
            Some(Duration::from_secs(seconds).min(LONGEST_READ))
        })
}

/// Whether the client asks for an event stream: `text/event-stream` among its `Accept` types.
pub fn wants_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|media| {
            let mut parts = media.split(';');
            let is_stream = parts
                .next()
                .is_some_and(|kind| kind.trim().eq_ignore_ascii_case("text/event-stream"));
            // `q=0` means "not this one" (RFC 9110 §12.4.2).
            let refused = parts.any(|parameter| {
                parameter.split_once('=').is_some_and(|(name, weight)| {
                    name.trim().eq_ignore_ascii_case("q")
                        && weight.trim().parse::<f32>().is_ok_and(|weight| weight == 0.0)
                })
            });
            is_stream && !refused
        })
}

/// `Preference-Applied`'s value: the wait applied, in seconds (fractions when the cap has them).
pub fn format_applied(wait: Duration) -> String {
    if wait.subsec_millis() == 0 {
        format!("wait={}", wait.as_secs())
    } else {
        format!("wait={:.3}", wait.as_secs_f64())
            .trim_end_matches('0')
            .to_owned()
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(name, value)| {
                (
                    http::HeaderName::from_static(name),
                    HeaderValue::from_static(value),
                )
            })
            .collect()
    }

    #[test]
    fn waits_are_seconds_or_durations() {
        for (text, wait) in [
            ("0", Duration::ZERO),
            ("30", Duration::from_secs(30)),
            ("0.5", Duration::from_millis(500)),
            ("500ms", Duration::from_millis(500)),
            ("30s", Duration::from_secs(30)),
            ("2m", Duration::from_secs(120)),
            ("99999999999", LONGEST_READ),
            ("99999999999999999999999999", LONGEST_READ),
        ] {
            assert_eq!(parse_wait(text), Ok(wait), "{text}");
        }
    }

    #[test]
    fn anything_else_is_invalid() {
        for text in [
            "",
            "-1",
            "abc",
            "1.2.3",
            "s",
            "30 parsecs",
            "NaN",
            "inf",
            "-5s",
            " ",
            "1e3",
            ".",
        ] {
            assert_eq!(parse_wait(text), Err(InvalidWait), "{text:?}");
        }
    }

    #[test]
    fn the_query_wins_and_other_parameters_are_ignored() {
        let prefer = headers(&[("prefer", "wait=5")]);
        let asked = wait_ask(Some("x=1&wait=30s&wait=1"), &prefer).expect("valid");
        assert_eq!(
            asked,
            Some(WaitAsk {
                wait: Duration::from_secs(30),
                preferred: false
            })
        );
        let asked = wait_ask(Some("x=1"), &prefer).expect("valid");
        assert_eq!(
            asked,
            Some(WaitAsk {
                wait: Duration::from_secs(5),
                preferred: true
            })
        );
        assert_eq!(wait_ask(Some("wait="), &prefer), Err(InvalidWait));
        assert_eq!(wait_ask(Some("wait"), &HeaderMap::new()), Err(InvalidWait));
        assert_eq!(wait_ask(None, &HeaderMap::new()), Ok(None));
    }

    #[test]
    fn prefer_wait_is_read_among_other_preferences_and_ignored_when_unreadable() {
        let asked =
            |value: &'static str| wait_ask(None, &headers(&[("prefer", value)])).expect("never refused");
        assert_eq!(
            asked("respond-async, Wait=10").map(|ask| ask.wait),
            Some(Duration::from_secs(10))
        );
        assert_eq!(asked("return=minimal"), None);
        assert_eq!(asked("wait=soon"), None);
        assert_eq!(asked("wait=-3"), None);
    }

    #[test]
    fn event_streams_are_asked_for_by_accept() {
        assert!(wants_event_stream(&headers(&[("accept", "text/event-stream")])));
        assert!(wants_event_stream(&headers(&[(
            "accept",
            "application/json;q=0.5, Text/Event-Stream;q=1"
        )])));
        assert!(!wants_event_stream(&headers(&[("accept", "application/json")])));
        assert!(!wants_event_stream(&headers(&[(
            "accept",
            "text/event-stream;q=0, application/json"
        )])));
        assert!(!wants_event_stream(&HeaderMap::new()));
    }

    #[test]
    fn the_applied_wait_is_written_in_seconds() {
        assert_eq!(format_applied(Duration::from_secs(60)), "wait=60");
        assert_eq!(format_applied(Duration::from_millis(2500)), "wait=2.5");
        assert_eq!(format_applied(Duration::ZERO), "wait=0");
    }
}
