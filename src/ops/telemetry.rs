//! Log output: human-readable text or one JSON object per line, filtered by `RUST_LOG`.
//!
//! Logs go to stdout (the container convention). The default filter is `info`, which includes the
//! one-line-per-request access log on target `plextera_gateway::access`; `RUST_LOG=warn` silences it.
//! The `h2` crate is held to `error` unless `RUST_LOG` names it: it warns once per HTTP/2
//! connection a client resets streams on, which any client can repeat to flood the logs (the
//! gateway counts those closes itself).
//! Text is coloured only when stdout is a terminal and `NO_COLOR` is unset or empty
//! (<https://no-color.org>), so files, pipes and log collectors get plain text.
//!
//! JSON lines are flat ([`FlatJson`]): `timestamp`, `level`, `target`, `message`, then the event's
//! fields and those of every span it was logged in (the request's `request_id`, `trace_id`,
//! `span_id`, …) as top-level keys, an inner span's or the event's own value winning over an outer
//! one's. Log collectors index them as they are, with no nested `fields` or `span` object to
//! unpack.
//!
//! Every line passes through the key's redactor ([`redact_with`]) on its way out: the gateway's
//! own lines never hold the key, but its dependencies log what upstream sends them (h2 prints a
//! GOAWAY's debug data, in which an upstream may echo credentials), so the last word is here.

use std::io::{IsTerminal, Write};
use std::sync::OnceLock;

use clap::ValueEnum;
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormattedFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;

/// Returns a line with every echo of the key replaced, or `None` when it holds none.
pub type Redactor = Box<dyn Fn(&[u8]) -> Option<Vec<u8>> + Send + Sync>;

/// Set once the key is known; lines written before hold no key.
static REDACTOR: OnceLock<Redactor> = OnceLock::new();

/// Redacts every log line written from now on with `redactor` (which follows key rotations).
/// Only the first call takes effect.
pub fn redact_with(redactor: Redactor) {
    let _ = REDACTOR.set(redactor);
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines, coloured when stdout is a terminal and NO_COLOR is unset.
    #[default]
    Text,
    /// One flat JSON object per line, with the request span's fields beside the event's.
    Json,
}

/// The filter for `rust_log` (`RUST_LOG`, when set and valid; `info` otherwise), with `h2=error`
/// unless it names `h2` itself.
fn filter(rust_log: Option<&str>) -> EnvFilter {
    let (text, names_h2) = match rust_log.filter(|text| EnvFilter::try_new(text).is_ok()) {
        Some(text) => (text, text.contains("h2")),
        None => ("info", false),
    };
    let filter = EnvFilter::new(text);
    if names_h2 {
        return filter;
    }
    match "h2=error".parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    }
}

/// Installs the global subscriber. Call once, first thing in `main`.
pub fn init(format: LogFormat) {
    let filter = filter(std::env::var("RUST_LOG").ok().as_deref());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colours_wanted(
            std::io::stdout().is_terminal(),
            std::env::var_os("NO_COLOR").as_deref(),
        ))
        .with_writer(RedactedStdout);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .fmt_fields(JsonFields::new())
            .event_format(FlatJson)
            .init(),
    }
}

/// The keys every JSON line starts with; a field of the same name is not repeated.
const LEADING_KEYS: [&str; 4] = ["timestamp", "level", "target", "message"];

/// One flat JSON object per event: see the module documentation. Span fields are read back from
/// what [`JsonFields`] stored for each span (a JSON object), so they must be formatted with it.
pub struct FlatJson;

impl<S> FormatEvent<S, JsonFields> for FlatJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let mut fields = Map::new();
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let extensions = span.extensions();
                let Some(stored) = extensions.get::<FormattedFields<JsonFields>>() else {
                    continue;
                };
                if let Ok(Value::Object(span_fields)) = serde_json::from_str::<Value>(stored) {
                    fields.extend(span_fields);
                }
            }
        }
        let mut visitor = JsonVisitor(Map::new());
        event.record(&mut visitor);
        let mut own = visitor.0;
        let message = own.remove("message");
        fields.extend(own);

        let mut timestamp = String::new();
        SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        let metadata = event.metadata();
        let mut line = Map::new();
        line.insert("timestamp".into(), Value::String(timestamp));
        line.insert("level".into(), Value::String(metadata.level().as_str().into()));
        line.insert("target".into(), Value::String(metadata.target().into()));
        line.insert("message".into(), message.unwrap_or(Value::String(String::new())));
        // Written by hand to keep the leading keys first (a `Map` sorts its keys).
        writer.write_char('{')?;
        let leading = LEADING_KEYS
            .iter()
            .filter_map(|key| Some((*key, line.get(*key)?)));
        let rest = fields
            .iter()
            .filter(|(key, _)| !LEADING_KEYS.contains(&key.as_str()))
            .map(|(key, value)| (key.as_str(), value));
        for (at, (key, value)) in leading.chain(rest).enumerate() {
            if at > 0 {
                writer.write_char(',')?;
            }
            let key = serde_json::to_string(key).map_err(|_| std::fmt::Error)?;
            let value = serde_json::to_string(value).map_err(|_| std::fmt::Error)?;
            write!(writer, "{key}:{value}")?;
        }
        writeln!(writer, "}}")
    }
}

/// An event's fields as JSON values.
struct JsonVisitor(Map<String, Value>);

impl Visit for JsonVisitor {
    fn record_f64(&mut self, field: &Field, value: f64) {
        let value = serde_json::Number::from_f64(value).map_or(Value::Null, Value::Number);
        self.0.insert(field.name().into(), value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0.insert(field.name().into(), value.to_string().into());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().into(), format!("{value:?}").into());
    }
}

/// Standard output, each line redacted on the way.
struct RedactedStdout;

impl<'a> MakeWriter<'a> for RedactedStdout {
    type Writer = Redacted<std::io::Stdout>;

    fn make_writer(&'a self) -> Self::Writer {
        Redacted {
            inner: std::io::stdout(),
            redactor: REDACTOR.get(),
        }
    }
}

/// A writer that redacts what it is given before passing it on. tracing-subscriber writes each
/// formatted event in one `write_all`, so one call sees one whole line.
struct Redacted<W> {
    inner: W,
    redactor: Option<&'static Redactor>,
}

impl<W: Write> Write for Redacted<W> {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        match self.redactor.and_then(|redact| redact(line)) {
            Some(clean) => self.inner.write_all(&clean)?,
            None => self.inner.write_all(line)?,
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Colour only on a terminal, and not when `NO_COLOR` holds anything.
fn colours_wanted(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(std::ffi::OsStr::is_empty)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn h2_is_held_to_errors_unless_rust_log_names_it() {
        let shown = |rust_log: Option<&str>| filter(rust_log).to_string();
        assert_eq!(shown(None), "h2=error,info");
        assert_eq!(shown(Some("debug")), "h2=error,debug");
        assert_eq!(shown(Some("not a [valid filter")), "h2=error,info");
        assert_eq!(shown(Some("info,h2=trace")), "h2=trace,info");
    }

    #[test]
    fn lines_are_redacted_on_the_way_out() {
        let redactor: &'static Redactor = Box::leak(Box::new(Box::new(|line: &[u8]| {
            let text = std::str::from_utf8(line).ok()?;
            text.contains("s3cret")
                .then(|| text.replace("s3cret", "[redacted]").into_bytes())
        }) as Redactor));
        let mut out = Redacted {
            inner: Vec::new(),
            redactor: Some(redactor),
        };
        out.write_all(b"h2 said: goaway (b\"api-key s3cret\")\n")
            .expect("write");
        out.write_all(b"nothing here\n").expect("write");
        assert_eq!(
            String::from_utf8(out.inner).expect("utf-8"),
            "h2 said: goaway (b\"api-key [redacted]\")\nnothing here\n"
        );
    }

    #[test]
    fn colour_needs_a_terminal_and_no_no_color() {
        assert!(colours_wanted(true, None));
        assert!(colours_wanted(true, Some(OsStr::new(""))));
        assert!(!colours_wanted(true, Some(OsStr::new("1"))));
        assert!(!colours_wanted(false, None));
    }
}
