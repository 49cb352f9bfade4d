//! W3C Trace Context (<https://www.w3.org/TR/trace-context/>): reading a client's `traceparent`
//! and `tracestate`, and what the gateway's own spans and upstream calls carry.
//!
//! A `traceparent` is parsed strictly: lowercase hex, exact field lengths, no all-zero trace or
//! parent id, version `ff` refused, and a future version read by the version-00 layout with
//! whatever follows ignored (the spec's rule). Anything else is ignored as if it had not been sent:
//! a new trace starts, and the client's `tracestate` is dropped with it (the spec forbids reading
//! `tracestate` without a valid `traceparent`). A `tracestate` is kept, unchanged, only when it is
//! a valid W3C list of at most [`MAX_TRACESTATE_BYTES`] in at most [`MAX_TRACESTATE_MEMBERS`]
//! `key=value` members, keys and values by the spec's grammar and no key twice; otherwise it is
//! dropped whole (never cut or repaired, which could split or change a vendor's entry). Nothing else of the client's headers is kept: what goes upstream is rebuilt here.
//!
//! Ids are random ([`fastrand`]): they correlate, they do not authenticate.

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};

/// `traceparent`.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// `tracestate`.
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
/// Longest `tracestate` kept (the spec asks vendors to propagate at least 512 bytes).
pub const MAX_TRACESTATE_BYTES: usize = 512;
/// Most `tracestate` members kept (the spec's limit).
pub const MAX_TRACESTATE_MEMBERS: usize = 32;
/// Length of a version-00 `traceparent`.
const TRACEPARENT_LEN: usize = 55;
/// The `sampled` flag.
const SAMPLED: u8 = 0x01;

/// A trace id: 16 bytes, not all zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId(pub [u8; 16]);

/// A span id: 8 bytes, not all zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpanId(pub [u8; 8]);

impl TraceId {
    /// A random, non-zero trace id.
    pub fn random() -> Self {
        loop {
            let id = fastrand::u128(..).to_be_bytes();
            if id != [0; 16] {
                return Self(id);
            }
        }
    }

    /// Whether a trace started here is sampled at `ratio` (0 to 1): the same rule as
    /// OpenTelemetry's `TraceIdRatioBased`, from the id's last 8 bytes, so every replica decides
    /// alike for one trace.
    pub fn sampled_at(self, ratio: f64) -> bool {
        if ratio >= 1.0 {
            return true;
        }
        let mut low = [0u8; 8];
        low.copy_from_slice(&self.0[8..]);
        let bound = (ratio.max(0.0) * (1u64 << 63) as f64) as u64;
        (u64::from_be_bytes(low) >> 1) < bound
    }
}

impl SpanId {
    /// A random, non-zero span id.
    pub fn random() -> Self {
        loop {
            let id = fastrand::u64(..).to_be_bytes();
            if id != [0; 8] {
                return Self(id);
            }
        }
    }
}

impl std::fmt::Display for TraceId {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write_hex(formatter, &self.0)
    }
}

impl std::fmt::Display for SpanId {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write_hex(formatter, &self.0)
    }
}

fn write_hex(formatter: &mut std::fmt::Formatter<'_>, bytes: &[u8]) -> std::fmt::Result {
    for byte in bytes {
        write!(formatter, "{byte:02x}")?;
    }
    Ok(())
}

/// A span in a trace: the trace, the span's own id, whether the trace is sampled, and the
/// `tracestate` that travels with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub sampled: bool,
    /// The client's `tracestate`, passed on unchanged; `None` when none (valid) came.
    pub state: Option<HeaderValue>,
}

impl SpanContext {
    /// The `traceparent` naming this span as the parent of the next hop.
    pub fn traceparent(&self) -> HeaderValue {
        let flags = if self.sampled { SAMPLED } else { 0 };
        let text = format!("00-{}-{}-{flags:02x}", self.trace_id, self.span_id);
        HeaderValue::from_str(&text).expect("hex digits and dashes are a valid header value")
    }

    /// The headers of a call this span makes: `traceparent`, and `tracestate` when there is one.
    pub fn inject(&self, headers: &mut HeaderMap) {
        headers.insert(TRACEPARENT, self.traceparent());
        if let Some(state) = &self.state {
            headers.insert(TRACESTATE, state.clone());
        }
    }
}

/// The ids a piece of work carries upstream and into error bodies: the request id, and the span
/// it belongs to (`None` for a call no client asked for, which starts a trace of its own).
#[derive(Debug, Clone)]
pub struct CallIds {
    pub request_id: HeaderValue,
    pub span: Option<SpanContext>,
}

impl CallIds {
    /// The ids of a call the gateway makes on its own account: `x-request-id: <who>-<random>`
    /// (`watch-…` for a watcher's poll, `webhook-…` for an event's confirming call), and a new
    /// trace.
    pub fn own(who: &str) -> Self {
        Self {
            request_id: HeaderValue::from_str(&format!("{who}-{}", uuid::Uuid::new_v4().simple()))
                .expect("a name, a dash and hex digits are a valid header value"),
            span: None,
        }
    }
}

/// What a client's headers say about the trace its request belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteParent {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub sampled: bool,
    pub state: Option<HeaderValue>,
}

impl RemoteParent {
    /// The client's trace, when it sent exactly one valid `traceparent`; its `tracestate` rides
    /// along when valid and bounded.
    pub fn from_headers(headers: &HeaderMap) -> Option<Self> {
        let mut values = headers.get_all(TRACEPARENT).iter();
        let value = values.next()?;
        if values.next().is_some() {
            return None;
        }
        let (trace_id, span_id, flags) = parse_traceparent(value.as_bytes())?;
        Some(Self {
            trace_id,
            span_id,
            sampled: flags & SAMPLED != 0,
            state: tracestate(headers),
        })
    }
}

/// Reads a `traceparent` value: `(trace id, parent id, flags)`.
fn parse_traceparent(value: &[u8]) -> Option<(TraceId, SpanId, u8)> {
    if value.len() < TRACEPARENT_LEN {
        return None;
    }
    let version = hex_byte(value.get(0..2)?)?;
    if version == 0xff || (version == 0 && value.len() != TRACEPARENT_LEN) {
        return None;
    }
    // A future version may append fields, after a dash.
    if value.len() > TRACEPARENT_LEN && value[TRACEPARENT_LEN] != b'-' {
        return None;
    }
    if value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
        return None;
    }
    let mut trace_id = [0u8; 16];
    for (at, byte) in trace_id.iter_mut().enumerate() {
        *byte = hex_byte(&value[3 + 2 * at..5 + 2 * at])?;
    }
    let mut span_id = [0u8; 8];
    for (at, byte) in span_id.iter_mut().enumerate() {
        *byte = hex_byte(&value[36 + 2 * at..38 + 2 * at])?;
    }
    let flags = hex_byte(&value[53..55])?;
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some((TraceId(trace_id), SpanId(span_id), flags))
}

/// Two lowercase hex digits.
fn hex_byte(pair: &[u8]) -> Option<u8> {
    let digit = |byte: u8| match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        _ => None,
    };
    match pair {
        [high, low] => Some(digit(*high)? << 4 | digit(*low)?),
        _ => None,
    }
}

/// The client's `tracestate` (several headers joined with commas), when it is a valid W3C list:
/// at most [`MAX_TRACESTATE_BYTES`], at most [`MAX_TRACESTATE_MEMBERS`] members, each a valid
/// `key=value` ([`valid_key`], [`valid_value`]) with a key of its own. Empty members (`a=1,,b=2`)
/// and the optional white space around commas are allowed, as the spec says; anything else drops
/// the whole header (the spec lets a vendor drop an invalid `tracestate` whole).
fn tracestate(headers: &HeaderMap) -> Option<HeaderValue> {
    let mut joined: Vec<u8> = Vec::new();
    for value in headers.get_all(TRACESTATE) {
        if !joined.is_empty() {
            joined.push(b',');
        }
        joined.extend_from_slice(value.as_bytes());
        if joined.len() > MAX_TRACESTATE_BYTES {
            return None;
        }
    }
    let mut keys: Vec<&[u8]> = Vec::new();
    for member in joined.split(|byte| *byte == b',') {
        let member = trim_ows(member);
        if member.is_empty() {
            continue;
        }
        let equals = member.iter().position(|byte| *byte == b'=')?;
        let (key, value) = (&member[..equals], &member[equals + 1..]);
        if !valid_key(key) || !valid_value(value) || keys.contains(&key) {
            return None;
        }
        keys.push(key);
        if keys.len() > MAX_TRACESTATE_MEMBERS {
            return None;
        }
    }
    if keys.is_empty() {
        return None;
    }
    HeaderValue::from_bytes(&joined).ok()
}

/// A list member without the optional white space (`OWS`: spaces and tabs) around it.
fn trim_ows(member: &[u8]) -> &[u8] {
    let blank = |byte: &u8| *byte == b' ' || *byte == b'\t';
    let start = member
        .iter()
        .position(|byte| !blank(byte))
        .unwrap_or(member.len());
    let end = member
        .iter()
        .rposition(|byte| !blank(byte))
        .map_or(start, |last| last + 1);
    &member[start..end]
}

/// A `tracestate` key: `lcalpha 0*255(lcalpha / DIGIT / "_" / "-" / "*" / "/")`, or the
/// multi-tenant `tenant@system`, the tenant `(lcalpha / DIGIT) 0*240(…)` and the system
/// `lcalpha 0*13(…)`.
fn valid_key(key: &[u8]) -> bool {
    let rest = |bytes: &[u8], most: usize| {
        bytes.len() <= most
            && bytes.iter().all(|byte| {
                byte.is_ascii_lowercase()
                    || byte.is_ascii_digit()
                    || matches!(byte, b'_' | b'-' | b'*' | b'/')
            })
    };
    let mut parts = key.splitn(2, |byte| *byte == b'@');
    let first = parts.next().unwrap_or_default();
    match parts.next() {
        None => match first.split_first() {
            Some((head, tail)) => head.is_ascii_lowercase() && rest(tail, 255),
            None => false,
        },
        Some(system) => {
            let tenant = match first.split_first() {
                Some((head, tail)) => (head.is_ascii_lowercase() || head.is_ascii_digit()) && rest(tail, 240),
                None => false,
            };
            let system = match system.split_first() {
                Some((head, tail)) => head.is_ascii_lowercase() && rest(tail, 13),
                None => false,
            };
            tenant && system
        }
    }
}

/// A `tracestate` value: `0*255(chr) nblk-chr`, where `chr` is printable ASCII but `,` and `=`,
/// and the last one is not a space; so 1 to 256 characters.
fn valid_value(value: &[u8]) -> bool {
    let chr = |byte: &u8| (0x20..=0x7e).contains(byte) && *byte != b',' && *byte != b'=';
    (1..=256).contains(&value.len()) && value.iter().all(chr) && value.last() != Some(&b' ')
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn parent(traceparent: &str) -> Option<RemoteParent> {
        let mut headers = HeaderMap::new();
        headers.insert(TRACEPARENT, HeaderValue::from_str(traceparent).expect("header"));
        headers.insert(TRACESTATE, HeaderValue::from_static("congo=t61rcWkgMzE"));
        RemoteParent::from_headers(&headers)
    }

    #[test]
    fn a_valid_traceparent_is_read_with_its_tracestate() {
        let parent = parent(VALID).expect("valid");
        assert_eq!(parent.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(parent.span_id.to_string(), "00f067aa0ba902b7");
        assert!(parent.sampled);
        assert_eq!(
            parent.state.as_ref().map(|state| state.as_bytes()),
            Some(&b"congo=t61rcWkgMzE"[..])
        );
        let unsampled = self::parent(&VALID.replace("-01", "-00")).expect("valid");
        assert!(!unsampled.sampled);
    }

    #[test]
    fn invalid_traceparents_are_ignored() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01.what",
        ] {
            assert_eq!(parent(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_future_version_is_read_by_the_version_00_layout() {
        let parent = parent("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future")
            .expect("a future version");
        assert_eq!(parent.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(parent.sampled);
        assert!(self::parent("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").is_some());
    }

    #[test]
    fn two_traceparents_are_none() {
        let mut headers = HeaderMap::new();
        headers.append(TRACEPARENT, HeaderValue::from_static(VALID));
        headers.append(TRACEPARENT, HeaderValue::from_static(VALID));
        assert_eq!(RemoteParent::from_headers(&headers), None);
    }

    fn state(values: &[&str]) -> Option<String> {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(TRACESTATE, HeaderValue::from_str(value).expect("header"));
        }
        tracestate(&headers).map(|value| value.to_str().expect("ascii").to_owned())
    }

    #[test]
    fn tracestate_is_kept_joined_within_its_bounds_or_dropped() {
        assert_eq!(state(&["a=1", "b=2,c=3"]).as_deref(), Some("a=1,b=2,c=3"));
        assert_eq!(state(&[]), None);
        assert_eq!(state(&["no-equals"]), None);
        assert_eq!(state(&["=x"]), None);
        let members: Vec<String> = (0..MAX_TRACESTATE_MEMBERS).map(|at| format!("k{at}=v")).collect();
        assert!(state(&[&members.join(",")]).is_some());
        let too_many: Vec<String> = (0..=MAX_TRACESTATE_MEMBERS)
            .map(|at| format!("k{at}=v"))
            .collect();
        assert_eq!(state(&[&too_many.join(",")]), None);
        let long = format!(
            "a={},b={}",
            "v".repeat(256),
            "v".repeat(MAX_TRACESTATE_BYTES - 256 - 5)
        );
        assert_eq!(long.len(), MAX_TRACESTATE_BYTES);
        assert!(state(&[&long]).is_some());
        assert_eq!(state(&[&format!("{long}v")]), None);
    }

    #[test]
    fn tracestate_keys_follow_the_w3c_grammar() {
        let longest = format!("a{}", "z".repeat(255));
        let tenant = format!("1{}", "t".repeat(240));
        for good in [
            "congo",
            "a",
            "rojo00",
            "a_b-c*d/e",
            longest.as_str(),
            "tenant@vendor",
            "0tenant@v",
            "t@abcdefghijklmn",
            &format!("{tenant}@v"),
        ] {
            assert!(valid_key(good.as_bytes()), "{good:?}");
            assert!(state(&[&format!("{good}=1")]).is_some(), "{good:?}");
        }
        for bad in [
            "",
            "Congo",
            "0congo",
            "_congo",
            "con go",
            "con.go",
            "congo\t",
            &format!("{longest}z"),
            "@vendor",
            "tenant@",
            "tenant@0vendor",
            "tenant@vendor@x",
            "_t@v",
            "t@abcdefghijklmno",
            &format!("{tenant}t@v"),
        ] {
            assert!(!valid_key(bad.as_bytes()), "{bad:?}");
            assert_eq!(state(&[&format!("ok=1,{bad}=1")]), None, "{bad:?}");
        }
    }

    #[test]
    fn tracestate_values_follow_the_w3c_grammar() {
        let longest = "v".repeat(256);
        for good in [
            "t61rcWkgMzE",
            "a b",
            " leading",
            "!~\"#$%&'()*+-./:;<>?@[\\]^_`{|}",
            &longest,
        ] {
            assert!(valid_value(good.as_bytes()), "{good:?}");
        }
        for bad in [
            "",
            "trailing ",
            "a,b",
            "a=b",
            "tab\there",
            "caf\u{e9}",
            &format!("{longest}v"),
        ] {
            assert!(!valid_value(bad.as_bytes()), "{bad:?}");
        }
        // A trailing space before a comma is white space around the comma, not the value's.
        assert_eq!(state(&["a=1 ,b=2"]).as_deref(), Some("a=1 ,b=2"));
        assert_eq!(state(&["a=,b=2"]), None, "an empty value");
        assert_eq!(state(&["a=1,b=x=y"]), None);
    }

    #[test]
    fn tracestate_with_a_key_twice_is_dropped() {
        assert_eq!(state(&["a=1,b=2,a=3"]), None);
        assert_eq!(state(&["a=1", "a=1"]), None, "across two headers as well");
        assert_eq!(state(&["t@v=1,t@w=2"]).as_deref(), Some("t@v=1,t@w=2"));
    }

    #[test]
    fn tracestate_empty_members_and_white_space_around_commas_are_skipped() {
        assert_eq!(state(&["a=1,,b=2"]).as_deref(), Some("a=1,,b=2"));
        assert_eq!(state(&["a=1 ,\t b=2 , "]).as_deref(), Some("a=1 ,\t b=2 , "));
        assert_eq!(state(&[",,"]), None, "no member at all");
        let mut members: Vec<String> = (0..MAX_TRACESTATE_MEMBERS).map(|at| format!("k{at}=v")).collect();
        members.push(String::new());
        assert!(
            state(&[&members.join(",")]).is_some(),
            "an empty member does not count toward the limit"
        );
    }

    #[test]
    fn the_traceparent_sent_on_names_the_span_and_only_the_sampled_flag() {
        let span = SpanContext {
            trace_id: TraceId([0xab; 16]),
            span_id: SpanId([0x01; 8]),
            sampled: true,
            state: None,
        };
        assert_eq!(
            span.traceparent(),
            "00-abababababababababababababababab-0101010101010101-01"
        );
        let unsampled = SpanContext {
            sampled: false,
            ..span
        };
        assert!(unsampled.traceparent().to_str().expect("ascii").ends_with("-00"));
    }

    #[test]
    fn ratio_sampling_keeps_about_the_ratio() {
        assert!(TraceId::random().sampled_at(1.0));
        assert!(!TraceId::random().sampled_at(0.0));
        let kept = (0..10_000).filter(|_| TraceId::random().sampled_at(0.25)).count();
        assert!((2_000..3_000).contains(&kept), "{kept}");
    }
}
