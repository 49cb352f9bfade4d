//! The `plextera-gateway` binary: command line, logging, config, then the library does the rest.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use plextera_gateway::app::AppError;
use plextera_gateway::config::{Config, DEFAULT_API_KEY_ENV, DEFAULT_CONFIG_PATH, PACKAGED_CONFIG_PATH};
use plextera_gateway::ops::health_check;
use plextera_gateway::ops::secret_files::{SecretFiles, Snapshot};
use plextera_gateway::ops::systemd::{self, Notifier};
use plextera_gateway::ops::telemetry::{self, LogFormat};
use plextera_gateway::preflight::preflight;
use plextera_gateway::webhook::signature;
use plextera_gateway::{ApiKey, Gateway, Secrets, StartError, demo};

/// mimalloc: the request path allocates small, short-lived buffers (headers, bodies, futures) on
/// every request; mimalloc serves them in fewer instructions than glibc's malloc (see the
/// docs/performance.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit status for a configuration the gateway refuses (sysexits' EX_CONFIG): restarting will
/// not help (systemd: `RestartPreventExitStatus=78`).
const EXIT_CONFIG: u8 = 78;
/// Exit status when a listen address cannot be bound, e.g. a port still held by the previous
/// process (sysexits' EX_TEMPFAIL): a restart may well succeed.
const EXIT_BIND: u8 = 75;
/// Exit status for another failure of the operating system at start-up, e.g. the async runtime
/// cannot be created (sysexits' EX_OSERR).
const EXIT_OS: u8 = 71;
/// Exit status for a failure of the gateway's own (sysexits' EX_SOFTWARE): a bug.
const EXIT_SOFTWARE: u8 = 70;

/// Caching reverse proxy for Plextera's Get-run endpoint.
#[derive(Debug, Parser)]
#[command(name = "plextera-gateway", version, about)]
struct Cli {
    /// The TOML configuration file [default: config/gateway.toml if it exists, else
    /// /etc/plextera-gateway/gateway.toml].
    #[arg(long)]
    config: Option<PathBuf>,
    /// Serve a built-in simulated upstream on loopback and use it: no key, no network needed.
    #[arg(long)]
    demo: bool,
    /// Log output format. Text is coloured only when stdout is a terminal and NO_COLOR is unset.
    #[arg(long, value_enum, default_value_t)]
    log_format: LogFormat,
    /// Check the running gateway's /healthz on the configured admin port, then exit 0 (healthy) or 1.
    #[arg(long, conflicts_with = "demo")]
    health_check: bool,
    /// Check the config and every secret it names, print the effective configuration (secrets
    /// shown only by where they come from), then exit 0, or 78 with one line naming the problem.
    /// Binds nothing, starts nothing.
    #[arg(long, conflicts_with_all = ["demo", "health_check"])]
    check_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Print an X-Plextera-Signature value for the event body read from standard input, signed
    /// as Plextera signs its events: for testing a webhook set-up with curl.
    SignWebhook {
        /// The environment variable holding the signing secret (the first, when it holds several
        /// comma-separated); the secret is never taken on the command line, where `ps` shows it.
        #[arg(long, default_value = "PLEXTERA_WEBHOOK_SECRETS")]
        secrets_env: String,
        /// Sign as of this Unix time, in seconds (default: now).
        #[arg(long)]
        timestamp: Option<u64>,
    },
}

fn main() -> ExitCode {
    without_transparent_huge_pages();
    let cli = Cli::parse();
    if let Some(Command::SignWebhook {
        secrets_env,
        timestamp,
    }) = &cli.command
    {
        return sign_webhook(secrets_env, *timestamp);
    }
    telemetry::init(cli.log_format);
    let source = match config_path(&cli) {
        Ok(source) => source,
        Err(problem) => return refuse(problem),
    };
    let mut config = match &source {
        Some(path) => match Config::load(path) {
            Ok(config) => config,
            Err(error) => return refuse(error.to_string()),
        },
        None => Config::default(),
    };
    if cli.check_config {
        return check_config(&config, source.as_deref());
    }
    if cli.health_check {
        let admin = health_check::local_address(config.server.admin_listen);
        return match health_check::check(admin, health_check::TIMEOUT) {
            Ok(()) => ExitCode::SUCCESS,
            Err(problem) => {
                eprintln!("plextera-gateway: unhealthy: {problem}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(limit) = raise_descriptor_limit(config.server.max_connections.get()) {
        bound_upstream_calls(&mut config, limit);
    }
    let runtime = match runtime(config.server.worker_threads) {
        Ok(runtime) => runtime,
        Err(error) => return fail(EXIT_OS, format!("cannot start the async runtime: {error}")),
    };
    let status = runtime.block_on(run(cli, source, config));
    // Not waiting for blocking work: a secret file's read hung on a dead mount must not keep the
    // process from exiting once the drain is done.
    runtime.shutdown_timeout(SHUTDOWN_BLOCKING_WAIT);
    status
}

/// How long exit waits for work on blocking threads (a secret file's read) after the drain.
const SHUTDOWN_BLOCKING_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// The config file: `--config`, else the first of [`DEFAULT_CONFIG_PATH`] (relative to the
/// working directory) and [`PACKAGED_CONFIG_PATH`] that exists. `None`: neither exists and
/// `--demo` runs on the defaults; without `--demo` that is refused, naming both.
fn config_path(cli: &Cli) -> Result<Option<PathBuf>, String> {
    find_config(
        cli.config.as_deref(),
        cli.demo,
        [DEFAULT_CONFIG_PATH, PACKAGED_CONFIG_PATH],
        |path| path.exists(),
    )
}

/// [`config_path`] with the places looked in (the working directory's, then the packaged one) and
/// the test for a file's presence handed in, so every branch can be tested without a file in
/// `/etc`.
fn find_config(
    explicit: Option<&std::path::Path>,
    demo: bool,
    [relative, packaged]: [&str; 2],
    exists: impl Fn(&std::path::Path) -> bool,
) -> Result<Option<PathBuf>, String> {
    if let Some(path) = explicit {
        return Ok(Some(path.to_owned()));
    }
    let found = [relative, packaged]
        .into_iter()
        .map(PathBuf::from)
        .find(|path| exists(path));
    match found {
        Some(path) => Ok(Some(path)),
        None if demo => Ok(None),
        None => Err(format!(
            "no config file: neither {relative} (in the working directory) nor {packaged} exists; name one with --config"
        )),
    }
}

/// `--check-config`: every secret the config names must be found and usable; then the effective
/// configuration is printed (as TOML the gateway accepts back) and the status is 0, else 78.
fn check_config(config: &Config, source: Option<&std::path::Path>) -> ExitCode {
    let secrets = match Secrets::load(config, |name| std::env::var(name).ok()) {
        Ok(secrets) => secrets,
        Err(error) => return refuse(error.to_string()),
    };
    if let Err(error) = preflight(config, &secrets) {
        return refuse(error.to_string());
    }
    let text = match toml::to_string(config) {
        Ok(text) => text,
        Err(error) => return fail(EXIT_SOFTWARE, format!("cannot print the configuration: {error}")),
    };
    let source = source.map_or_else(
        || "built-in defaults".to_owned(),
        |path| path.display().to_string(),
    );
    println!("# plextera-gateway --check-config: the configuration in {source} is valid.");
    println!("# Below, the effective configuration (defaults filled in; unset optional keys left out).");
    println!("# Secrets are shown only by their source; each one was found and is usable.");
    if config.upstream.api_key_env.is_none() && config.upstream.api_key_file.is_none() {
        println!("# The API key is read from the environment variable {DEFAULT_API_KEY_ENV} (the default).");
    }
    print!("{text}");
    ExitCode::SUCCESS
}

/// Opts this process out of transparent huge pages, before anything sizeable is allocated.
///
/// With THP set to `always` (common on distributions), every 2 MiB region the allocator has
/// touched at all can be backed by a huge page and counted whole in RSS. A cache of many small
/// long-lived entries spread over such regions then costs far more than it holds: with THP, the
/// idle gateway took 15 MiB and 100,000 cached 1 KB runs 1.50 x their bytes; without it, 7.6 MiB
/// and 1.44 x (`benches/memory.sh`). Redis asks for THP off for the same reason.
fn without_transparent_huge_pages() {
    if let Err(error) = nix::sys::prctl::set_thp_disable(true) {
        // Not fatal: memory use is higher, nothing else changes. Logging is not set up yet.
        eprintln!("plextera-gateway: cannot opt out of transparent huge pages: {error}");
    }
}

/// Raises the soft limit on open descriptors to the hard one, as Go's runtime does at start-up,
/// and returns the limit now in force.
///
/// Every client connection holds a descriptor, and so does every upstream call it leads over
/// HTTP/1.1; a soft limit of 1,024 (a common default) is far below `server.max_connections`, and
/// running out of descriptors would refuse new connections on both ports. A limit still too low
/// is logged.
fn raise_descriptor_limit(max_connections: usize) -> Option<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    let limit = if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    if limit < (max_connections as u64).saturating_add(DESCRIPTOR_RESERVE) {
        tracing::warn!(
            max_connections,
            descriptor_limit = limit,
            "the open-descriptor limit is low for server.max_connections: raise it (ulimit -n, LimitNOFILE=) or lower max_connections"
        );
    }
    Some(limit)
}

/// Descriptors kept for listeners, Redis, logs and the like, beyond client connections and
/// upstream calls.
const DESCRIPTOR_RESERVE: u64 = 1024;
/// The fewest upstream calls in flight the descriptor-derived bound allows.
const MIN_UPSTREAM_CALLS: u64 = 64;

/// Without `upstream.max_concurrent_requests`, bounds upstream calls in flight by what the
/// descriptor limit leaves after client connections and a reserve: each client connection may
/// keep as many calls running as it has streams, even after it has gone, so without a bound for
/// the whole gateway a few clients that open requests and leave could use up every descriptor
/// (and the admin port with them). Calls beyond it wait `queue_timeout`, then get a 429.
fn bound_upstream_calls(config: &mut Config, descriptor_limit: u64) {
    if config.upstream.max_concurrent_requests.is_some() {
        return;
    }
    let left = descriptor_limit
        .saturating_sub(config.server.max_connections.get() as u64)
        .saturating_sub(DESCRIPTOR_RESERVE)
        .max(MIN_UPSTREAM_CALLS);
    let bound = NonZeroUsize::new(usize::try_from(left).unwrap_or(usize::MAX));
    config.upstream.max_concurrent_requests = bound;
    tracing::info!(
        max_concurrent_requests = left,
        descriptor_limit,
        "upstream.max_concurrent_requests is unset: upstream calls in flight are bounded by the open-descriptor limit"
    );
}

/// One worker thread per available CPU (cgroup quotas included), or `server.worker_threads`.
/// With a single CPU the runtime is single-threaded: nothing to steal from, no cross-thread wakeups.
fn runtime(worker_threads: Option<NonZeroUsize>) -> std::io::Result<tokio::runtime::Runtime> {
    let threads = worker_threads
        .or_else(|| std::thread::available_parallelism().ok())
        .map_or(1, NonZeroUsize::get);
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(threads);
        builder
    };
    builder.enable_all().build()
}

async fn run(cli: Cli, source: Option<PathBuf>, config: Config) -> ExitCode {
    // Before the secrets are read: a file rotated in between is then seen as changed.
    let snapshot = Snapshot::take(&config);
    let (config, secrets, demo_upstream) = if cli.demo {
        match demo_setup(config).await {
            Ok((config, secrets, upstream)) => (config, secrets, Some(upstream)),
            Err(error) => return fail(EXIT_OS, format!("cannot start the demo upstream: {error}")),
        }
    } else {
        match Secrets::load(&config, |name| std::env::var(name).ok()) {
            Ok(secrets) => (config, secrets, None),
            Err(error) => return refuse(error.to_string()),
        }
    };
    if let Err(error) = preflight(&config, &secrets) {
        return refuse(error.to_string());
    }
    tracing::info!(
        config = %config_source(source.as_deref()),
        upstream = config.upstream.origin().unwrap_or_default(),
        "configuration loaded"
    );
    let mut gateway = match Gateway::bind(&config, &secrets).await {
        Ok(gateway) => gateway,
        Err(error) => return fail(start_failure(&error), error.to_string()),
    };
    if let Some(upstream) = &demo_upstream {
        let url = demo::page_url(upstream.addr, gateway.public_addr());
        tracing::info!("example page: {url} (open it in a browser: it watches runs through the gateway)");
        if let Some(webhook) = gateway.webhook_addr() {
            upstream.send_events_to(webhook, &config.webhook.path);
            tracing::info!(%webhook, "demo mode: a signed event is sent to the webhook listener when each run ends (signing secret \"{}\")", demo::DEMO_WEBHOOK_SECRET);
        }
    }
    // From here on every log line is searched for the key (current and, after a rotation, previous).
    let rotation = gateway.key_rotation();
    telemetry::redact_with(Box::new(move |line| rotation.redact(line)));
    let notifier = Notifier::new(std::env::var(systemd::NOTIFY_SOCKET).ok().as_deref());
    // Registered before "ready" is announced, so an early SIGHUP cannot take its default action
    // (terminating the process); in demo mode too.
    let hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(hangups) => Some(hangups),
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGHUP: secret files are still re-read every server.secrets_check_interval");
            None
        }
    };
    if cli.demo {
        if let Some(hangups) = hangups {
            tokio::spawn(ignore_hangups_in_demo(hangups));
        }
    } else {
        let files = SecretFiles::new(
            snapshot,
            gateway.secret_targets(),
            gateway.secret_reload_metrics(),
            config.server.secrets_check_interval,
        );
        tokio::spawn(watch_secrets(
            files,
            config.server.secrets_check_interval,
            hangups,
            notifier.clone(),
        ));
    }
    let ready = notifier.clone();
    gateway.on_ready(move || ready.ready());
    let shutdown = shutdown_signal();
    gateway
        .serve(async move {
            shutdown.await;
            notifier.stopping();
        })
        .await;
    ExitCode::SUCCESS
}

/// Re-reads the secret files every `interval` and at once on SIGHUP (telling systemd a reload is
/// under way meanwhile); see `ops::secret_files`.
async fn watch_secrets(
    mut files: SecretFiles,
    interval: std::time::Duration,
    mut hangups: Option<tokio::signal::unix::Signal>,
    notifier: Notifier,
) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let hangup = async {
            match &mut hangups {
                Some(hangups) => hangups.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = ticks.tick(), if files.any() => files.check().await,
            received = hangup => {
                if received.is_none() {
                    hangups = None;
                    continue;
                }
                notifier.reloading();
                tracing::info!("SIGHUP: re-reading the secret files");
                let from_environment: Vec<&str> = files.from_environment().collect();
                if !from_environment.is_empty() {
                    tracing::warn!(
                        secrets = from_environment.join(","),
                        "SIGHUP: secrets from the environment cannot change while the process runs: restart to rotate them, or read them from files"
                    );
                }
                files.check().await;
                notifier.ready();
            }
        }
    }
}

/// In demo mode a SIGHUP has nothing to re-read (the secrets are built in): it is logged, and the
/// process goes on.
async fn ignore_hangups_in_demo(mut hangups: tokio::signal::unix::Signal) {
    while hangups.recv().await.is_some() {
        tracing::info!("SIGHUP: demo mode: the secrets are built in, nothing to re-read");
    }
}

/// The exit status for a gateway that could not start: a port that cannot be bound may be free
/// on a restart; a config problem will not go away.
fn start_failure(error: &StartError) -> u8 {
    match error {
        StartError::Bind { .. } => EXIT_BIND,
        StartError::App(AppError::Config(_)) => EXIT_CONFIG,
        StartError::App(AppError::Metrics(_)) => EXIT_SOFTWARE,
    }
}

/// Where the config came from, for the start-up log.
fn config_source(source: Option<&std::path::Path>) -> String {
    match source {
        Some(path) => std::fs::canonicalize(path)
            .unwrap_or_else(|_| path.to_owned())
            .display()
            .to_string(),
        None => "built-in defaults".to_owned(),
    }
}

/// Starts the simulated upstream and points the gateway at it with the demo key; CORS allows the
/// example page it serves (another origin); the webhook listener takes the demo's signed events
/// (on a free loopback port unless `webhook.listen` is set; then the watchers also keep their own
/// pace, so streams still show every step). Returns the simulated upstream too.
async fn demo_setup(mut config: Config) -> std::io::Result<(Config, Secrets, demo::DemoUpstream)> {
    let upstream = demo::spawn().await?;
    let addr = upstream.addr;
    tracing::info!(%addr, "demo mode: simulated upstream started; the configured base_url and key are not used");
    config.upstream.base_url = format!("http://{addr}");
    let origins = &mut config.server.cors_allowed_origins;
    if !origins.iter().any(|origin| origin == "*") {
        origins.push(demo::page_origin(addr));
    }
    if config.webhook.listen.is_none() {
        config.webhook.listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        config.webhook.safety_poll_interval = config.watch.poll_interval;
    }
    let key = ApiKey::new(demo::DEMO_API_KEY).expect("the demo key is a valid key");
    let mut secrets = Secrets::key_only(key);
    secrets.webhook_secrets = Some(vec![demo::DEMO_WEBHOOK_SECRET.into()]);
    Ok((config, secrets, upstream))
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
///
/// The handlers are installed when this is called, not when the future is first polled: a SIGTERM
/// that arrives just after "ready" is announced must start a drain, not kill the process.
fn shutdown_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let signals = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()));
    async move {
        match signals {
            (Ok(mut terminate), Ok(mut interrupt)) => {
                tokio::select! {
                    _ = terminate.recv() => tracing::info!("SIGTERM received"),
                    _ = interrupt.recv() => tracing::info!("SIGINT received"),
                }
            }
            _ => {
                tracing::warn!("cannot install signal handlers; only Ctrl-C stops the gateway");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}

/// `sign-webhook`: signs standard input (an empty body too) with the first secret in
/// `secrets_env` and prints the header value (exit 1 when there is no secret, standard input cannot
/// be read, or `--timestamp` is beyond the clock's range).
fn sign_webhook(secrets_env: &str, timestamp: Option<u64>) -> ExitCode {
    use std::io::Read;
    let secret = std::env::var(secrets_env).ok().and_then(|secrets| {
        secrets
            .split(',')
            .map(str::trim)
            .find(|secret| !secret.is_empty())
            .map(str::to_owned)
    });
    let Some(secret) = secret else {
        eprintln!(
            "plextera-gateway: sign-webhook: the environment variable {secrets_env} is unset or holds no secret"
        );
        return ExitCode::FAILURE;
    };
    let mut body = Vec::new();
    if let Err(error) = std::io::stdin().read_to_end(&mut body) {
        eprintln!("plextera-gateway: sign-webhook: cannot read the body from standard input: {error}");
        return ExitCode::FAILURE;
    }
    let at = match timestamp {
        None => std::time::SystemTime::now(),
        Some(seconds) => match std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_secs(seconds)) {
            Some(at) => at,
            None => {
                eprintln!(
                    "plextera-gateway: sign-webhook: --timestamp {seconds} is beyond what the clock can hold"
                );
                return ExitCode::FAILURE;
            }
        },
    };
    println!("{}", signature::sign(secret.as_bytes(), &body, at));
    ExitCode::SUCCESS
}

/// Prints one line naming the problem and returns the configuration-error exit status.
fn refuse(message: String) -> ExitCode {
    fail(EXIT_CONFIG, message)
}

/// Prints one line naming the problem and returns `status`.
fn fail(status: u8, message: String) -> ExitCode {
    eprintln!("plextera-gateway: {message}");
    ExitCode::from(status)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const PLACES: [&str; 2] = [DEFAULT_CONFIG_PATH, PACKAGED_CONFIG_PATH];

    #[test]
    fn the_config_is_the_named_one_else_the_relative_one_else_the_packaged_one() {
        let only = |present: &'static [&'static str]| {
            move |path: &Path| present.iter().any(|p| Path::new(p) == path)
        };
        let both = only(&[DEFAULT_CONFIG_PATH, PACKAGED_CONFIG_PATH]);
        assert_eq!(
            find_config(Some(Path::new("mine.toml")), false, PLACES, both),
            Ok(Some(PathBuf::from("mine.toml")))
        );
        assert_eq!(
            find_config(None, false, PLACES, both),
            Ok(Some(PathBuf::from(DEFAULT_CONFIG_PATH))),
            "the working directory's comes first"
        );
        assert_eq!(
            find_config(None, false, PLACES, only(&[PACKAGED_CONFIG_PATH])),
            Ok(Some(PathBuf::from(PACKAGED_CONFIG_PATH))),
            "the packaged one when there is none in the working directory"
        );
        let neither = find_config(None, false, PLACES, only(&[])).expect_err("refused");
        assert!(
            neither.contains(DEFAULT_CONFIG_PATH) && neither.contains(PACKAGED_CONFIG_PATH),
            "{neither}"
        );
        assert_eq!(
            find_config(None, true, PLACES, only(&[])),
            Ok(None),
            "--demo runs on the defaults"
        );
    }
}
