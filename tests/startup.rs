//! The real binary before it serves: `--check-config`, where the config comes from without
//! `--config`, and the exit status of each kind of start-up failure.

mod support;

use std::path::Path;
use std::process::Command;

use plextera_gateway::Config;
use support::{GatewayProcess, MockUpstream, TEST_KEY, run_to_exit, write_config};

/// Runs the binary in `dir` as its working directory; returns status, stdout and stderr.
fn run_in(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_plextera-gateway"));
    command.current_dir(dir).args(args).env_remove("PLEXTERA_API_KEY");
    for (name, value) in env {
        command.env(name, value);
    }
    let output = command.output().expect("run the gateway binary");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn check_config_prints_the_effective_config_which_reads_back_the_same_and_no_secret() {
    let dir = tempfile::tempdir().expect("temp dir");
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "client-token-abcdef\n").expect("tokens");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nclient_tokens_file = \"{}\"\n\
         [upstream]\napi_key_env = \"GW_TEST_KEY\"\nmax_requests_per_second = 4.5\n\
         [cache]\nttl = \"90m\"\nmax_size = \"64MiB\"\n\
         [cache.shared]\nurl = \"redis://127.0.0.1:9/0\"\npassword_env = \"GW_REDIS_PASSWORD\"\n\
         [webhook]\nlisten = \"127.0.0.1:0\"\nsecrets_env = \"GW_HOOK_SECRETS\"\n",
        tokens.display()
    );
    let config = write_config(dir.path(), &text);
    let secrets = [
        ("GW_TEST_KEY", TEST_KEY),
        ("GW_REDIS_PASSWORD", "redis-pass-ghijkl"),
        ("GW_HOOK_SECRETS", "whsec_mnopqr"),
    ];
    let (status, stdout, stderr) = run_to_exit(&["--config", &config, "--check-config"], &secrets);
    assert_eq!(status.code(), Some(0), "{stderr}");
    let printed = Config::parse(&stdout).unwrap_or_else(|error| panic!("{error}:\n{stdout}"));
    assert_eq!(printed, Config::load(Path::new(&config)).expect("loads"));
    // Defaults are filled in; secrets appear only as where they come from.
    for expected in [
        "secrets_check_interval = \"5s\"",
        "shutdown_grace = \"10s\"",
        "api_key_env = \"GW_TEST_KEY\"",
        "password_env = \"GW_REDIS_PASSWORD\"",
        &format!("client_tokens_file = \"{}\"", tokens.display()),
    ] {
        assert!(stdout.contains(expected), "{expected} missing:\n{stdout}");
    }
    for (_, value) in secrets {
        assert!(
            !stdout.contains(value) && !stderr.contains(value),
            "{value} printed"
        );
    }
    assert!(!stdout.contains("client-token-abcdef"));
}

#[test]
fn check_config_refuses_a_bad_value_or_a_missing_secret_with_one_line_and_78() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(dir.path(), "[cache]\nttl = \"forever\"\n");
    let (status, stdout, stderr) = run_to_exit(
        &["--config", &config, "--check-config"],
        &[("PLEXTERA_API_KEY", TEST_KEY)],
    );
    assert_eq!(status.code(), Some(78));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("cache.ttl"), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");

    // The key's variable is unset: named (it is the gateway's default name), never a value.
    let config = write_config(dir.path(), "[upstream]\nbase_url = \"http://127.0.0.1:9\"\n");
    let (status, _, stderr) = run_to_exit(&["--config", &config, "--check-config"], &[]);
    assert_eq!(status.code(), Some(78));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("PLEXTERA_API_KEY"), "{stderr}");

    // A secret file that holds nothing usable.
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, " \n").expect("tokens");
    let config = write_config(
        dir.path(),
        &format!("[server]\nclient_tokens_file = \"{}\"\n", tokens.display()),
    );
    let (status, _, stderr) = run_to_exit(
        &["--config", &config, "--check-config"],
        &[("PLEXTERA_API_KEY", TEST_KEY)],
    );
    assert_eq!(status.code(), Some(78));
    assert!(stderr.contains("server.client_tokens_file"), "{stderr}");
    assert!(!stderr.contains(TEST_KEY), "{stderr}");
}

#[test]
fn check_config_refuses_a_ca_file_start_up_refuses_naming_the_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").expect("write");
    for ca_file in [dir.path().join("absent.pem"), garbage] {
        let config = write_config(
            dir.path(),
            &format!(
                "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[upstream]\nca_file = {}\n",
                toml::Value::String(ca_file.display().to_string())
            ),
        );
        for args in [
            &["--config", &config, "--check-config"][..],
            &["--config", &config],
        ] {
            let (status, stdout, stderr) = run_to_exit(args, &[("PLEXTERA_API_KEY", TEST_KEY)]);
            assert_eq!(status.code(), Some(78), "{args:?} {ca_file:?}: {stderr}");
            assert!(stderr.contains("upstream.ca_file"), "{args:?}: {stderr}");
            assert!(!stdout.contains("is valid"), "{args:?}: {stdout}");
        }
    }
}

#[test]
fn check_config_binds_nothing() {
    // The listen address is held: serving would fail with 75; checking does not try.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(dir.path(), &format!("[server]\nlisten = \"{addr}\"\n"));
    let (status, _, stderr) = run_to_exit(
        &["--config", &config, "--check-config"],
        &[("PLEXTERA_API_KEY", TEST_KEY)],
    );
    assert_eq!(status.code(), Some(0), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_config_the_file_in_the_working_directory_is_used_and_logged() {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir(dir.path().join("config")).expect("config dir");
    let text = support::process_config(&mock.base_url(), "");
    std::fs::write(dir.path().join("config/gateway.toml"), &text).expect("config");

    let (status, stdout, stderr) = run_in(dir.path(), &["--check-config"], &[("GW_TEST_KEY", TEST_KEY)]);
    assert_eq!(status, Some(0), "{stderr}");
    assert!(stdout.contains("config/gateway.toml"), "{stdout}");
    assert!(stdout.contains(&mock.base_url()), "{stdout}");

    // The process, run from that directory, says which file it read.
    let mut gateway = GatewayProcess::start_in(dir.path(), &[], &[("GW_TEST_KEY", TEST_KEY)]);
    assert_eq!(gateway.terminate().code(), Some(0));
    let canonical = std::fs::canonicalize(dir.path().join("config/gateway.toml")).expect("canonical");
    assert!(
        gateway.logs().contains(&canonical.display().to_string()),
        "{}",
        gateway.logs()
    );
}

#[test]
fn without_any_config_file_start_up_names_both_places_and_exits_78() {
    if Path::new("/etc/plextera-gateway/gateway.toml").exists() {
        eprintln!("skipped: this machine has /etc/plextera-gateway/gateway.toml");
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let (status, _, stderr) = run_in(dir.path(), &[], &[("PLEXTERA_API_KEY", TEST_KEY)]);
    assert_eq!(status, Some(78));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("config/gateway.toml") && stderr.contains("/etc/plextera-gateway/gateway.toml"),
        "{stderr}"
    );
    // An explicit --config that is missing is refused too, naming it.
    let (status, _, stderr) = run_in(dir.path(), &["--config", "elsewhere.toml"], &[]);
    assert_eq!(status, Some(78));
    assert!(stderr.contains("elsewhere.toml"), "{stderr}");
}
