//! Reading the config values whose errors serde would word vaguely ("expected a duration",
//! "invalid socket address syntax", "expected parsable string"): each error here says what was
//! given and what a valid value looks like. The file's line and the key's name are added around
//! it (see [`super::report`]).
//!
//! Fields that a key could land in by mistake (the names of environment variables, the key file)
//! are read by [`env_var_name`] and [`secret_path`], whose errors never repeat what was given.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use serde::Serializer;
use serde::de::{self, Deserialize, Deserializer, Visitor};

use super::report::shown;

const DURATION_HELP: &str = "use a number and a unit, e.g. \"10s\", \"250ms\" or \"1m 30s\"";

fn parse_duration<E: de::Error>(text: &str) -> Result<Duration, E> {
    humantime::parse_duration(text)
        .map_err(|_| E::custom(format_args!("{} is not a duration: {DURATION_HELP}", shown(text))))
}

/// `"250ms"`, `"10s"`, `"1h 30m"`; written back the same way (`--check-config`).
pub mod duration {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        parse_duration(&text)
    }

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&humantime::format_duration(*value).to_string())
    }
}

/// An optional [`duration`].
pub mod optional_duration {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Duration>, D::Error> {
        let text = String::deserialize(deserializer)?;
        parse_duration(&text).map(Some)
    }

    pub fn serialize<S: Serializer>(value: &Option<Duration>, serializer: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(value) => super::duration::serialize(value, serializer),
            None => serializer.serialize_none(),
        }
    }
}

/// A size as [`size`] reads it back: whole GiB, MiB or KiB when it is one (`"256MiB"`), else a
/// number of bytes. (bytesize's own `Display` rounds, e.g. to `"268.4 MB"`.)
pub fn serialize_size<S: Serializer>(value: &ByteSize, serializer: S) -> Result<S::Ok, S::Error> {
    let bytes = value.as_u64();
    for (unit, name) in [(1u64 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")] {
        if bytes >= unit && bytes.is_multiple_of(unit) {
            return serializer.serialize_str(&format!("{}{name}", bytes / unit));
        }
    }
    serializer.serialize_u64(bytes)
}

/// `"256MiB"`, `"512KiB"`, or a number of bytes.
pub fn size<'de, D: Deserializer<'de>>(deserializer: D) -> Result<ByteSize, D::Error> {
    struct SizeVisitor;

    impl Visitor<'_> for SizeVisitor {
        type Value = ByteSize;

        fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
            formatter.write_str("a size such as \"256MiB\" or \"512KiB\", or a number of bytes")
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<ByteSize, E> {
            text.parse().map_err(|_| {
                E::custom(format_args!(
                    "{} is not a size: use e.g. \"256MiB\", \"512KiB\" or a number of bytes",
                    shown(text)
                ))
            })
        }

        fn visit_u64<E: de::Error>(self, bytes: u64) -> Result<ByteSize, E> {
            Ok(ByteSize::b(bytes))
        }

        fn visit_i64<E: de::Error>(self, bytes: i64) -> Result<ByteSize, E> {
            u64::try_from(bytes)
                .map(ByteSize::b)
                .map_err(|_| E::custom(format_args!("{bytes} is not a size: sizes are not negative")))
        }
    }

    deserializer.deserialize_any(SizeVisitor)
}

/// `"0.0.0.0:8080"`: an IP address and a port; host names are not looked up.
pub fn socket_addr<'de, D: Deserializer<'de>>(deserializer: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(deserializer)?;
    text.parse().map_err(|_| {
        de::Error::custom(format_args!(
            "{} is not an IP address and port (host names such as localhost are not looked up): \
             use e.g. \"0.0.0.0:8080\" for every interface, \"127.0.0.1:9090\" for loopback, \"[::]:8080\" for IPv6",
            shown(&text)
        ))
    })
}

/// An optional [`socket_addr`]: absent means off.
pub fn optional_socket_addr<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<SocketAddr>, D::Error> {
    socket_addr(deserializer).map(Some)
}

/// Whether `name` can be an environment variable's name in a shell: letters, digits and `_`, not
/// starting with a digit.
pub fn is_env_var_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|first| first.is_ascii_alphabetic() || first == b'_')
        && bytes.all(|byte| byte.is_ascii_alphanumeric() || byte == b'_')
}

/// The name of an environment variable that holds a secret. A key pasted here by mistake must
/// not be printed back, so the error says what is expected and never what was given.
pub fn env_var_name<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    const EXPECTED: &str = "must name an environment variable (letters, digits and _, not starting with a \
         digit), e.g. \"PLEXTERA_API_KEY\"; the secret itself goes in that variable, never in this file \
         (the value given is not shown)";
    let name = deserializer.deserialize_any(Opaque(EXPECTED))?;
    if is_env_var_name(&name) {
        Ok(Some(name))
    } else {
        Err(de::Error::custom(EXPECTED))
    }
}

/// The path of a file that holds a secret; like [`env_var_name`], its errors never repeat it.
pub fn secret_path<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<PathBuf>, D::Error> {
    const EXPECTED: &str = "must be the path of a file that holds the secret, e.g. \"/run/secrets/plextera-api-key\" \
         (the value given is not shown)";
    let path = deserializer.deserialize_any(Opaque(EXPECTED))?;
    if path.is_empty() {
        return Err(de::Error::custom(EXPECTED));
    }
    Ok(Some(PathBuf::from(path)))
}

/// Accepts a string; anything else is refused with a fixed message that does not describe it.
struct Opaque(&'static str);

impl Opaque {
    fn refuse<T, E: de::Error>(&self) -> Result<T, E> {
        Err(E::custom(self.0))
    }
}

impl<'de> Visitor<'de> for Opaque {
    type Value = String;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.0)
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<String, E> {
        Ok(text.to_owned())
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<String, E> {
        self.refuse()
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<String, E> {
        self.refuse()
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<String, E> {
        self.refuse()
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<String, E> {
        self.refuse()
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<String, A::Error> {
        self.refuse()
    }

    fn visit_map<A: de::MapAccess<'de>>(self, _: A) -> Result<String, A::Error> {
        self.refuse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_variable_names_are_words() {
        for name in ["PLEXTERA_API_KEY", "_x", "a1", "REDIS_PASSWORD"] {
            assert!(is_env_var_name(name), "{name}");
        }
        for name in ["", "1ABC", "sk-live-123", "pk/abc+def==", "A B", "KEY=", "é"] {
            assert!(!is_env_var_name(name), "{name}");
        }
    }
}
