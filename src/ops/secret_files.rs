//! Secrets re-read from their files (`upstream.api_key_file`, `server.client_tokens_file`,
//! `cache.shared.password_file`, `webhook.secrets_file`) while the gateway serves, so a rotation
//! needs no restart and no signal.
//!
//! [`SecretFiles::check`] reads every file through its path (the binary calls it every
//! `server.secrets_check_interval`, and at once on SIGHUP). A Kubernetes Secret volume is updated
//! by an atomic symlink swap (`..data` is pointed at a new directory; each file is a link through
//! it), so neither the link's inode nor its mtime changes: what is compared is a SHA-256 of the
//! content. A changed, valid value is swapped in whole (the key by [`KeyRotation::replace`], the
//! tokens by [`ClientTokens::replace`], the signing secrets by [`Webhooks::replace_secrets`], the
//! Redis password by [`RedisTier::use_password`], which proves it on a new connection first).
//! Content that cannot be used (missing, unreadable, empty, not a usable key, or a password Redis
//! refuses) keeps the value in force and is warned about once per distinct problem, naming the
//! config key and the path, never the content; the next good read recovers. A password Redis
//! refused is tried again at every check until it is taken or the file changes. While a file's
//! problem lasts, `plextera_gateway_secret_file_failing{secret}` is 1 (the counter of failures
//! moves once per distinct problem; the gauge says the rotation is still broken).
//!
//! Each file is read on a blocking thread (`spawn_blocking`), given [`READ_TIMEOUT`] (or the
//! check interval, if shorter): a hung mount (FUSE, NFS, a CSI driver) must not stall the runtime
//! that serves. A read that times out is a problem like any other; it is left running, and no
//! other read of that file starts until it returns, so a hung file holds at most one thread.
//!
//! What this module must not do: log, count or return any secret's content.

use std::path::{Path, PathBuf};
use std::time::Duration;

use prometheus::{IntGauge, IntGaugeVec, Registry};
use ring::digest::{SHA256, digest};

use crate::cache::redis::RedisTier;
use crate::config::Config;
use crate::config::secret_file::{self, FileProblem, SecretName};
use crate::edge::client_auth::ClientTokens;
use crate::ops::metrics::family::{ByLabel, Grid, Label, counter_grid, grid_get, opts, register};
use crate::upstream::credentials::KeyRotation;
use crate::webhook::Webhooks;

/// What one reload attempt came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadResult {
    /// A new value is in force.
    Reloaded,
    /// The file changed but could not be used: the value in force was kept.
    Failed,
}

impl Label for ReloadResult {
    const ALL: &'static [Self] = &[Self::Reloaded, Self::Failed];

    fn label(self) -> &'static str {
        match self {
            Self::Reloaded => "reloaded",
            Self::Failed => "failed",
        }
    }
}

impl Label for SecretName {
    const ALL: &'static [Self] = SecretName::ALL;

    fn label(self) -> &'static str {
        SecretName::label(self)
    }
}

/// The longest a secret file's read is waited for (shorter if the check interval is).
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// `plextera_gateway_secret_reloads_total{secret, result}` and
/// `plextera_gateway_secret_file_failing{secret}`, every series exported from the start.
#[derive(Clone)]
pub struct SecretReloadMetrics {
    reloads: Grid<SecretName, ReloadResult>,
    failing: ByLabel<SecretName, IntGauge>,
}

impl SecretReloadMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        Ok(Self {
            reloads: counter_grid(
                registry,
                opts(
                    "secret_reloads_total",
                    "Secrets re-read from their files while serving, by secret (api_key, client_tokens, redis_password, webhook_secrets) and result (reloaded: a new value is in force; failed: the file changed but could not be used, the value in force was kept; counted once per distinct problem).",
                ),
                ["secret", "result"],
                |_, _| true,
            )?,
            failing: {
                let family = register(
                    registry,
                    IntGaugeVec::new(
                        opts(
                            "secret_file_failing",
                            "1 while a secret's file (api_key, client_tokens, redis_password, webhook_secrets) has a problem that keeps it from being used (missing, unreadable, timed out, empty, not usable, refused by Redis): the value in force is the previous one; else 0.",
                        ),
                        &["secret"],
                    )?,
                )?;
                ByLabel::of(|secret: SecretName| family.with_label_values(&[secret.label()]))
            },
        })
    }

    fn set_failing(&self, secret: SecretName, failing: bool) {
        if let Some(gauge) = self.failing.get(secret) {
            gauge.set(i64::from(failing));
        }
    }

    fn count(&self, secret: SecretName, result: ReloadResult) {
        if let Some(counter) = grid_get(&self.reloads, secret, result) {
            counter.inc();
        }
    }
}

/// The handles that put a new secret in force.
#[derive(Clone)]
pub struct SecretTargets {
    pub key: KeyRotation,
    /// `Some` when client authentication is on.
    pub client_tokens: Option<ClientTokens>,
    /// `Some` when the webhook listener is on.
    pub webhooks: Option<Webhooks>,
    /// `Some` when the Redis tier is on.
    pub redis: Option<RedisTier>,
}

/// Where each secret comes from, and the content of each file as it was when the gateway read its
/// secrets at start-up. Taken *before* the secrets are read, so a file changed in between is seen
/// as changed (and put in force again) rather than missed.
pub struct Snapshot {
    files: Vec<(SecretName, PathBuf, Option<Digest>)>,
    from_environment: Vec<SecretName>,
}

type Digest = [u8; 32];

fn fingerprint(text: &str) -> Digest {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, text.as_bytes()).as_ref());
    out
}

impl Snapshot {
    /// Reads every secret file `config` names, for the secrets in use.
    pub fn take(config: &Config) -> Self {
        let shared = config.cache.shared.as_ref();
        let webhook_on = config.webhook.listen.is_some();
        let sources = [
            (SecretName::ApiKey, true, config.upstream.api_key_file.as_ref()),
            (
                SecretName::ClientTokens,
                config.server.client_tokens_env.is_some(),
                config.server.client_tokens_file.as_ref(),
            ),
            (
                SecretName::RedisPassword,
                shared.is_some_and(|shared| shared.password_env.is_some()),
                shared.and_then(|shared| shared.password_file.as_ref()),
            ),
            (
                SecretName::WebhookSecrets,
                webhook_on && config.webhook.secrets_env.is_some(),
                config.webhook.secrets_file.as_ref().filter(|_| webhook_on),
            ),
        ];
        let mut snapshot = Self {
            files: Vec::new(),
            from_environment: Vec::new(),
        };
        for (secret, env, file) in sources {
            match file {
                Some(path) => {
                    let seen = secret_file::read(path).ok().map(|text| fingerprint(&text));
                    snapshot.files.push((secret, path.clone(), seen));
                }
                None if env => snapshot.from_environment.push(secret),
                None => {}
            }
        }
        snapshot
    }
}

/// Every secret file, and what is in force from it.
pub struct SecretFiles {
    watched: Vec<Watched>,
    from_environment: Vec<SecretName>,
    metrics: SecretReloadMetrics,
    read_timeout: Duration,
}

struct Watched {
    secret: SecretName,
    path: PathBuf,
    /// The content whose value is in force.
    in_force: Option<Digest>,
    /// The last problem warned about, until a good read.
    problem: Option<String>,
    /// A read that timed out and has not returned yet: the next check waits on it rather than
    /// starting another.
    pending: Option<tokio::task::JoinHandle<Result<String, FileProblem>>>,
    target: Target,
    /// Reads the file: [`secret_file::read`]; the tests put a read that hangs here.
    read_file: fn(&Path) -> Result<String, FileProblem>,
}

enum Target {
    Key(KeyRotation),
    ClientTokens(ClientTokens),
    Webhooks(Webhooks),
    Redis(RedisTier),
}

impl Target {
    /// Puts the secret `text` holds in force, or says why it cannot be used.
    async fn apply(&self, text: &str) -> Result<(), String> {
        match self {
            Self::Key(rotation) => {
                rotation.replace(&secret_file::api_key(text).map_err(|problem| problem.to_string())?);
            }
            Self::ClientTokens(tokens) => {
                tokens.replace(&secret_file::list(text).map_err(|problem| problem.to_string())?);
            }
            Self::Webhooks(webhooks) => {
                webhooks.replace_secrets(&secret_file::list(text).map_err(|problem| problem.to_string())?);
            }
            Self::Redis(redis) => {
                let password = secret_file::password(text).map_err(|problem| problem.to_string())?;
                redis
                    .use_password(password)
                    .await
                    .map_err(|refused| refused.to_string())?;
            }
        }
        Ok(())
    }
}

impl SecretFiles {
    /// The files in `snapshot`, each put in force through its handle in `targets`, read every
    /// `interval` (which also bounds a read's wait, with [`READ_TIMEOUT`]).
    pub fn new(
        snapshot: Snapshot,
        targets: SecretTargets,
        metrics: SecretReloadMetrics,
        interval: Duration,
    ) -> Self {
        let watched = snapshot
            .files
            .into_iter()
            .filter_map(|(secret, path, in_force)| {
                let target = match secret {
                    SecretName::ApiKey => Target::Key(targets.key.clone()),
                    SecretName::ClientTokens => Target::ClientTokens(targets.client_tokens.clone()?),
                    SecretName::WebhookSecrets => Target::Webhooks(targets.webhooks.clone()?),
                    SecretName::RedisPassword => Target::Redis(targets.redis.clone()?),
                };
                Some(Watched {
                    secret,
                    path,
                    in_force,
                    problem: None,
                    pending: None,
                    target,
                    read_file: secret_file::read,
                })
            })
            .collect();
        Self {
            watched,
            from_environment: snapshot.from_environment,
            metrics,
            read_timeout: READ_TIMEOUT.min(interval),
        }
    }

    /// Whether any secret comes from a file (otherwise there is nothing to check).
    pub fn any(&self) -> bool {
        !self.watched.is_empty()
    }

    /// The secrets read from the environment, which cannot change while the process runs.
    pub fn from_environment(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.from_environment.iter().map(|secret| secret.label())
    }

    /// Reads every file once and puts each changed, valid value in force (see the module
    /// documentation).
    pub async fn check(&mut self) {
        for watched in &mut self.watched {
            watched.check(&self.metrics, self.read_timeout).await;
        }
    }
}

impl Watched {
    async fn check(&mut self, metrics: &SecretReloadMetrics, timeout: Duration) {
        let read = self.read(timeout).await;
        let seen = read.as_ref().ok().map(|text| fingerprint(text));
        if seen.is_some() && seen == self.in_force {
            if self.problem.take().is_some() {
                metrics.set_failing(self.secret, false);
                tracing::info!(secret = self.secret.label(), key = self.secret.file_key(), path = %self.path.display(), "secret file holds the value in force again");
            }
            return;
        }
        let applied = match read {
            Ok(text) => self.target.apply(&text).await,
            Err(problem) => Err(problem.to_string()),
        };
        match applied {
            Ok(()) => {
                self.in_force = seen;
                self.problem = None;
                metrics.set_failing(self.secret, false);
                metrics.count(self.secret, ReloadResult::Reloaded);
                tracing::info!(secret = self.secret.label(), key = self.secret.file_key(), path = %self.path.display(), "secret reloaded");
            }
            Err(problem) => {
                metrics.set_failing(self.secret, true);
                if self.problem.as_deref() != Some(problem.as_str()) {
                    metrics.count(self.secret, ReloadResult::Failed);
                    tracing::warn!(
                        secret = self.secret.label(),
                        key = self.secret.file_key(),
                        path = %self.path.display(),
                        %problem,
                        "secret file not used: keeping the value in force"
                    );
                    self.problem = Some(problem);
                }
            }
        }
    }

    /// The file's content, read on a blocking thread and waited for at most `timeout`; a read
    /// still running from an earlier check is waited on instead of starting another.
    async fn read(&mut self, timeout: Duration) -> Result<String, FileProblem> {
        let mut reading = match self.pending.take() {
            Some(reading) => reading,
            None => {
                let path = self.path.clone();
                let read_file = self.read_file;
                tokio::task::spawn_blocking(move || read_file(&path))
            }
        };
        match tokio::time::timeout(timeout, &mut reading).await {
            Ok(Ok(read)) => read,
            Ok(Err(_)) => Err(FileProblem::Unreadable("the read failed".to_owned())),
            Err(_) => {
                self.pending = Some(reading);
                Err(FileProblem::TimedOut(timeout))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_distinct_and_valid() {
        crate::ops::metrics::family::tests::labels_are_distinct_and_valid::<SecretName>();
        crate::ops::metrics::family::tests::labels_are_distinct_and_valid::<ReloadResult>();
    }

    #[test]
    fn every_series_is_exported_from_the_start() {
        let registry = Registry::new();
        SecretReloadMetrics::new(&registry).expect("registers");
        let families = registry.gather();
        let reloads = families
            .iter()
            .find(|family| family.name() == "plextera_gateway_secret_reloads_total")
            .expect("exported");
        assert_eq!(reloads.get_metric().len(), 4 * 2);
        let failing = families
            .iter()
            .find(|family| family.name() == "plextera_gateway_secret_file_failing")
            .expect("exported");
        assert_eq!(failing.get_metric().len(), 4);
    }

    /// Watches an API key file at `path` (holding "first-key" at start).
    fn watch_key_file(
        path: &std::path::Path,
        interval: Duration,
    ) -> (SecretFiles, KeyRotation, SecretReloadMetrics) {
        let mut config = Config::default();
        config.upstream.api_key_file = Some(path.to_owned());
        let key = crate::ApiKey::new("first-key").expect("key");
        let upstream = crate::upstream::Upstream::new(
            &config.upstream,
            &key,
            crate::upstream::metrics::UpstreamMetrics::new(&Registry::new()).expect("metrics"),
            crate::ops::spans::Spans::new(&config.telemetry),
        )
        .expect("upstream");
        let rotation = upstream.key_rotation();
        let metrics = SecretReloadMetrics::new(&Registry::new()).expect("metrics");
        let targets = SecretTargets {
            key: rotation.clone(),
            client_tokens: None,
            webhooks: None,
            redis: None,
        };
        let files = SecretFiles::new(Snapshot::take(&config), targets, metrics.clone(), interval);
        (files, rotation, metrics)
    }

    /// Releases every read still blocked on the FIFO at `.0`, so a failed test ends rather than
    /// hangs (the runtime waits for its blocking threads).
    struct ReleaseReaders(std::path::PathBuf);

    impl Drop for ReleaseReaders {
        fn drop(&mut self) {
            use std::os::unix::fs::OpenOptionsExt;
            /// Linux's O_NONBLOCK: opening a FIFO to write fails at once when no reader waits.
            const O_NONBLOCK: i32 = 0o4000;
            for _ in 0..16 {
                let opened = std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(O_NONBLOCK)
                    .open(&self.0);
                if opened.is_err() {
                    break;
                }
            }
        }
    }

    /// Replaces the file at `path` by a FIFO; the guard releases any read left blocked on it.
    fn fifo_in_place_of(path: &Path) -> ReleaseReaders {
        std::fs::remove_file(path).expect("remove");
        let made = std::process::Command::new("mkfifo")
            .arg(path)
            .status()
            .expect("mkfifo runs");
        assert!(made.success(), "mkfifo");
        ReleaseReaders(path.to_owned())
    }

    fn failing(metrics: &SecretReloadMetrics) -> i64 {
        metrics.failing.get(SecretName::ApiKey).expect("series").get()
    }

    #[tokio::test]
    async fn a_changed_key_file_is_put_in_force_once_and_a_bad_one_kept_out() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("api-key");
        std::fs::write(&path, "first-key\n").expect("write");
        let (mut files, rotation, metrics) = watch_key_file(&path, Duration::from_secs(5));
        let counted = |result| {
            grid_get(&metrics.reloads, SecretName::ApiKey, result)
                .expect("series")
                .get()
        };

        files.check().await;
        assert_eq!(counted(ReloadResult::Reloaded), 0, "unchanged: nothing to do");
        assert_eq!(failing(&metrics), 0);
        std::fs::write(&path, "").expect("empty");
        files.check().await;
        files.check().await;
        assert_eq!(counted(ReloadResult::Failed), 1, "one count per distinct problem");
        assert_eq!(
            failing(&metrics),
            1,
            "still failing after the count stopped moving"
        );
        let first = crate::ApiKey::new("first-key").expect("key");
        assert!(rotation.sends(&first), "the old key is still in force");
        std::fs::write(&path, "second-key\n").expect("rotate");
        files.check().await;
        files.check().await;
        assert_eq!(counted(ReloadResult::Reloaded), 1);
        assert_eq!(failing(&metrics), 0, "recovered");
        assert!(rotation.sends(&crate::ApiKey::new("second-key").expect("key")));
        std::fs::write(&path, "").expect("empty");
        files.check().await;
        std::fs::write(&path, "second-key\n").expect("back to the value in force");
        files.check().await;
        assert_eq!(failing(&metrics), 0, "back to the value in force: recovered");
    }

    /// A blocking read of a FIFO stands in for a hung mount: opening a FIFO for reading blocks
    /// until a writer comes. (The gateway's own read refuses a FIFO at once: see
    /// `a_fifo_is_refused_at_once`.)
    fn read_blocking(path: &Path) -> Result<String, FileProblem> {
        std::fs::read_to_string(path).map_err(|error| FileProblem::Unreadable(error.to_string()))
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_fifo_is_refused_at_once() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("api-key");
        std::fs::write(&path, "first-key\n").expect("write");
        let (mut files, rotation, metrics) = watch_key_file(&path, Duration::from_secs(30));
        let _release = fifo_in_place_of(&path);
        files.check().await;
        assert_eq!(failing(&metrics), 1);
        assert_eq!(
            files.watched[0].problem.as_deref(),
            Some(FileProblem::NotAFile.to_string().as_str())
        );
        assert!(files.watched[0].pending.is_none(), "no read left hanging");
        assert!(rotation.sends(&crate::ApiKey::new("first-key").expect("key")));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_hung_read_times_out_is_not_started_again_and_is_used_when_it_returns() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("api-key");
        std::fs::write(&path, "first-key\n").expect("write");
        let (mut files, rotation, metrics) = watch_key_file(&path, Duration::from_millis(200));
        files.watched[0].read_file = read_blocking;
        let _release = fifo_in_place_of(&path);

        let started = std::time::Instant::now();
        files.check().await;
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the check gave up on the read"
        );
        assert_eq!(failing(&metrics), 1);
        assert_eq!(
            files.watched[0]
                .problem
                .as_deref()
                .map(|p| p.starts_with("was not read within")),
            Some(true)
        );
        files.check().await;
        assert!(
            files.watched[0].pending.is_some(),
            "still waiting on the first read"
        );
        assert_eq!(
            grid_get(&metrics.reloads, SecretName::ApiKey, ReloadResult::Failed)
                .expect("series")
                .get(),
            1,
            "one problem, counted once"
        );
        // The writer releases the one hung read; a second read would still be blocked in open.
        let writer = tokio::task::spawn_blocking({
            let path = path.clone();
            move || {
                use std::io::Write;
                let mut fifo = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .expect("open the FIFO");
                fifo.write_all(b"third-key\n").expect("write");
            }
        });
        writer.await.expect("writer");
        files.check().await;
        assert_eq!(failing(&metrics), 0, "the late read is used");
        assert!(rotation.sends(&crate::ApiKey::new("third-key").expect("key")));
    }
}
