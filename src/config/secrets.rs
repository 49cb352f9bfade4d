//! The secrets start-up reads from the environment or files named in the config, never from the
//! config file itself: the upstream key, the client tokens, the Redis password and the webhook
//! signing secrets.

use secrecy::SecretString;

use super::{Config, ConfigError};
use crate::edge::client_auth::ClientTokens;
use crate::upstream::credentials::ApiKey;

/// Everything start-up reads from the environment or secret files rather than the config file.
#[derive(Debug, Clone)]
pub struct Secrets {
    pub api_key: ApiKey,
    /// `Some` when `[server] client_tokens_env` turns client authentication on.
    pub client_tokens: Option<ClientTokens>,
    /// The Redis password, when `[cache.shared] password_env` names one.
    pub redis_password: Option<SecretString>,
    /// The webhook signing secrets (old and new while one is rotated), when `[webhook] listen`
    /// is set.
    pub webhook_secrets: Option<Vec<SecretString>>,
}

impl Secrets {
    /// Reads the key (from `api_key_env` or `api_key_file`), the client tokens (from
    /// `client_tokens_env` or `client_tokens_file`), the Redis password (from `password_env` or
    /// `password_file`) and the webhook signing secrets (from `webhook.secrets_env` or
    /// `secrets_file`). `env` looks up an environment variable.
    pub fn load(config: &Config, env: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let api_key = config.upstream.load_api_key(&env)?;
        let client_tokens = config
            .server
            .load_client_tokens(&env)?
            .map(|tokens| ClientTokens::new(&tokens));
        let redis_password = match &config.cache.shared {
            Some(shared) => shared.load_password(&env)?.map(SecretString::from),
            None => None,
        };
        let webhook_secrets = config.webhook.load_secrets(&env)?;
        Ok(Self {
            api_key,
            client_tokens,
            redis_password,
            webhook_secrets,
        })
    }

    /// Just a key, no client authentication.
    pub fn key_only(api_key: ApiKey) -> Self {
        Self {
            api_key,
            client_tokens: None,
            redis_password: None,
            webhook_secrets: None,
        }
    }
}
