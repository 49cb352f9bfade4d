//! deploy/ is checked, not decoration: every file parses, the manifests agree with the config they
//! ship and with Cargo.toml, the generated files are what their script writes, every alert's
//! runbook exists, every metric the dashboard and the alerts query exists in a real scrape, the
//! Dockerfile builds an image whose binary runs, and the systemd unit's hardening is scored.

mod support;

#[path = "deploy/dockerfile.rs"]
mod dockerfile;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::StatusCode;
use plextera_gateway::Config;
use serde_json::Value;
use support::{MockUpstream, Reply, TestGateway};

/// Where the Deployment mounts the Secret (deploy/derive-configs.py's SECRET_DIR).
const SECRET_DIR: &str = "/var/run/secrets/plextera-gateway";
/// The scrape job's name under both deployments (the ServiceMonitor's jobLabel, the alerts).
const JOB: &str = "plextera-gateway";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|error| panic!("{path}: {error}"))
}

fn yaml_documents(path: &str) -> Vec<Value> {
    let text = read(path);
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|document| {
            serde::Deserialize::deserialize(document).unwrap_or_else(|error| panic!("{path}: {error}"))
        })
        .filter(|document: &Value| !document.is_null())
        .collect()
}

fn yaml(path: &str) -> Value {
    let mut documents = yaml_documents(path);
    assert_eq!(documents.len(), 1, "{path} holds one document");
    documents.remove(0)
}

fn config(path: &str) -> Config {
    Config::load(&root().join(path)).unwrap_or_else(|error| panic!("{path}: {error}"))
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// Bytes from a Kubernetes quantity such as `640Mi`.
fn quantity_bytes(quantity: &str) -> u64 {
    let (number, unit) = quantity.split_at(
        quantity
            .find(|c: char| c.is_alphabetic())
            .unwrap_or(quantity.len()),
    );
    let factor = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        other => panic!("unit {other}"),
    };
    number.parse::<u64>().expect("number") * factor
}

#[test]
fn every_yaml_and_json_file_parses() {
    let files = files_under(&root().join("deploy"));
    let mut checked = 0;
    for file in &files {
        let relative = file
            .strip_prefix(root())
            .expect("under root")
            .to_string_lossy()
            .into_owned();
        match file.extension().and_then(|extension| extension.to_str()) {
            Some("yaml" | "yml") => {
                assert!(!yaml_documents(&relative).is_empty(), "{relative} is empty");
                checked += 1;
            }
            Some("json") => {
                serde_json::from_str::<Value>(&read(&relative))
                    .unwrap_or_else(|error| panic!("{relative}: {error}"));
                checked += 1;
            }
            _ => {}
        }
    }
    assert!(checked >= 12, "only {checked} YAML/JSON files found");
}

#[test]
fn deployed_configs_differ_from_the_documented_one_only_where_they_say() {
    let base = config("config/gateway.toml");
    let mut defaults = Config::default();
    defaults.upstream.api_key_env = Some(plextera_gateway::config::DEFAULT_API_KEY_ENV.to_owned());
    assert_eq!(
        base, defaults,
        "config/gateway.toml shows the defaults (naming the key's variable)"
    );

    let mut container = base.clone();
    container.server.admin_listen = "0.0.0.0:9090".parse().expect("addr");
    container.server.shutdown_delay = Duration::from_secs(5);
    container.server.worker_threads = config("deploy/kubernetes/gateway.toml").server.worker_threads;
    assert!(
        container.server.worker_threads.is_some(),
        "the container sets worker_threads"
    );
    container.upstream.api_key_env = None;
    container.upstream.api_key_file = Some(format!("{SECRET_DIR}/api-key").into());
    assert_eq!(config("deploy/kubernetes/gateway.toml"), container);

    let mut host = base.clone();
    host.upstream.api_key_env = None;
    host.upstream.api_key_file = Some("/etc/plextera-gateway/api-key".into());
    assert_eq!(config("deploy/systemd/gateway.toml"), host);
}

/// Every `*_file` key's path in `text`, commented-out examples included: `(key, path)`.
fn file_paths(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim_start_matches('#').trim();
            let (key, value) = line.split_once('=')?;
            let key = key.trim();
            if !key.ends_with("_file") || key.contains(' ') {
                return None;
            }
            let path = value.trim().strip_prefix('"')?.split('"').next()?;
            Some((key.to_owned(), path.to_owned()))
        })
        .collect()
}

#[test]
fn every_file_path_in_the_deployed_configs_is_where_that_deployment_puts_its_secrets() {
    for (config, dir) in [
        ("deploy/kubernetes/gateway.toml", SECRET_DIR),
        ("deploy/systemd/gateway.toml", "/etc/plextera-gateway"),
    ] {
        let paths = file_paths(&read(config));
        let keys: BTreeSet<&str> = paths.iter().map(|(key, _)| key.as_str()).collect();
        for key in [
            "api_key_file",
            "client_tokens_file",
            "password_file",
            "secrets_file",
            "ca_file",
        ] {
            assert!(keys.contains(key), "{config}: no {key} example");
        }
        for (key, path) in &paths {
            assert!(
                Path::new(path).parent() == Some(Path::new(dir)),
                "{config}: {key} = {path:?} is not in {dir}/"
            );
        }
    }
}

#[test]
fn the_load_bench_config_points_at_the_bench_upstream() {
    let bench = config("benches/load/gateway.toml");
    let upstream = read("benches/load/nginx.conf");
    let port = bench.upstream.base_url.rsplit(':').next().expect("a port");
    assert!(
        upstream.contains(&format!("listen 127.0.0.1:{port} ")),
        "benches/load/nginx.conf does not listen on the port the bench gateway calls ({port})"
    );
    assert_eq!(bench.upstream.api_key_env.as_deref(), Some("BENCH_API_KEY"));
    for script in ["benches/load.sh", "benches/memory.sh"] {
        let text = read(script);
        assert!(
            text.contains("BENCH_API_KEY=bench-secret"),
            "{script} sets the key variable"
        );
        for port in [bench.server.listen.port(), bench.server.admin_listen.port()] {
            assert!(text.contains(&port.to_string()), "{script} talks to port {port}");
        }
    }
}

#[test]
fn the_deployment_matches_the_config_it_mounts() {
    let gateway_config = config("deploy/kubernetes/gateway.toml");
    let deployment = yaml("deploy/kubernetes/deployment.yaml");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];

    assert!(
        deployment["spec"]["replicas"].as_u64() >= Some(2),
        "at least two replicas"
    );
    let port = |name: &str| {
        container["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .find(|port| port["name"] == name)
            .and_then(|port| port["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("no {name} port"))
    };
    assert_eq!(port("http"), u64::from(gateway_config.server.listen.port()));
    assert_eq!(
        port("admin"),
        u64::from(gateway_config.server.admin_listen.port())
    );
    assert!(
        gateway_config.server.admin_listen.ip().is_unspecified(),
        "probes reach the admin port"
    );

    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["readinessProbe"]["httpGet"]["port"], "admin");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["livenessProbe"]["httpGet"]["port"], "admin");

    // The key is a file from the Secret, mounted as a volume (never subPath, which the kubelet
    // does not update), so a rotated Secret reaches the running gateway; nothing secret is in the
    // environment, where it could not change.
    assert!(gateway_config.upstream.api_key_env.is_none(), "no key variable");
    let key_file = gateway_config
        .upstream
        .api_key_file
        .clone()
        .expect("the key comes from a file");
    let env = container["env"].as_array().expect("env");
    assert!(
        env.iter()
            .all(|variable| variable["valueFrom"]["secretKeyRef"].is_null()),
        "no environment variable from a Secret: {env:?}"
    );
    assert!(container["envFrom"].is_null(), "no envFrom");
    let mounts = container["volumeMounts"].as_array().expect("mounts");
    assert!(
        mounts.iter().all(|mount| mount["subPath"].is_null()),
        "no subPath mount: the kubelet never updates those"
    );
    let key_mount = mounts
        .iter()
        .find(|mount| key_file.parent().and_then(Path::to_str) == mount["mountPath"].as_str())
        .unwrap_or_else(|| panic!("no volume mounted at {}", key_file.display()));
    let key_volume = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|volume| volume["name"] == key_mount["name"])
        .expect("the key's volume");
    let secret = yaml("deploy/kubernetes/secret.example.yaml");
    assert_eq!(key_volume["secret"]["secretName"], secret["metadata"]["name"]);
    assert!(
        key_volume["secret"]["items"].is_null(),
        "the whole Secret is mounted, so later items (client tokens, Redis password) appear too"
    );
    let key_name = key_file
        .file_name()
        .and_then(|name| name.to_str())
        .expect("a name");
    let placeholder = secret["stringData"][key_name]
        .as_str()
        .unwrap_or_else(|| panic!("the example Secret holds item {key_name}"));
    assert!(
        placeholder.starts_with("REPLACE_WITH"),
        "the example key is a placeholder"
    );

    let args: Vec<&str> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let config_arg = args
        .iter()
        .position(|arg| *arg == "--config")
        .map(|index| args[index + 1])
        .expect("--config");
    let mount = container["volumeMounts"]
        .as_array()
        .expect("mounts")
        .iter()
        .find(|mount| config_arg.starts_with(mount["mountPath"].as_str().unwrap_or("-")))
        .expect("the config path is mounted");
    let volume = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|volume| volume["name"] == mount["name"])
        .expect("the mounted volume");
    let kustomization = yaml("deploy/kubernetes/kustomization.yaml");
    let generator = &kustomization["configMapGenerator"][0];
    assert_eq!(volume["configMap"]["name"], generator["name"]);
    assert!(config_arg.ends_with(generator["files"][0].as_str().expect("file")));

    let stop_budget = gateway_config.server.shutdown_delay + gateway_config.server.shutdown_grace;
    assert!(pod["terminationGracePeriodSeconds"].as_u64().expect("grace") > stop_budget.as_secs());

    let security = &container["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);

    // benches/memory.sh: ~1.45 x cache.max_size in RSS for ~1 KB runs, more for smaller runs.
    let limit = quantity_bytes(
        container["resources"]["limits"]["memory"]
            .as_str()
            .expect("memory limit"),
    );
    assert!(
        limit as f64 >= 1.8 * gateway_config.cache.max_size.as_u64() as f64,
        "limit {limit}"
    );
}

#[test]
fn services_expose_the_public_port_and_metrics_separately() {
    let service = yaml("deploy/kubernetes/service.yaml");
    let ports = service["spec"]["ports"].as_array().expect("ports");
    assert_eq!(ports.len(), 1, "the public port only");
    assert_eq!(ports[0]["targetPort"], "http");

    let metrics = yaml("deploy/kubernetes/service-metrics.yaml");
    assert_eq!(metrics["spec"]["ports"][0]["targetPort"], "admin");
    let monitor = yaml("deploy/kubernetes/servicemonitor.yaml");
    assert_eq!(
        monitor["spec"]["endpoints"][0]["port"],
        metrics["spec"]["ports"][0]["name"]
    );
    assert_eq!(monitor["spec"]["endpoints"][0]["path"], "/metrics");
    for (label, value) in monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("labels")
    {
        assert_eq!(
            &metrics["metadata"]["labels"][label], value,
            "the monitor selects the metrics service"
        );
    }

    let policy = yaml("deploy/kubernetes/networkpolicy.yaml");
    let admin_rules: Vec<&Value> = policy["spec"]["ingress"]
        .as_array()
        .expect("ingress")
        .iter()
        .filter(|rule| {
            rule["ports"]
                .as_array()
                .is_some_and(|ports| ports.iter().any(|port| port["port"] == "admin"))
        })
        .collect();
    assert_eq!(admin_rules.len(), 1);
    assert_eq!(
        admin_rules[0]["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        "monitoring"
    );

    let pdb = yaml("deploy/kubernetes/pdb.yaml");
    assert!(pdb["spec"]["minAvailable"].as_u64() >= Some(1));
    let hpa = yaml("deploy/kubernetes/hpa.yaml");
    assert!(hpa["spec"]["minReplicas"].as_u64() >= Some(2));
    assert_eq!(
        hpa["spec"]["scaleTargetRef"]["name"],
        yaml("deploy/kubernetes/deployment.yaml")["metadata"]["name"]
    );
}

#[test]
fn the_kustomization_lists_every_manifest_but_the_secret_example() {
    let kustomization = yaml("deploy/kubernetes/kustomization.yaml");
    let resources: BTreeSet<&str> = kustomization["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for resource in &resources {
        assert!(
            root().join("deploy/kubernetes").join(resource).exists(),
            "{resource} missing"
        );
    }
    let manifests: BTreeSet<String> = std::fs::read_dir(root().join("deploy/kubernetes"))
        .expect("dir")
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| name.ends_with(".yaml") && name != "kustomization.yaml")
        .collect();
    let expected: BTreeSet<String> = manifests
        .into_iter()
        .filter(|name| name != "secret.example.yaml")
        .collect();
    assert_eq!(resources, expected.iter().map(String::as_str).collect());
}

#[test]
fn the_dockerfile_matches_the_container_config() {
    let dockerfile = read("deploy/Dockerfile");
    let container = config("deploy/kubernetes/gateway.toml");
    assert!(
        dockerfile.matches("\nFROM ").count() + usize::from(dockerfile.starts_with("FROM ")) >= 2,
        "multi-stage"
    );
    let expose = dockerfile
        .lines()
        .find(|line| line.starts_with("EXPOSE "))
        .expect("EXPOSE");
    for port in [
        container.server.listen.port(),
        container.server.admin_listen.port(),
    ] {
        assert!(
            expose.split_whitespace().any(|word| word == port.to_string()),
            "{expose} lacks {port}"
        );
    }
    assert!(dockerfile.contains("COPY deploy/kubernetes/gateway.toml /etc/plextera-gateway/gateway.toml"));
    assert!(dockerfile.contains("\"--config\", \"/etc/plextera-gateway/gateway.toml\""));
    assert!(
        dockerfile
            .lines()
            .any(|line| line.trim_start().starts_with("HEALTHCHECK"))
    );
    assert!(dockerfile.contains("--health-check"));
    assert!(dockerfile.lines().any(|line| line.starts_with("USER nonroot")));
    assert!(!dockerfile.contains("PLEXTERA_API_KEY="), "no key baked in");
    // The dependency layer stubs every bench target Cargo.toml declares (cargo refuses a manifest
    // whose targets are missing).
    let manifest: toml::Table = read("Cargo.toml").parse().expect("Cargo.toml");
    for bench in manifest["bench"].as_array().expect("[[bench]]") {
        let name = bench["name"].as_str().expect("name");
        let stubs = dockerfile
            .lines()
            .find(|line| line.contains("for bench in"))
            .expect("bench stubs");
        assert!(
            stubs
                .split_whitespace()
                .any(|word| word.trim_end_matches(';') == name),
            "no stub for {name}"
        );
    }
    let dockerignore = read(".dockerignore");
    assert!(
        dockerignore
            .lines()
            .next()
            .is_some_and(|line| line.trim() == "*" || line.starts_with('#'))
    );
    assert!(dockerignore.contains("!deploy/kubernetes/gateway.toml"));
    // Every file the sources include at compile time is in the build context and copied.
    let included = "examples/watch-runs.html";
    assert!(
        dockerignore.contains(&format!("!{included}")),
        "{included} ignored"
    );
    assert!(
        dockerfile.contains(&format!("COPY {included} {included}")),
        "{included} not copied"
    );
}

#[test]
fn the_systemd_unit_is_hardened_and_wired_to_its_config() {
    let unit = read("deploy/systemd/plextera-gateway.service");
    let directives: BTreeSet<&str> = unit
        .lines()
        .map(str::trim)
        .filter(|line| !line.starts_with('#') && line.contains('='))
        .collect();
    for directive in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "User=plextera-gateway",
        "Group=plextera-gateway",
        "RestartPreventExitStatus=78",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "PrivateUsers=yes",
        "ProcSubset=pid",
        "SystemCallFilter=~@privileged @resources",
        "SystemCallErrorNumber=EPERM",
        "IPAddressDeny=link-local multicast",
        "EnvironmentFile=-/etc/plextera-gateway/plextera-gateway.env",
        "ExecStart=/usr/local/bin/plextera-gateway --config /etc/plextera-gateway/gateway.toml --log-format json",
    ] {
        assert!(directives.contains(directive), "missing {directive}");
    }
    // A LoadCredential= copy is made once at start: a rotated key would never reach the service.
    // A DynamicUser= has no fixed group to own the key file.
    for absent in ["LoadCredential", "DynamicUser"] {
        assert!(
            !directives.iter().any(|line| line.starts_with(absent)),
            "{absent}= is back"
        );
    }
    // 75 (a port in use) is transient and restarted; only 78 (a refused config) is not.
    assert!(!unit.contains("RestartPreventExitStatus=75"));
    let sysusers = read("deploy/systemd/plextera-gateway.sysusers");
    assert!(
        sysusers
            .lines()
            .any(|line| line.starts_with("u plextera-gateway ")),
        "the sysusers file creates the unit's user"
    );
    let host = config("deploy/systemd/gateway.toml");
    let key_file = host
        .upstream
        .api_key_file
        .clone()
        .expect("the key comes from a file");
    assert_eq!(key_file, Path::new("/etc/plextera-gateway/api-key"));
    assert!(
        unit.contains("-o root -g plextera-gateway /dev/stdin /etc/plextera-gateway/api-key"),
        "the install steps make the key readable by the service's group"
    );
    // The memory bound holds the cache as the Kubernetes limit does (benches/memory.sh: 1.8 x).
    let memory_max = directives
        .iter()
        .find_map(|line| line.strip_prefix("MemoryMax="))
        .and_then(|value| value.strip_suffix('M'))
        .and_then(|value| value.parse::<u64>().ok())
        .expect("MemoryMax=<n>M");
    assert!(
        (memory_max << 20) as f64 >= 1.8 * host.cache.max_size.as_u64() as f64,
        "MemoryMax={memory_max}M"
    );
    let stop = unit
        .lines()
        .find_map(|line| line.strip_prefix("TimeoutStopSec="))
        .and_then(|value| value.parse::<u64>().ok())
        .expect("TimeoutStopSec");
    assert!(stop > (host.server.shutdown_delay + host.server.shutdown_grace).as_secs());
    assert!(!read("deploy/systemd/plextera-gateway.env").contains("PLEXTERA_API_KEY="));

    let analyze = which("systemd-analyze").unwrap_or_else(|()| {
        panic!("systemd-analyze is needed to verify the unit: install the systemd package (.ci/run does)")
    });
    let dir = tempfile::tempdir().expect("temp dir");
    let copy = dir.path().join("plextera-gateway.service");
    std::fs::write(
        &copy,
        unit.replace(
            "/usr/local/bin/plextera-gateway",
            env!("CARGO_BIN_EXE_plextera-gateway"),
        ),
    )
    .expect("write unit");
    let output = std::process::Command::new(analyze)
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {stderr}"
    );
}

/// The exposures `systemd-analyze security` still reports for the unit, each needed by what the
/// gateway is: a network proxy (Internet sockets and the host's network, with outbound addresses
/// left open for Plextera and Redis), AF_UNIX for $NOTIFY_SOCKET (and a Redis socket), the host's
/// root directory for its binary and CA roots, and the rtc read that ProtectClock= leaves.
const ACCEPTED_EXPOSURES: [&str; 6] = [
    "RootDirectory=/RootImage=",
    "RestrictAddressFamilies=~AF_UNIX",
    "RestrictAddressFamilies=~AF_(INET|INET6)",
    "PrivateNetwork=",
    "DeviceAllow=",
    "IPAddressDeny=",
];
/// The overall exposure the unit may score (0 best, 10 worst). It scores 1.1 on systemd 252 with
/// every exposure above accepted; each hardening option removed adds 0.1 to 0.2, and a missing
/// group of them (the system-call filter, the user namespace, the read-only system) lands above
/// this. systemd rates 2.0 and below "OK".
const EXPOSURE_THRESHOLD: f64 = 1.5;

#[test]
fn the_systemd_unit_scores_well_in_systemd_analyze_security() {
    let analyze = which("systemd-analyze").unwrap_or_else(|()| {
        panic!("systemd-analyze is needed to score the unit: install the systemd package (.ci/run does)")
    });
    let dir = tempfile::tempdir().expect("temp dir");
    let unit = dir.path().join("plextera-gateway.service");
    std::fs::copy(root().join("deploy/systemd/plextera-gateway.service"), &unit).expect("copy unit");
    let output = std::process::Command::new(analyze)
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&unit)
        .env("SYSTEMD_COLORS", "0")
        .output()
        .expect("run systemd-analyze security");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let score = stdout
        .lines()
        .find_map(|line| line.split_once("Overall exposure level for plextera-gateway.service: "))
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|number| number.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no overall exposure in:\n{stdout}\n{stderr}"));
    println!(
        "systemd-analyze security: plextera-gateway.service exposure {score} (threshold {EXPOSURE_THRESHOLD})"
    );
    let unexpected: Vec<&str> = stdout
        .lines()
        .filter(|line| line.starts_with('✗'))
        .map(|line| line.trim_start_matches('✗').trim())
        .filter(|line| {
            !ACCEPTED_EXPOSURES
                .iter()
                .any(|accepted| line.split_whitespace().next() == Some(accepted))
        })
        .collect();
    assert!(
        unexpected.is_empty(),
        "exposures not accounted for: {unexpected:#?}"
    );
    assert!(
        score <= EXPOSURE_THRESHOLD,
        "exposure {score} above {EXPOSURE_THRESHOLD}:\n{stdout}"
    );
}

/// The system calls a unit's `SystemCallFilter=` lines allow: the first allow-list, less every
/// `~` deny-list, groups expanded by `systemd-analyze syscall-filter` (this systemd's idea of them).
fn unit_syscall_allowance(unit: &str, analyze: &Path) -> BTreeSet<String> {
    fn expand(group: &str, analyze: &Path) -> BTreeSet<String> {
        let output = std::process::Command::new(analyze)
            .args(["syscall-filter", "--no-pager", group])
            .output()
            .expect("systemd-analyze syscall-filter");
        assert!(output.status.success(), "syscall-filter {group}");
        let mut calls = BTreeSet::new();
        for line in String::from_utf8_lossy(&output.stdout).lines().skip(1) {
            let word = line.trim();
            if word.is_empty() || word.starts_with('#') {
                continue;
            }
            if word.starts_with('@') {
                calls.extend(expand(word, analyze));
            } else {
                calls.insert(word.to_owned());
            }
        }
        calls
    }
    let mut allowed = BTreeSet::new();
    let mut denied = BTreeSet::new();
    for value in unit
        .lines()
        .filter_map(|line| line.strip_prefix("SystemCallFilter="))
    {
        let (deny, names) = match value.strip_prefix('~') {
            Some(names) => (true, names),
            None => (false, value),
        };
        for name in names.split_whitespace() {
            let calls = if name.starts_with('@') {
                expand(name, analyze)
            } else {
                BTreeSet::from([name.to_owned()])
            };
            if deny {
                denied.extend(calls)
            } else {
                allowed.extend(calls)
            }
        }
    }
    assert!(
        !allowed.is_empty() && !denied.is_empty(),
        "the unit allows a set and denies groups"
    );
    allowed.difference(&denied).cloned().collect()
}

/// The unit's system-call filter, checked against what the gateway does: started under strace,
/// it serves a miss, a hit and a scrape, re-reads its key file on SIGHUP and drains on SIGTERM, and
/// every system call it made must be one the filter lets through (a filtered call would fail with
/// EPERM under the unit, or kill the process without SystemCallErrorNumber=).
#[tokio::test(flavor = "multi_thread")]
async fn the_gateway_makes_only_system_calls_the_unit_allows() {
    let analyze = which("systemd-analyze").unwrap_or_else(|()| {
        panic!("systemd-analyze is needed to expand the unit's filter: install systemd (.ci/run does)")
    });
    let strace = which("strace").unwrap_or_else(|()| {
        panic!("strace is needed to record the gateway's system calls: install strace (.ci/run does)")
    });
    let allowed = unit_syscall_allowance(&read("deploy/systemd/plextera-gateway.service"), &analyze);

    let mock = MockUpstream::start().await;
    mock.set("done", Reply::run("done", "COMPLETED"));
    let dir = tempfile::tempdir().expect("temp dir");
    let key_file = dir.path().join("api-key");
    std::fs::write(&key_file, "first-key-aaaa\n").expect("write key");
    let trace = dir.path().join("trace");
    let config = support::write_config(
        dir.path(),
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [upstream]\nbase_url = \"{}\"\napi_key_file = \"{}\"\n",
            mock.base_url(),
            key_file.display()
        ),
    );
    let strace_path = strace.to_string_lossy().into_owned();
    let trace_path = trace.to_string_lossy().into_owned();
    let mut traced = support::GatewayProcess::start_under(
        &[&strace_path, "-f", "-qq", "-o", &trace_path],
        &["--config", &config],
        &[],
    );
    for _ in 0..2 {
        assert_eq!(traced.get_run("done").await.status, StatusCode::OK);
    }
    let metrics = support::TestClient::new()
        .send(
            http::Method::GET,
            &format!("http://{}/metrics", traced.admin),
            &[],
        )
        .await;
    assert_eq!(metrics.status, StatusCode::OK);
    // Signals go to the gateway itself, strace's child (strace would take them as its own).
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", traced.pid()))
        .expect("strace's children");
    let gateway = nix::unistd::Pid::from_raw(
        children
            .split_whitespace()
            .next()
            .and_then(|pid| pid.parse().ok())
            .expect("the gateway runs under strace"),
    );
    std::fs::write(&key_file, "second-key-bbbb\n").expect("rotate key");
    nix::sys::signal::kill(gateway, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    support::eventually("the rotated key is sent", || async {
        mock.set("live", Reply::run("live", "PROCESSING"));
        assert_eq!(traced.get_run("live").await.status, StatusCode::OK);
        mock.requests().last().is_some_and(|request| {
            request.headers["authorization"].to_str().ok() == Some("api-key second-key-bbbb")
        })
    })
    .await;
    nix::sys::signal::kill(gateway, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    assert!(traced.wait().success(), "{}", traced.logs());

    let recorded = std::fs::read_to_string(&trace).expect("the trace");
    let call = regex::Regex::new(r"^\d+\s+([a-z0-9_]+)\(").expect("regex");
    let used: BTreeSet<String> = recorded
        .lines()
        .filter_map(|line| call.captures(line).map(|found| found[1].to_owned()))
        .collect();
    assert!(
        used.len() >= 30 && used.contains("accept4"),
        "a real trace: {used:?}"
    );
    let refused: Vec<&String> = used.difference(&allowed).collect();
    println!(
        "the gateway made {} distinct system calls, all allowed by the unit: {used:?}",
        used.len()
    );
    assert!(
        refused.is_empty(),
        "system calls the unit's filter refuses: {refused:?}"
    );
}

fn which(tool: &str) -> Result<PathBuf, ()> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(tool))
        .find(|path| path.is_file())
        .ok_or(())
}

/// Every `plextera_gateway_*` and `process_*` metric named in a PromQL expression.
fn metric_names(expressions: &[String]) -> BTreeSet<String> {
    let pattern = regex::Regex::new(r"\b(plextera_gateway_[a-z_]+|process_[a-z_]+)\b").expect("regex");
    expressions
        .iter()
        .flat_map(|expression| {
            pattern
                .find_iter(expression)
                .map(|found| found.as_str().to_owned())
        })
        .collect()
}

fn dashboard_expressions() -> Vec<String> {
    let dashboard: Value = serde_json::from_str(&read("deploy/grafana/plextera-gateway.json")).expect("json");
    dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|panel| panel["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|target| target["expr"].as_str().map(str::to_owned))
        .collect()
}

fn alert_expressions() -> Vec<String> {
    let alerts = yaml("deploy/prometheus/alerts.yml");
    alerts["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|group| group["rules"].as_array().cloned().unwrap_or_default())
        .filter_map(|rule| rule["expr"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn every_metric_the_dashboard_and_alerts_query_exists_in_a_scrape() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |_| {}).await;
    mock.set("done", Reply::run("done", "COMPLETED"));
    mock.set("live", Reply::run("live", "PROCESSING"));
    mock.set("denied", Reply::status(StatusCode::UNAUTHORIZED, "{}"));
    for id in ["done", "done", "live", "denied", "missing"] {
        gateway.get_run(id).await;
    }
    let scrape = gateway.scrape().await;
    let families: BTreeSet<String> = scrape.types.keys().cloned().collect();

    let dashboard = dashboard_expressions();
    let alerts = alert_expressions();
    assert!(
        dashboard.len() >= 15 && alerts.len() >= 6,
        "expressions were found"
    );
    let names = metric_names(&dashboard.iter().chain(&alerts).cloned().collect::<Vec<_>>());
    assert!(names.len() >= 12, "{names:?}");
    for name in &names {
        let family = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix).filter(|base| families.contains(*base)))
            .unwrap_or(name);
        assert!(
            families.contains(family),
            "{name} is queried but not exported; exported: {families:?}"
        );
    }
}

/// A heading's anchor as GitHub makes it: lower case, punctuation but `-` and `_` dropped,
/// spaces to `-`.
fn github_anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

#[test]
fn every_alert_has_a_runbook_section_that_exists() {
    let alerts = yaml("deploy/prometheus/alerts.yml");
    let rules: Vec<Value> = alerts["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|group| group["rules"].as_array().cloned().unwrap_or_default())
        .collect();
    assert!(rules.len() >= 12, "{} rules", rules.len());
    let prefix = "https://github.com/plextera/plextera-gateway/blob/main/";
    for rule in &rules {
        let name = rule["alert"].as_str().expect("an alerting rule");
        let url = rule["annotations"]["runbook_url"]
            .as_str()
            .unwrap_or_else(|| panic!("{name} has no runbook_url"));
        let (file, anchor) = url
            .strip_prefix(prefix)
            .and_then(|rest| rest.split_once('#'))
            .unwrap_or_else(|| panic!("{name}: {url} is not {prefix}<file>#<anchor>"));
        let text = read(file);
        let anchors: Vec<String> = text
            .lines()
            .filter_map(|line| line.strip_prefix("## ").or_else(|| line.strip_prefix("### ")))
            .map(github_anchor)
            .collect();
        assert!(
            anchors.iter().any(|candidate| candidate == anchor),
            "{name}: no heading in {file} has the anchor #{anchor}"
        );
        assert_eq!(anchor, github_anchor(name), "{name}: its own section");
    }
}

#[test]
fn every_dashboard_query_is_filtered_by_job_namespace_and_pod() {
    let dashboard: Value = serde_json::from_str(&read("deploy/grafana/plextera-gateway.json")).expect("json");
    let variables = dashboard["templating"]["list"].as_array().expect("variables");
    for name in ["job", "namespace", "pod"] {
        let variable = variables
            .iter()
            .find(|variable| variable["name"] == name)
            .unwrap_or_else(|| panic!("no ${name} variable"));
        assert_eq!(variable["type"], "query", "${name}");
        assert_eq!(variable["multi"], true, "${name} is multi-value");
        assert_eq!(variable["includeAll"], true, "${name} includes All");
        // All must also match series without the label (a bare-metal scrape has no pod).
        assert_eq!(variable["allValue"], ".*", "${name}");
        assert_eq!(variable["datasource"]["uid"], "${datasource}");
    }
    assert!(variables.iter().any(|variable| variable["name"] == "datasource"));
    let filter = r#"job=~"$job", namespace=~"$namespace", pod=~"$pod""#;
    let selector =
        regex::Regex::new(r"\b(plextera_gateway_[a-z_]+|process_[a-z_]+)(\{[^}]*\})?").expect("regex");
    let expressions = dashboard_expressions();
    assert!(expressions.len() >= 20);
    for expression in &expressions {
        for series in selector.captures_iter(expression) {
            let matchers = series.get(2).map_or("", |matchers| matchers.as_str());
            assert!(
                matchers.starts_with(&format!("{{{filter}")),
                "{} is not filtered by {filter}: {expression}",
                &series[1]
            );
        }
    }
    let upstream_by_outcome = expressions.iter().any(|expression| {
        expression.contains("sum by (outcome) (rate(plextera_gateway_upstream_requests_total")
    });
    assert!(upstream_by_outcome, "upstream calls by outcome");
    assert!(
        expressions
            .iter()
            .any(|expression| expression.contains("plextera_gateway_upstream_connections")),
        "upstream connections"
    );
}

fn cargo_version() -> String {
    let manifest: toml::Table = read("Cargo.toml").parse().expect("Cargo.toml");
    manifest["package"]["version"]
        .as_str()
        .expect("version")
        .to_owned()
}

#[test]
fn the_manifests_run_the_image_of_the_crate_version() {
    let version = cargo_version();
    let deployment = yaml("deploy/kubernetes/deployment.yaml");
    let image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
        .as_str()
        .expect("image");
    assert_eq!(image, format!("plextera-gateway:{version}"), "deployment.yaml");
    let kustomization = yaml("deploy/kubernetes/kustomization.yaml");
    let images = kustomization["images"].as_array().expect("images");
    assert_eq!(images.len(), 1);
    assert_eq!(images[0]["name"], "plextera-gateway");
    assert_eq!(
        images[0]["newTag"].as_str(),
        Some(version.as_str()),
        "kustomization.yaml"
    );
    for file in files_under(&root().join("deploy")) {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        assert!(!text.contains(":latest"), "{} names :latest", file.display());
    }
}

/// CPUs from a Kubernetes CPU quantity (`2`, `"1500m"`).
fn cpus(quantity: &Value) -> f64 {
    match quantity {
        Value::Number(number) => number.as_f64().expect("a number"),
        Value::String(text) => match text.strip_suffix('m') {
            Some(millis) => millis.parse::<f64>().expect("millicpus") / 1000.0,
            None => text.parse().expect("cpus"),
        },
        other => panic!("cpu quantity {other}"),
    }
}

#[test]
fn worker_threads_match_the_cpu_limit() {
    let deployment = yaml("deploy/kubernetes/deployment.yaml");
    let resources = &deployment["spec"]["template"]["spec"]["containers"][0]["resources"];
    let limit = cpus(&resources["limits"]["cpu"]);
    assert!(
        limit >= 1.0 && limit.fract() == 0.0,
        "a CPU limit of whole CPUs: {limit}"
    );
    assert!(cpus(&resources["requests"]["cpu"]) <= limit);
    assert!(!resources["limits"]["memory"].is_null(), "the memory limit stays");
    let threads = config("deploy/kubernetes/gateway.toml")
        .server
        .worker_threads
        .expect("the container config sets server.worker_threads")
        .get();
    assert_eq!(
        threads as f64, limit,
        "server.worker_threads against the CPU limit"
    );
}

#[test]
fn prometheus_finds_the_monitor_and_the_rules_under_one_job_name() {
    let monitor = yaml("deploy/kubernetes/servicemonitor.yaml");
    let rule = yaml("deploy/kubernetes/prometheusrule.yaml");
    let release = &monitor["metadata"]["labels"]["release"];
    assert_eq!(
        release, "kube-prometheus-stack",
        "the label kube-prometheus-stack selects on"
    );
    assert_eq!(
        &rule["metadata"]["labels"]["release"], release,
        "rules selected as monitors are"
    );
    // The job is named from the metrics Service's label, and the alerts use that name.
    let job_label = monitor["spec"]["jobLabel"].as_str().expect("jobLabel");
    let metrics = yaml("deploy/kubernetes/service-metrics.yaml");
    assert_eq!(metrics["metadata"]["labels"][job_label], JOB);
    let alerts = read("deploy/prometheus/alerts.yml");
    assert!(
        alerts.contains(&format!("absent(up{{job=\"{JOB}\"}})")),
        "an absent-target alert"
    );
    assert!(
        alerts.contains(&format!("up{{job=\"{JOB}\"}} == 0")),
        "a target-down alert"
    );
    let dashboard = yaml("deploy/kubernetes/grafana-dashboard.yaml");
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
}

#[test]
fn generated_files_are_what_derive_configs_writes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = std::process::Command::new("python3")
        .arg(root().join("deploy/derive-configs.py"))
        .arg(dir.path())
        .output()
        .expect("python3 runs deploy/derive-configs.py");
    assert!(
        output.status.success(),
        "derive-configs.py: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let generated = files_under(dir.path());
    assert_eq!(generated.len(), 4, "{generated:?}");
    for file in generated {
        let relative = file.strip_prefix(dir.path()).expect("under the output");
        let fresh = std::fs::read_to_string(&file).expect("generated");
        assert!(
            fresh == read(&relative.to_string_lossy()),
            "{} is not what deploy/derive-configs.py writes: run it",
            relative.display()
        );
    }
    // And they say what their sources say, read as YAML.
    let rule = yaml("deploy/kubernetes/prometheusrule.yaml");
    assert_eq!(rule["kind"], "PrometheusRule");
    assert_eq!(rule["spec"], yaml("deploy/prometheus/alerts.yml"));
    let dashboard = yaml("deploy/kubernetes/grafana-dashboard.yaml");
    assert_eq!(dashboard["kind"], "ConfigMap");
    assert_eq!(
        dashboard["data"]["plextera-gateway.json"].as_str(),
        Some(read("deploy/grafana/plextera-gateway.json").as_str())
    );
}

#[test]
fn the_dockerfile_pins_its_base_images() {
    let stages = dockerfile::parse(&read("deploy/Dockerfile"));
    assert_eq!(stages.len(), 2, "a build stage and a runtime stage");
    let manifest: toml::Table = read("Cargo.toml").parse().expect("Cargo.toml");
    let rust_version = manifest["package"]["rust-version"]
        .as_str()
        .expect("rust-version");
    let numbers = |version: &str| -> Vec<u64> {
        version
            .split('.')
            .map(|part| part.parse().unwrap_or_else(|_| panic!("{version}")))
            .collect()
    };
    let build = &stages[0].image;
    let tag = build
        .strip_prefix("rust:")
        .and_then(|tag| tag.strip_suffix("-slim-bookworm"))
        .unwrap_or_else(|| panic!("{build}: rust:<x.y.z>-slim-bookworm"));
    assert_eq!(
        numbers(tag).len(),
        3,
        "{build}: an exact release, not a moving x.y tag"
    );
    assert!(
        numbers(tag) >= numbers(rust_version),
        "{build} below rust-version {rust_version}"
    );
    let runtime = &stages[1].image;
    assert!(
        runtime.starts_with("gcr.io/distroless/cc-debian12:nonroot"),
        "{runtime}: distroless cc on Debian 12, the glibc the bookworm build links against"
    );
    for image in [build, runtime] {
        assert!(
            !image.contains(":latest") && image.contains(':'),
            "{image}: a pinned tag"
        );
    }
}

/// Builds what the image would hold, the way deploy/Dockerfile does, and runs the binary.
///
/// Cost: the build stage compiles the dependencies (against stub sources), then the gateway, in
/// release with the crate's fat LTO, as the image does: about 100 s + 140 s on two cores from an
/// empty target directory, and only the second step (~140 s) when the dependencies are already in
/// `target/dockerfile/target` (kept between runs; ~430 MiB). That fits CI's budget, so the release
/// profile is not changed for the test.
#[test]
fn the_dockerfile_builds_an_image_whose_binary_runs() {
    let stages = dockerfile::parse(&read("deploy/Dockerfile"));
    let context = dockerfile::Context {
        root: root(),
        ignore: dockerfile::DockerIgnore::parse(&read(".dockerignore")),
    };
    let scratch = root().join("target/dockerfile");
    let built = dockerfile::build(
        &stages[0],
        &context,
        &scratch.join("workdir"),
        &scratch.join("target"),
        &[("CARGO_TERM_COLOR", "never")],
    );
    let image = tempfile::tempdir().expect("temp dir");
    let rest = dockerfile::runtime(&stages[1], &built, &context, image.path());
    let in_image = |path: &str| image.path().join(path.trim_start_matches('/'));
    let argument = |keyword: &str| {
        rest.iter()
            .find(|instruction| instruction.keyword == keyword)
            .unwrap_or_else(|| panic!("no {keyword}"))
            .arguments
            .clone()
    };

    let entrypoint = dockerfile::exec_form(&argument("ENTRYPOINT"));
    let cmd = dockerfile::exec_form(&argument("CMD"));
    let healthcheck = argument("HEALTHCHECK");
    let healthcheck = dockerfile::exec_form(
        healthcheck
            .split_once(" CMD ")
            .map(|(_, command)| command.trim())
            .unwrap_or_else(|| panic!("HEALTHCHECK {healthcheck}: CMD [...]")),
    );
    let binary = in_image(&entrypoint[0]);
    assert!(
        binary.is_file(),
        "ENTRYPOINT {} is not in the image",
        entrypoint[0]
    );
    assert_eq!(healthcheck[0], entrypoint[0], "the health check runs the gateway");
    assert!(healthcheck.iter().any(|word| word == "--health-check"));
    for command in [&cmd, &healthcheck] {
        let config_path = command
            .iter()
            .position(|word| word == "--config")
            .and_then(|index| command.get(index + 1))
            .unwrap_or_else(|| panic!("{command:?} names no --config"));
        let image_config = Config::load(&in_image(config_path))
            .unwrap_or_else(|error| panic!("{config_path} in the image: {error}"));
        assert_eq!(image_config, config("deploy/kubernetes/gateway.toml"));
    }

    let version = std::process::Command::new(&binary)
        .arg("--version")
        .output()
        .expect("run --version");
    assert!(version.status.success());
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("plextera-gateway {}", cargo_version())
    );
    let help = std::process::Command::new(&binary)
        .arg("--help")
        .output()
        .expect("run --help");
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("--health-check"));
    // The image's binary accepts the image's config: `--check-config` on it, with the Secret's
    // mount point moved to a scratch directory holding a placeholder key.
    let image_config_text =
        std::fs::read_to_string(in_image("/etc/plextera-gateway/gateway.toml")).expect("the image's config");
    let secrets = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        secrets.path().join("api-key"),
        "placeholder-key-for-check-config\n",
    )
    .expect("write key");
    let mount = "/var/run/secrets/plextera-gateway";
    assert!(
        image_config_text.contains(mount),
        "the config reads the key from the Secret's mount"
    );
    let checked_config = secrets.path().join("gateway.toml");
    std::fs::write(
        &checked_config,
        image_config_text.replace(mount, &secrets.path().display().to_string()),
    )
    .expect("write config");
    let check = std::process::Command::new(&binary)
        .arg("--config")
        .arg(&checked_config)
        .arg("--check-config")
        .output()
        .expect("run --check-config");
    assert!(
        check.status.success(),
        "--check-config on the image's config: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(!String::from_utf8_lossy(&check.stdout).contains("placeholder-key-for-check-config"));
    // The image's own command line parses (--help after it: clap checks the rest, then prints).
    let image_command = std::process::Command::new(&binary)
        .args(&cmd)
        .arg("--help")
        .output()
        .expect("run the image's CMD");
    assert!(
        image_command.status.success(),
        "CMD {cmd:?}: {}",
        String::from_utf8_lossy(&image_command.stderr)
    );
}
