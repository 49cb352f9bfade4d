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
//! refused is tried again at every check until it is taken or the file changes.
//!
//! What this module must not do: log, count or return any secret's content.

use std::path::PathBuf;

use prometheus::Registry;
use ring::digest::{SHA256, digest};

use crate::cache::redis::RedisTier;
use crate::config::Config;
use crate::config::secret_file::{self, SecretName};
use crate::edge::client_auth::ClientTokens;
use crate::ops::metrics::family::{Grid, Label, counter_grid, grid_get, opts};
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

/// `plextera_gateway_secret_reloads_total{secret, result}`, every series exported from the start.
#[derive(Clone)]
pub struct SecretReloadMetrics {
    reloads: Grid<SecretName, ReloadResult>,
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
        })
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
}

struct Watched {
    secret: SecretName,
    path: PathBuf,
    /// The content whose value is in force.
    in_force: Option<Digest>,
    /// The last problem warned about, until a good read.
    problem: Option<String>,
    target: Target,
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
    /// The files in `snapshot`, each put in force through its handle in `targets`.
    pub fn new(snapshot: Snapshot, targets: SecretTargets, metrics: SecretReloadMetrics) -> Self {
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
                    target,
                })
            })
            .collect();
        Self {
            watched,
            from_environment: snapshot.from_environment,
            metrics,
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
            watched.check(&self.metrics).await;
        }
    }
}

impl Watched {
    async fn check(&mut self, metrics: &SecretReloadMetrics) {
        let read = secret_file::read(&self.path);
        let seen = read.as_ref().ok().map(|text| fingerprint(text));
        if seen.is_some() && seen == self.in_force {
            if self.problem.take().is_some() {
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
                metrics.count(self.secret, ReloadResult::Reloaded);
                tracing::info!(secret = self.secret.label(), key = self.secret.file_key(), path = %self.path.display(), "secret reloaded");
            }
            Err(problem) => {
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
    }

    #[tokio::test]
    async fn a_changed_key_file_is_put_in_force_once_and_a_bad_one_kept_out() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("api-key");
        std::fs::write(&path, "first-key\n").expect("write");
        let mut config = Config::default();
        config.upstream.api_key_file = Some(path.clone());
        let key = crate::ApiKey::new("first-key").expect("key");
        let upstream = crate::upstream::Upstream::new(
            &config.upstream,
            &key,
            crate::upstream::metrics::UpstreamMetrics::new(&Registry::new()).expect("metrics"),
            crate::ops::spans::Spans::new(&config.telemetry),
        )
        .expect("upstream");
        let rotation = upstream.key_rotation();
        let registry = Registry::new();
        let metrics = SecretReloadMetrics::new(&registry).expect("metrics");
        let targets = SecretTargets {
            key: rotation.clone(),
            client_tokens: None,
            webhooks: None,
            redis: None,
        };
        let mut files = SecretFiles::new(Snapshot::take(&config), targets, metrics.clone());
        let counted = |result| {
            grid_get(&metrics.reloads, SecretName::ApiKey, result)
                .expect("series")
                .get()
        };

        files.check().await;
        assert_eq!(counted(ReloadResult::Reloaded), 0, "unchanged: nothing to do");
        std::fs::write(&path, "").expect("empty");
        files.check().await;
        files.check().await;
        assert_eq!(counted(ReloadResult::Failed), 1, "one count per distinct problem");
        let first = crate::ApiKey::new("first-key").expect("key");
        assert!(rotation.sends(&first), "the old key is still in force");
        std::fs::write(&path, "second-key\n").expect("rotate");
        files.check().await;
        files.check().await;
        assert_eq!(counted(ReloadResult::Reloaded), 1);
        assert!(rotation.sends(&crate::ApiKey::new("second-key").expect("key")));
    }
}
