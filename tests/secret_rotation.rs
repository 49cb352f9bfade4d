//! The real binary re-reading its secrets from files: the API key rotated the way Kubernetes
//! updates a mounted Secret (no request fails across the swap), SIGHUP re-reading at once (with
//! systemd told of the reload), unusable content kept out, client tokens, webhook secrets and the
//! Redis password rotated; no secret value ever in the logs.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use http::{Method, StatusCode};
use support::redis_server::RedisServer;
use support::{
    BodyClient, GatewayProcess, MockUpstream, PATIENCE, Reply, TestClient, runs_path, write_config,
};

const OLD_KEY: &str = "old-key-0a1b2c3d4e";
const NEW_KEY: &str = "new-key-5f6a7b8c9d";

/// A directory laid out as the kubelet lays out a Secret volume: each file is a symlink through
/// `..data`, which points at a timestamped directory holding the real files. An update writes a
/// new timestamped directory, points a new `..data_tmp` link at it, renames that over `..data`
/// (atomic), then removes the old directory.
struct SecretVolume {
    dir: PathBuf,
    current: PathBuf,
    generation: u32,
}

impl SecretVolume {
    fn new(dir: &Path, files: &[(&str, &str)]) -> Self {
        std::fs::create_dir_all(dir).expect("volume dir");
        let mut volume = Self {
            dir: dir.to_owned(),
            current: PathBuf::new(),
            generation: 0,
        };
        volume.current = volume.write_data_dir(files);
        std::os::unix::fs::symlink(volume.current.file_name().expect("name"), dir.join("..data"))
            .expect("..data");
        for (name, _) in files {
            std::os::unix::fs::symlink(Path::new("..data").join(name), dir.join(name)).expect("file link");
        }
        volume
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn write_data_dir(&mut self, files: &[(&str, &str)]) -> PathBuf {
        self.generation += 1;
        let data = self.dir.join(format!(
            "..2026_12_01_00_00_0{}.{}",
            self.generation,
            std::process::id()
        ));
        std::fs::create_dir(&data).expect("data dir");
        for (name, text) in files {
            std::fs::write(data.join(name), text).expect("secret file");
        }
        data
    }

    fn update(&mut self, files: &[(&str, &str)]) {
        let data = self.write_data_dir(files);
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(data.file_name().expect("name"), &tmp).expect("..data_tmp");
        std::fs::rename(&tmp, self.dir.join("..data")).expect("swap ..data");
        std::fs::remove_dir_all(&self.current).expect("remove the old data dir");
        self.current = data;
    }
}

/// A config for the process: ephemeral ports, upstream at the mock, `server_extra` and
/// `upstream_extra` added to their tables, and `rest` (more tables) after.
fn config_text(mock: &MockUpstream, server_extra: &str, upstream_extra: &str, rest: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nshutdown_grace = \"5s\"\n{server_extra}\n\
         [upstream]\nbase_url = \"{}\"\n{upstream_extra}\n{rest}",
        mock.base_url()
    )
}

fn toml_path(path: &Path) -> String {
    toml::Value::String(path.display().to_string()).to_string()
}

/// The `Authorization` header of every request upstream has seen, in order, with its arrival.
fn keys_seen(mock: &MockUpstream) -> Vec<(String, Instant)> {
    mock.requests()
        .into_iter()
        .filter_map(|request| {
            let key = request.headers.get("authorization")?.to_str().ok()?.to_owned();
            Some((key, request.at))
        })
        .collect()
}

async fn reloads(gateway: &GatewayProcess, secret: &str, result: &str) -> f64 {
    gateway
        .scrape()
        .await
        .value(
            "plextera_gateway_secret_reloads_total",
            &[("secret", secret), ("result", result)],
        )
        .unwrap_or_else(|| panic!("secret_reloads_total{{secret={secret},result={result}}} is exported"))
}

fn assert_never_logged(gateway: &GatewayProcess, secrets: &[&str]) {
    let logs = gateway.logs();
    for secret in secrets {
        assert!(!logs.contains(secret), "{secret} appears in the logs");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_rotated_as_kubernetes_updates_a_secret_fails_no_request() {
    const INTERVAL: Duration = Duration::from_millis(1000);
    let mock = MockUpstream::start().await;
    // A run still going: every request is passed through to upstream with the key.
    mock.set("live", Reply::run("live", "PROCESSING"));
    mock.accept_only(&[OLD_KEY, NEW_KEY]);
    let dir = tempfile::tempdir().expect("temp dir");
    let mut volume = SecretVolume::new(
        &dir.path().join("secret"),
        &[("api-key", &format!("{OLD_KEY}\n"))],
    );
    let text = config_text(
        &mock,
        "secrets_check_interval = \"1s\"",
        &format!("api_key_file = {}", toml_path(&volume.path("api-key"))),
        "",
    );
    let mut gateway = GatewayProcess::start(&["--config", &write_config(dir.path(), &text)], &[]);

    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let url = format!("http://{}{}", gateway.public, runs_path("live"));
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let (stop, sent, failed, url) = (stop.clone(), sent.clone(), failed.clone(), url.clone());
            tokio::spawn(async move {
                let client = TestClient::new();
                while !stop.load(Ordering::Relaxed) {
                    let response = client.send(Method::GET, &url, &[]).await;
                    sent.fetch_add(1, Ordering::Relaxed);
                    if response.status != StatusCode::OK {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    mock.wait_for_requests(20).await;

    let swapped = Instant::now();
    volume.update(&[("api-key", &format!("{NEW_KEY}\n"))]);
    let new_header = format!("api-key {NEW_KEY}");
    support::eventually("upstream sees the new key", || async {
        keys_seen(&mock).iter().any(|(key, _)| *key == new_header)
    })
    .await;
    let first_new = keys_seen(&mock)
        .into_iter()
        .find(|(key, _)| *key == new_header)
        .map(|(_, at)| at)
        .expect("seen");
    let took = first_new.saturating_duration_since(swapped);
    assert!(
        took <= INTERVAL + Duration::from_millis(500),
        "the new key reached upstream {took:?} after the swap; the check interval is {INTERVAL:?}"
    );
    support::eventually("the reload is logged", || async {
        gateway.logs().contains("secret reloaded")
    })
    .await;
    // The gateway has switched: upstream revokes the old key, and requests keep succeeding.
    mock.accept_only(&[NEW_KEY]);
    let after_switch = mock.request_count();
    mock.wait_for_requests(after_switch + 50).await;
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.expect("client task");
    }

    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "of {} requests",
        sent.load(Ordering::Relaxed)
    );
    let seen = keys_seen(&mock);
    assert!(seen.iter().any(|(key, _)| *key == format!("api-key {OLD_KEY}")));
    assert!(seen[after_switch..].iter().all(|(key, _)| *key == new_header));
    assert_eq!(reloads(&gateway, "api_key", "reloaded").await, 1.0);
    assert_eq!(reloads(&gateway, "api_key", "failed").await, 0.0);
    assert_eq!(gateway.terminate().code(), Some(0));
    let logs = gateway.logs();
    assert!(
        logs.contains("upstream.api_key_file"),
        "the reload names the key: {logs}"
    );
    assert_never_logged(&gateway, &[OLD_KEY, NEW_KEY]);
}

/// An abstract datagram socket standing in for systemd's `$NOTIFY_SOCKET`, as systemd may hand
/// one out.
struct NotifySocket {
    name: String,
    socket: std::os::unix::net::UnixDatagram,
}

impl NotifySocket {
    fn bind(tag: &str) -> Self {
        use std::os::linux::net::SocketAddrExt;
        use std::os::unix::net::{SocketAddr, UnixDatagram};
        let name = format!("plextera-gateway-{tag}-{}", std::process::id());
        let socket = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).expect("addr"))
            .expect("bind the notify socket");
        socket.set_read_timeout(Some(PATIENCE)).expect("timeout");
        Self { name, socket }
    }

    /// The value of `$NOTIFY_SOCKET` that names it.
    fn address(&self) -> String {
        format!("@{}", self.name)
    }

    /// The next state sent, waited for at most [`PATIENCE`].
    fn next_state(&self) -> String {
        let mut buffer = [0u8; 512];
        let length = self.socket.recv(&mut buffer).expect("a notification");
        String::from_utf8_lossy(&buffer[..length]).into_owned()
    }

    /// Every state sent and not read yet, without waiting.
    fn waiting_states(&self) -> Vec<String> {
        self.socket.set_nonblocking(true).expect("nonblocking");
        let mut buffer = [0u8; 512];
        std::iter::from_fn(|| {
            let length = self.socket.recv(&mut buffer).ok()?;
            Some(String::from_utf8_lossy(&buffer[..length]).into_owned())
        })
        .collect()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_rereads_at_once_and_systemd_hears_ready_reloading_and_stopping() {
    let mock = MockUpstream::start().await;
    mock.set("live", Reply::run("live", "PROCESSING"));
    let dir = tempfile::tempdir().expect("temp dir");
    let key_file = dir.path().join("api-key");
    std::fs::write(&key_file, OLD_KEY).expect("write key");
    let notify = NotifySocket::bind("notify");
    let next_state = || notify.next_state();
    let text = config_text(
        &mock,
        "secrets_check_interval = \"1h\"",
        &format!("api_key_file = {}", toml_path(&key_file)),
        "",
    );
    let mut gateway = GatewayProcess::start(
        &["--config", &write_config(dir.path(), &text)],
        &[("NOTIFY_SOCKET", &notify.address())],
    );
    assert_eq!(next_state(), "READY=1");
    let last_key = || keys_seen(&mock).last().map(|(key, _)| key.clone());
    assert_eq!(gateway.get_run("live").await.status, StatusCode::OK);
    assert_eq!(last_key(), Some(format!("api-key {OLD_KEY}")));

    std::fs::write(&key_file, NEW_KEY).expect("rotate");
    gateway.send_signal("HUP");
    let reloading = next_state();
    let usec = reloading
        .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
        .unwrap_or_else(|| panic!("{reloading:?}"));
    assert!(usec.parse::<u64>().is_ok_and(|usec| usec > 0), "{reloading:?}");
    assert_eq!(next_state(), "READY=1", "the reload is done");
    // Done means done: the very next request carries the new key (the interval is an hour).
    assert_eq!(gateway.get_run("live").await.status, StatusCode::OK);
    assert_eq!(last_key(), Some(format!("api-key {NEW_KEY}")));

    assert_eq!(gateway.terminate().code(), Some(0));
    assert_eq!(next_state(), "STOPPING=1");
    assert_never_logged(&gateway, &[OLD_KEY, NEW_KEY]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sighup_during_the_drain_tells_systemd_nothing_after_stopping() {
    let mock = MockUpstream::start().await;
    let gate = support::Gate::new();
    mock.set("slow", Reply::run("slow", "COMPLETED").gated(&gate));
    let dir = tempfile::tempdir().expect("temp dir");
    let key_file = dir.path().join("api-key");
    std::fs::write(&key_file, OLD_KEY).expect("write key");
    let notify = NotifySocket::bind("drain-notify");
    let next_state = || notify.next_state();
    let text = config_text(
        &mock,
        "secrets_check_interval = \"1h\"",
        &format!("api_key_file = {}", toml_path(&key_file)),
        "",
    );
    let mut gateway = GatewayProcess::start(
        &["--config", &write_config(dir.path(), &text)],
        &[("NOTIFY_SOCKET", &notify.address())],
    );
    assert_eq!(next_state(), "READY=1");

    // A request held upstream keeps the drain open.
    let url = format!("http://{}{}", gateway.public, runs_path("slow"));
    let in_flight = tokio::spawn(async move { TestClient::new().send(Method::GET, &url, &[]).await });
    mock.wait_for_requests(1).await;
    gateway.send_sigterm();
    assert_eq!(next_state(), "STOPPING=1");
    std::fs::write(&key_file, NEW_KEY).expect("rotate");
    gateway.send_signal("HUP");
    support::eventually("the SIGHUP's re-read is done", || async {
        gateway.logs().contains("secret reloaded")
    })
    .await;
    gate.open();
    assert_eq!(in_flight.await.expect("client task").status, StatusCode::OK);
    assert_eq!(gateway.wait().code(), Some(0));
    let after = notify.waiting_states();
    assert!(after.is_empty(), "nothing after STOPPING=1: {after:?}");
    assert_never_logged(&gateway, &[OLD_KEY, NEW_KEY]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fifo_at_the_key_path_is_refused_at_once_and_a_good_file_after_it_is_used() {
    let mock = MockUpstream::start().await;
    mock.set("live", Reply::run("live", "PROCESSING"));
    let dir = tempfile::tempdir().expect("temp dir");
    let key_file = dir.path().join("api-key");
    std::fs::write(&key_file, OLD_KEY).expect("write key");
    let text = config_text(
        &mock,
        "secrets_check_interval = \"200ms\"",
        &format!("api_key_file = {}", toml_path(&key_file)),
        "",
    );
    let config = write_config(dir.path(), &text);
    let mut gateway = GatewayProcess::start(&["--config", &config], &[]);
    let failing = |scrape: support::prom::Scrape| {
        scrape.value("plextera_gateway_secret_file_failing", &[("secret", "api_key")])
    };
    assert_eq!(failing(gateway.scrape().await), Some(0.0));

    // A FIFO would block a plain open until some writer came (and, once renamed away, forever).
    let fifo = dir.path().join("fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo runs");
    assert!(made.success(), "mkfifo");
    std::fs::rename(&fifo, &key_file).expect("FIFO over the key file");
    support::eventually("the FIFO is refused", || async {
        gateway
            .logs()
            .lines()
            .any(|line| line.contains("is not a regular file") && line.contains("upstream.api_key_file"))
    })
    .await;
    // Serving goes on, with the key in force, and the gauge says the file is failing.
    assert_eq!(gateway.get_run("live").await.status, StatusCode::OK);
    assert_eq!(
        keys_seen(&mock).last().map(|(key, _)| key.clone()),
        Some(format!("api-key {OLD_KEY}"))
    );
    assert_eq!(failing(gateway.scrape().await), Some(1.0));
    // --check-config on the same config answers at once, naming the key, rather than hanging.
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_plextera-gateway"))
        .args(["--config", &config, "--check-config"])
        .output()
        .expect("run --check-config");
    assert_eq!(check.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&check.stderr).contains("upstream.api_key_file"));

    // A good file renamed over the FIFO is used: nothing is left stuck on the FIFO.
    let staged = dir.path().join("staged");
    std::fs::write(&staged, NEW_KEY).expect("stage");
    std::fs::rename(&staged, &key_file).expect("rename over the FIFO");
    let new_header = format!("api-key {NEW_KEY}");
    support::eventually("the new key is sent", || async {
        gateway.get_run("live").await.status == StatusCode::OK
            && keys_seen(&mock).last().map(|(key, _)| key.clone()) == Some(new_header.clone())
    })
    .await;
    assert_eq!(failing(gateway.scrape().await), Some(0.0));
    assert_eq!(gateway.terminate().code(), Some(0), "{}", gateway.logs());
    let warnings = gateway
        .logs()
        .lines()
        .filter(|line| line.contains("is not a regular file"))
        .count();
    assert_eq!(warnings, 1, "warned once: {}", gateway.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_empty_or_half_written_key_file_keeps_the_key_in_force_and_warns_once_each() {
    const INTERVAL: Duration = Duration::from_millis(200);
    let mock = MockUpstream::start().await;
    mock.set("live", Reply::run("live", "PROCESSING"));
    mock.accept_only(&[OLD_KEY]);
    let dir = tempfile::tempdir().expect("temp dir");
    let key_file = dir.path().join("api-key");
    std::fs::write(&key_file, OLD_KEY).expect("write key");
    let text = config_text(
        &mock,
        "secrets_check_interval = \"200ms\"",
        &format!("api_key_file = {}", toml_path(&key_file)),
        "",
    );
    let mut gateway = GatewayProcess::start(&["--config", &write_config(dir.path(), &text)], &[]);
    let warnings = |gateway: &GatewayProcess| {
        gateway
            .logs()
            .lines()
            .filter(|line| line.contains("secret file not used"))
            .count()
    };

    std::fs::write(&key_file, "").expect("empty");
    support::eventually("the empty file is warned about", || async {
        gateway.logs().contains("holds no secret")
    })
    .await;
    assert_eq!(
        gateway.get_run("live").await.status,
        StatusCode::OK,
        "the old key is kept"
    );
    // Half a write: the new key's first line, then part of another.
    let half = format!("{NEW_KEY}\n{}", &NEW_KEY[..5]);
    std::fs::write(&key_file, &half).expect("half-written");
    support::eventually("the half-written file is warned about", || async {
        gateway.logs().contains("does not hold a usable key")
    })
    .await;
    assert_eq!(
        gateway.get_run("live").await.status,
        StatusCode::OK,
        "the old key is kept"
    );
    // Nothing to wait on for "no more warnings": let several checks pass.
    tokio::time::sleep(INTERVAL * 4).await;
    assert_eq!(warnings(&gateway), 2, "one warning per distinct problem");
    assert_eq!(reloads(&gateway, "api_key", "failed").await, 2.0);
    let failing = |scrape: support::prom::Scrape| {
        scrape.value("plextera_gateway_secret_file_failing", &[("secret", "api_key")])
    };
    assert_eq!(
        failing(gateway.scrape().await),
        Some(1.0),
        "still failing after the count stopped"
    );

    std::fs::write(&key_file, format!("{NEW_KEY}\n")).expect("whole");
    mock.accept_only(&[OLD_KEY, NEW_KEY]);
    support::eventually("the next good read recovers", || async {
        gateway.get_run("live").await.status == StatusCode::OK
            && keys_seen(&mock)
                .last()
                .is_some_and(|(key, _)| *key == format!("api-key {NEW_KEY}"))
    })
    .await;
    assert_eq!(reloads(&gateway, "api_key", "reloaded").await, 1.0);
    assert_eq!(failing(gateway.scrape().await), Some(0.0), "recovered");
    assert_eq!(gateway.terminate().code(), Some(0));
    let logs = gateway.logs();
    let path = key_file.display().to_string();
    assert!(
        logs.lines()
            .filter(|line| line.contains("secret file not used"))
            .all(|line| line.contains("upstream.api_key_file") && line.contains(&path)),
        "each warning names the key and the path: {logs}"
    );
    assert_never_logged(&gateway, &[OLD_KEY, NEW_KEY]);
}

#[tokio::test(flavor = "multi_thread")]
async fn client_tokens_rotated_through_their_file_take_over_from_the_old_ones() {
    let mock = MockUpstream::start().await;
    mock.set("done", Reply::run("done", "COMPLETED"));
    let dir = tempfile::tempdir().expect("temp dir");
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "tok-old-1111\n").expect("write tokens");
    let text = config_text(
        &mock,
        &format!(
            "secrets_check_interval = \"200ms\"\nclient_tokens_file = {}",
            toml_path(&tokens)
        ),
        "api_key_env = \"GW_TEST_KEY\"",
        "",
    );
    let mut gateway = GatewayProcess::start(
        &["--config", &write_config(dir.path(), &text)],
        &[("GW_TEST_KEY", support::TEST_KEY)],
    );
    let url = format!("http://{}{}", gateway.public, runs_path("done"));
    let status_with = |token: &'static str| {
        let url = url.clone();
        async move {
            TestClient::new()
                .send(
                    Method::GET,
                    &url,
                    &[("authorization", &format!("Bearer {token}"))],
                )
                .await
                .status
        }
    };
    assert_eq!(status_with("tok-old-1111").await, StatusCode::OK);
    assert_eq!(status_with("tok-new-2222").await, StatusCode::UNAUTHORIZED);

    std::fs::write(&tokens, "tok-new-2222\ntok-new-3333\n").expect("rotate");
    support::eventually("the new tokens are accepted", || async {
        status_with("tok-new-2222").await == StatusCode::OK
    })
    .await;
    assert_eq!(status_with("tok-new-3333").await, StatusCode::OK);
    assert_eq!(status_with("tok-old-1111").await, StatusCode::UNAUTHORIZED);
    assert_eq!(reloads(&gateway, "client_tokens", "reloaded").await, 1.0);
    assert_eq!(gateway.terminate().code(), Some(0));
    assert_never_logged(&gateway, &["tok-old-1111", "tok-new-2222", "tok-new-3333"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn webhook_secrets_rotated_through_their_file_verify_from_then_on() {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let secrets = dir.path().join("webhook-secrets");
    std::fs::write(&secrets, "whsec_old_aaaa\n").expect("write secrets");
    let text = config_text(
        &mock,
        "secrets_check_interval = \"200ms\"",
        "api_key_env = \"GW_TEST_KEY\"",
        &format!(
            "[webhook]\nlisten = \"127.0.0.1:0\"\nsecrets_file = {}\n",
            toml_path(&secrets)
        ),
    );
    let mut gateway = GatewayProcess::start(
        &["--config", &write_config(dir.path(), &text)],
        &[("GW_TEST_KEY", support::TEST_KEY)],
    );
    let url = format!(
        "http://{}/webhooks/plextera",
        gateway.webhook.expect("webhook port")
    );
    let events = AtomicUsize::new(0);
    let post_signed_with = |secret: &'static str| {
        let url = url.clone();
        let id = events.fetch_add(1, Ordering::Relaxed);
        async move {
            let body = format!(r#"{{"eventId":"evt_{id}","eventType":"workflow.created","data":{{}}}}"#);
            let signature = plextera_gateway::webhook::signature::sign(
                secret.as_bytes(),
                body.as_bytes(),
                SystemTime::now(),
            );
            BodyClient::new()
                .post(&url, &[("x-plextera-signature", &signature)], body)
                .await
                .status
        }
    };
    assert_eq!(post_signed_with("whsec_old_aaaa").await, StatusCode::OK);
    assert_eq!(post_signed_with("whsec_new_bbbb").await, StatusCode::UNAUTHORIZED);

    std::fs::write(&secrets, "whsec_new_bbbb\n").expect("rotate");
    support::eventually("events signed with the new secret are accepted", || async {
        post_signed_with("whsec_new_bbbb").await == StatusCode::OK
    })
    .await;
    assert_eq!(post_signed_with("whsec_old_aaaa").await, StatusCode::UNAUTHORIZED);
    assert_eq!(reloads(&gateway, "webhook_secrets", "reloaded").await, 1.0);
    assert_eq!(gateway.terminate().code(), Some(0));
    assert_never_logged(&gateway, &["whsec_old_aaaa", "whsec_new_bbbb"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redis_password_rotated_through_its_file_keeps_the_shared_tier_reachable() {
    const OLD_PASSWORD: &str = "redis-old-pw-1234";
    const NEW_PASSWORD: &str = "redis-new-pw-5678";
    let redis = RedisServer::start(&["--requirepass", OLD_PASSWORD]);
    let admin = |password: &str, args: &[&str]| {
        let output = std::process::Command::new("redis-cli")
            .args(["-p", &redis.port.to_string(), "--no-auth-warning", "-a", password])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    };
    let mock = MockUpstream::start().await;
    for id in ["before", "elsewhere"] {
        mock.set(id, Reply::run(id, "COMPLETED"));
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let password_file = dir.path().join("redis-password");
    std::fs::write(&password_file, format!("{OLD_PASSWORD}\n")).expect("write password");
    let shared = |password_file: &Path| {
        format!(
            "[cache.shared]\nurl = \"{}\"\npassword_file = {}\ntimeout = \"500ms\"\n",
            redis.url(),
            toml_path(password_file)
        )
    };
    let text = config_text(
        &mock,
        "secrets_check_interval = \"200ms\"",
        "api_key_env = \"GW_TEST_KEY\"",
        &shared(&password_file),
    );
    let mut gateway = GatewayProcess::start(
        &["--config", &write_config(dir.path(), &text)],
        &[("GW_TEST_KEY", support::TEST_KEY)],
    );
    let stored = |id: &str| admin(NEW_PASSWORD, &["EXISTS", &format!("plextera-gateway:run:{id}")]) == "1";
    assert_eq!(gateway.get_run("before").await.x_cache(), Some("MISS"));

    // The rotation as Redis ACLs allow it: the new password is added beside the old one, the
    // secret is rotated, then the old password is removed and every connection cut, so only
    // connections made with the new password work.
    assert_eq!(
        admin(
            OLD_PASSWORD,
            &["ACL", "SETUSER", "default", &format!(">{NEW_PASSWORD}")]
        ),
        "OK"
    );
    support::eventually("the run is in Redis", || async { stored("before") }).await;
    std::fs::write(&password_file, format!("{NEW_PASSWORD}\n")).expect("rotate");
    support::eventually("the new password is in use", || async {
        gateway.logs().contains("secret reloaded") && gateway.logs().contains("redis_password")
    })
    .await;
    assert_eq!(
        admin(
            NEW_PASSWORD,
            &["ACL", "SETUSER", "default", &format!("<{OLD_PASSWORD}")]
        ),
        "OK"
    );
    admin(NEW_PASSWORD, &["CLIENT", "KILL", "TYPE", "normal"]);

    // Writes reach Redis with the new password (the first call after the cut may fail, as the
    // connection is made again: each attempt fetches a run of its own)...
    let attempt = std::cell::Cell::new(0);
    support::eventually("a run fetched after the rotation is written to Redis", || {
        attempt.set(attempt.get() + 1);
        let id = format!("after-{}", attempt.get());
        mock.set(&id, Reply::run(&id, "COMPLETED"));
        let gateway = &gateway;
        let stored = &stored;
        async move {
            assert_eq!(gateway.get_run(&id).await.status, StatusCode::OK);
            stored(&id)
        }
    })
    .await;
    // ...and so do reads: a run another replica stored is a shared-tier hit here.
    let other_dir = tempfile::tempdir().expect("temp dir");
    let other_password = other_dir.path().join("redis-password");
    std::fs::write(&other_password, NEW_PASSWORD).expect("write password");
    let other_text = config_text(
        &mock,
        "",
        "api_key_env = \"GW_TEST_KEY\"",
        &shared(&other_password),
    );
    let mut other = GatewayProcess::start(
        &["--config", &write_config(other_dir.path(), &other_text)],
        &[("GW_TEST_KEY", support::TEST_KEY)],
    );
    assert_eq!(other.get_run("elsewhere").await.x_cache(), Some("MISS"));
    support::eventually("the other replica's run is in Redis", || async {
        stored("elsewhere")
    })
    .await;
    let shared_hit = gateway.get_run("elsewhere").await;
    assert_eq!(shared_hit.x_cache(), Some("HIT"));
    assert_eq!(mock.count_for("elsewhere"), 1, "served from Redis, not upstream");
    assert_eq!(reloads(&gateway, "redis_password", "reloaded").await, 1.0);
    assert_eq!(other.terminate().code(), Some(0));
    assert_eq!(gateway.terminate().code(), Some(0));
    assert_never_logged(&gateway, &[OLD_PASSWORD, NEW_PASSWORD]);
}
