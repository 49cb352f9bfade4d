//! Secrets read from files (the `*_file` keys): one bounded read, and what each secret must look
//! like to be used. Start-up ([`super::secrets`]) and the reloader (`ops::secret_files`) read
//! through here, so a file the gateway starts with and one it rotates to pass the same checks.
//!
//! A problem is described without the file's content, and without its path (the caller names the
//! config key; a log line may add the path).

use std::io::Read;
use std::path::Path;

use crate::upstream::credentials::ApiKey;

/// Largest secret file read; a larger one is refused (a secret is a few hundred bytes at most).
pub const MAX_SECRET_FILE_BYTES: u64 = 64 * 1024;

/// The secrets that can come from a file, as metrics and logs name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretName {
    ApiKey,
    ClientTokens,
    RedisPassword,
    WebhookSecrets,
}

impl SecretName {
    /// Every secret, each once.
    pub const ALL: &'static [Self] = &[
        Self::ApiKey,
        Self::ClientTokens,
        Self::RedisPassword,
        Self::WebhookSecrets,
    ];

    /// The `secret` label and log field.
    pub fn label(self) -> &'static str {
        match self {
            Self::ApiKey => "api_key",
            Self::ClientTokens => "client_tokens",
            Self::RedisPassword => "redis_password",
            Self::WebhookSecrets => "webhook_secrets",
        }
    }

    /// The config key naming the file.
    pub fn file_key(self) -> &'static str {
        match self {
            Self::ApiKey => "upstream.api_key_file",
            Self::ClientTokens => "server.client_tokens_file",
            Self::RedisPassword => "cache.shared.password_file",
            Self::WebhookSecrets => "webhook.secrets_file",
        }
    }

    /// The config key naming the environment variable instead.
    pub fn env_key(self) -> &'static str {
        match self {
            Self::ApiKey => "upstream.api_key_env",
            Self::ClientTokens => "server.client_tokens_env",
            Self::RedisPassword => "cache.shared.password_env",
            Self::WebhookSecrets => "webhook.secrets_env",
        }
    }
}

/// Why a secret file cannot be used. Never holds any of its content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileProblem {
    #[error("cannot be read: {0}")]
    Unreadable(String),
    #[error("was not read within {0:?} (a hung mount?): not read again until that read returns")]
    TimedOut(std::time::Duration),
    #[error("is not a regular file (a directory, a FIFO, a device…)")]
    NotAFile,
    #[error("is larger than {MAX_SECRET_FILE_BYTES} bytes")]
    TooLarge,
    #[error("is not UTF-8 text")]
    NotText,
    #[error("holds no secret (empty or blank)")]
    Empty,
    #[error(
        "does not hold a usable key: a key is one word of visible ASCII (no spaces, line breaks or control characters)"
    )]
    UnusableKey,
}

/// The whole file at `path`, read through any symlinks (a Kubernetes Secret volume's files are
/// links through `..data`), at most [`MAX_SECRET_FILE_BYTES`]. Only a regular file is read: it is
/// opened non-blocking and checked first, so a FIFO put at the path (which would block the open
/// until some writer came, start-up and `--check-config` included) is refused at once.
pub fn read(path: &Path) -> Result<String, FileProblem> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path)
        .map_err(|error| FileProblem::Unreadable(error.to_string()))?;
    let metadata = file
        .metadata()
        .map_err(|error| FileProblem::Unreadable(error.to_string()))?;
    if !metadata.is_file() {
        return Err(FileProblem::NotAFile);
    }
    let mut bytes = Vec::new();
    file.take(MAX_SECRET_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|error| FileProblem::Unreadable(error.to_string()))?;
    if bytes.len() as u64 > MAX_SECRET_FILE_BYTES {
        return Err(FileProblem::TooLarge);
    }
    String::from_utf8(bytes).map_err(|_| FileProblem::NotText)
}

/// The API key: the text without surrounding whitespace, one word of visible ASCII.
pub fn api_key(text: &str) -> Result<ApiKey, FileProblem> {
    let key = text.trim();
    if key.is_empty() {
        return Err(FileProblem::Empty);
    }
    ApiKey::new(key).ok_or(FileProblem::UnusableKey)
}

/// A list of secrets (client tokens, webhook signing secrets): one per line or comma-separated,
/// blanks around each ignored, as the environment form (comma-separated) is read. At least one.
pub fn list(text: &str) -> Result<Vec<String>, FileProblem> {
    let items: Vec<String> = text
        .split([',', '\n'])
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(str::to_owned)
        .collect();
    if items.is_empty() {
        return Err(FileProblem::Empty);
    }
    Ok(items)
}

/// A password: the text without surrounding whitespace (the line break editors add), not empty.
pub fn password(text: &str) -> Result<String, FileProblem> {
    let password = text.trim();
    if password.is_empty() {
        return Err(FileProblem::Empty);
    }
    Ok(password.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_take_lines_or_commas() {
        assert_eq!(list("a\nb, c\n\n").expect("three"), ["a", "b", "c"]);
        assert_eq!(list(" \n , \n"), Err(FileProblem::Empty));
    }

    #[test]
    fn keys_and_passwords_are_trimmed_and_checked() {
        assert_eq!(api_key("  k-1\n").expect("key").expose(), "k-1");
        assert_eq!(api_key("\n").map(|_| ()), Err(FileProblem::Empty));
        assert_eq!(
            api_key("new-key\nold-k").map(|_| ()),
            Err(FileProblem::UnusableKey)
        );
        assert_eq!(password(" p w \n").expect("password"), "p w");
        assert_eq!(password(""), Err(FileProblem::Empty));
    }

    #[test]
    fn files_are_read_whole_within_the_bound() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("secret");
        std::fs::write(&path, "s3cret\n").expect("write");
        assert_eq!(read(&path).expect("read"), "s3cret\n");
        std::fs::write(&path, vec![b'a'; MAX_SECRET_FILE_BYTES as usize + 1]).expect("write");
        assert_eq!(read(&path), Err(FileProblem::TooLarge));
        std::fs::write(&path, [0xff, 0xfe]).expect("write");
        assert_eq!(read(&path), Err(FileProblem::NotText));
        let missing = read(&dir.path().join("absent")).expect_err("absent");
        assert!(missing.to_string().contains("No such file"), "{missing}");
        assert!(!missing.to_string().contains("absent"), "{missing}");
    }
}
