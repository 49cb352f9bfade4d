//! How a refused config is reported: one line naming the line, the key, what is wrong with the
//! value (never for a place that could hold a secret) and an example of a valid one.
//!
//! The line of the file is never quoted: a key pasted into the config (`api_key = "…"`) would be
//! printed back with it.

use std::fmt::Display;

/// An example of a valid value for every key, as it would be written in the file.
pub const EXAMPLES: &[(&str, &str)] = &[
    ("server.listen", "\"0.0.0.0:8080\""),
    ("server.admin_listen", "\"127.0.0.1:9090\""),
    ("server.shutdown_delay", "\"5s\""),
    ("server.shutdown_grace", "\"10s\""),
    ("server.cors_allowed_origins", "[\"https://app.example.com\"]"),
    ("server.worker_threads", "2"),
    ("server.max_connections", "10000"),
    ("server.header_read_timeout", "\"10s\""),
    ("server.write_timeout", "\"30s\""),
    ("server.http2_max_concurrent_streams", "100"),
    ("server.http2_keepalive_interval", "\"20s\""),
    ("server.http2_keepalive_timeout", "\"20s\""),
    ("server.client_tokens_env", "\"PLEXTERA_GATEWAY_CLIENT_TOKENS\""),
    (
        "server.client_tokens_file",
        "\"/run/secrets/plextera-gateway/client-tokens\"",
    ),
    ("server.secrets_check_interval", "\"5s\""),
    ("upstream.base_url", "\"https://api.plextera.com\""),
    ("upstream.api_key_env", "\"PLEXTERA_API_KEY\""),
    ("upstream.api_key_file", "\"/run/secrets/plextera-api-key\""),
    ("upstream.request_timeout", "\"10s\""),
    ("upstream.max_body_size", "\"8MiB\""),
    ("upstream.ca_file", "\"/etc/plextera-gateway/ca.pem\""),
    ("upstream.max_requests_per_second", "10"),
    ("upstream.max_concurrent_requests", "16"),
    ("upstream.queue_timeout", "\"1s\""),
    ("upstream.pool_idle_timeout", "\"90s\""),
    ("upstream.pool_max_idle", "128"),
    ("upstream.pool_max_connection_age", "\"5m\""),
    ("upstream.http2_keepalive_interval", "\"30s\""),
    ("upstream.http2_keepalive_timeout", "\"10s\""),
    ("cache.ttl", "\"24h\""),
    ("cache.max_size", "\"256MiB\""),
    (
        "cache.terminal_statuses",
        "[\"COMPLETED\", \"FAILED\", \"CLOSED\"]",
    ),
    ("cache.not_found_ttl", "\"30s\""),
    ("cache.shared.url", "\"redis://redis:6379/0\""),
    ("cache.shared.password_env", "\"REDIS_PASSWORD\""),
    (
        "cache.shared.password_file",
        "\"/run/secrets/plextera-gateway/redis-password\"",
    ),
    ("cache.shared.ttl", "\"24h\""),
    ("cache.shared.timeout", "\"50ms\""),
    ("cache.shared.key_prefix", "\"plextera-gateway:\""),
    ("cache.shared.lock_wait", "\"1s\""),
    ("cache.shared.circuit_open_for", "\"5s\""),
    ("watch.max_wait", "\"60s\""),
    ("watch.poll_interval", "\"1s\""),
    ("watch.max_poll_interval", "\"10s\""),
    ("watch.max_held", "10000"),
    ("watch.sse_retry", "\"3s\""),
    ("watch.sse_keepalive", "\"15s\""),
    ("watch.max_stream_duration", "\"5m\""),
    ("webhook.listen", "\"0.0.0.0:8443\""),
    ("webhook.path", "\"/webhooks/plextera\""),
    ("webhook.secrets_env", "\"PLEXTERA_WEBHOOK_SECRETS\""),
    (
        "webhook.secrets_file",
        "\"/run/secrets/plextera-gateway/webhook-secrets\"",
    ),
    ("webhook.tolerance", "\"5m\""),
    ("webhook.max_body_size", "\"1MiB\""),
    ("webhook.safety_poll_interval", "\"30s\""),
    ("telemetry.otlp_endpoint", "\"http://otel-collector:4318\""),
    ("telemetry.ca_file", "\"/etc/plextera-gateway/collector-ca.pem\""),
    ("telemetry.sample_ratio", "0.1"),
    ("telemetry.access_log", "\"errors_or_slow\""),
    ("telemetry.slow_request_threshold", "\"1s\""),
];

/// Longest bad value repeated whole in a message; a longer one (an API key pasted in the wrong
/// place is usually longer) is shown by its start and its length.
const MAX_SHOWN_VALUE: usize = 24;

/// A bad value as a message quotes it: whole when short, else its first characters and length.
pub fn shown(value: &str) -> String {
    let characters = value.chars().count();
    if characters <= MAX_SHOWN_VALUE {
        return format!("{value:?}");
    }
    let start: String = value.chars().take(8).collect();
    format!("{start:?}… ({characters} characters)")
}

/// `key = example`, for a message about `key` (`server.listen` gives `listen = "0.0.0.0:8080"`).
pub fn example(key: &str) -> Option<String> {
    let (_, value) = EXAMPLES.iter().find(|(known, _)| *known == key)?;
    let field = key.rsplit('.').next().unwrap_or(key);
    Some(format!("{field} = {value}"))
}

/// `<key>: <problem>; e.g. <field> = <example>`.
pub fn about(key: &str, problem: impl Display) -> String {
    match example(key) {
        Some(example) => format!("{key}: {problem}; e.g. {example}"),
        None => format!("{key}: {problem}"),
    }
}

/// One line for a TOML error: `line N: <key>: <what is wrong>; e.g. <a valid line>`.
pub fn describe_toml_error(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim().replace('\n', " ");
    let span = error.span();
    let location = span.as_ref().map(|span| {
        let before = &text.as_bytes()[..span.start.min(text.len())];
        let line = before.iter().filter(|byte| **byte == b'\n').count() + 1;
        format!("line {line}: ")
    });
    let location = location.unwrap_or_default();
    let path = key_path(error);
    if let Some(unknown) = unknown_key(&message, path.as_deref()) {
        return format!("{location}{unknown}");
    }
    if message == "duplicate key" {
        // The span is the key's name; a name of this config's own is safe to repeat.
        let name = span
            .and_then(|span| text.get(span))
            .filter(|name| is_known_name(name));
        return match name {
            Some(name) => format!("{location}`{name}` is set twice: keep one"),
            None => format!("{location}a key or table is set twice: keep one"),
        };
    }
    if let (Some(table), Some(field)) = (&path, backticked(&message).next())
        && message.starts_with("missing field")
    {
        return format!(
            "{location}{}",
            about(
                &format!("{table}.{field}"),
                format_args!("is required in [{table}]")
            )
        );
    }
    let message = bound_quoted(&message);
    match path {
        Some(key) => format!("{location}{}", about(&key, message)),
        None => format!("{location}{message}"),
    }
}

/// `message` with every value it quotes (serde's ``unknown variant `…` `` or `invalid type:
/// string "…"` repeat what the file says) bounded as [`shown`] bounds it, so a secret pasted as a
/// value of the wrong type is not repeated whole either.
fn bound_quoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(open) = rest.find(['`', '"']) {
        let quote = rest[open..].chars().next().unwrap_or('"');
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        // The closing quote: the next one not escaped by a backslash (serde writes strings with
        // Rust's escapes).
        let mut escaped = false;
        let close = after.char_indices().find_map(|(at, character)| {
            let closes = character == quote && !escaped;
            escaped = character == '\\' && !escaped;
            closes.then_some(at)
        });
        let Some(close) = close else {
            out.push_str(&rest[open..]);
            return out;
        };
        let quoted = &after[..close];
        if quoted.chars().count() > MAX_SHOWN_VALUE {
            out.push_str(&shown(quoted));
        } else {
            out.push(quote);
            out.push_str(quoted);
            out.push(quote);
        }
        rest = &after[close + quote.len_utf8()..];
    }
    out.push_str(rest);
    out
}

/// For toml's "unknown field `x`, expected one of …": the key is repeated only when it is a near
/// miss of an expected one (a typo, then named with the fix); otherwise it could be a secret
/// pasted in the wrong place, and the message lists the keys that belong there instead.
fn unknown_key(message: &str, table: Option<&str>) -> Option<String> {
    let rest = message.strip_prefix("unknown field ")?;
    let mut names = backticked(rest);
    let unknown = names.next()?;
    let expected: Vec<&str> = names.collect();
    let place = table.map_or_else(|| "at the top level".to_owned(), |table| format!("in [{table}]"));
    let near = expected
        .iter()
        .filter(|known| unknown.len() > 3 && edit_distance(unknown, known) <= 2)
        .min_by_key(|known| edit_distance(unknown, known));
    Some(match near {
        Some(known) => format!("unknown key `{unknown}` {place}: did you mean `{known}`?"),
        None => format!(
            "an unknown key {place} (not repeated, in case it holds a credential); the keys here are {}{}",
            expected.join(", "),
            secret_hint(unknown)
        ),
    })
}

/// The words between backticks in `text`, in order.
fn backticked(text: &str) -> impl Iterator<Item = &str> {
    text.split('`').skip(1).step_by(2)
}

/// Whether `name` is one of this config's own keys or tables.
fn is_known_name(name: &str) -> bool {
    EXAMPLES
        .iter()
        .any(|(key, _)| key.split('.').any(|part| part == name))
}

/// The Levenshtein distance between two short names.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current.push(substitution.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

/// The dotted key the error is about, as toml tracks it.
fn key_path(error: &toml::de::Error) -> Option<String> {
    // toml names the key only when it prints an error without its source text.
    let mut detached = error.clone();
    detached.set_input(None);
    let rendered = detached.to_string();
    rendered
        .lines()
        .rev()
        .find_map(|line| line.strip_prefix("in `")?.strip_suffix('`'))
        .map(str::to_owned)
}

/// For an unknown key that looks like an attempt to put a secret in the file: where it goes.
fn secret_hint(field: &str) -> &'static str {
    let field = field.to_ascii_lowercase();
    let secret_like = ["key", "token", "secret", "password"]
        .iter()
        .any(|word| field.contains(word));
    if secret_like {
        "; secrets never go in this file: name the environment variable that holds one \
         (upstream.api_key_env, server.client_tokens_env, cache.shared.password_env, \
         webhook.secrets_env) or the file (the same keys ending in _file)"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_values_are_shown_by_their_start_and_length() {
        assert_eq!(shown("ten seconds"), "\"ten seconds\"");
        assert_eq!(
            shown("pk_test_5uPerSecretKey0123456789"),
            "\"pk_test_\"… (32 characters)"
        );
    }

    #[test]
    fn values_serde_quotes_are_bounded_and_short_ones_kept() {
        let secret = "sk_live_0123456789abcdefghijklmnopqrstuvwxyz";
        let variant = format!("unknown variant `{secret}`, expected one of `all`, `off`");
        let bounded = bound_quoted(&variant);
        assert!(!bounded.contains("0123456789abcdef"), "{bounded}");
        assert!(
            bounded.contains("(44 characters)") && bounded.contains("`all`"),
            "{bounded}"
        );
        let typed = format!("invalid type: string \"{secret}\", expected a float");
        assert!(!bound_quoted(&typed).contains("0123456789abcdef"));
        assert_eq!(
            bound_quoted("invalid type: string \"abc\""),
            "invalid type: string \"abc\""
        );
        assert_eq!(bound_quoted("odd ` quote"), "odd ` quote");
    }

    #[test]
    fn edit_distance_counts_single_character_edits() {
        assert_eq!(edit_distance("lisen", "listen"), 1);
        assert_eq!(edit_distance("listne", "listen"), 2);
        assert_eq!(edit_distance("api_key", "api_key_env"), 4);
        assert_eq!(edit_distance("", "abc"), 3);
    }
}
