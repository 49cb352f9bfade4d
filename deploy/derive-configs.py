#!/usr/bin/env python3
"""Writes the deploy files that are derived from others, so each fact has one source:

- deploy/kubernetes/gateway.toml and deploy/systemd/gateway.toml from config/gateway.toml;
- deploy/kubernetes/prometheusrule.yaml (a PrometheusRule) from deploy/prometheus/alerts.yml;
- deploy/kubernetes/grafana-dashboard.yaml (a ConfigMap for Grafana's dashboard sidecar) from
  deploy/grafana/plextera-gateway.json.

Run after changing any of the sources. tests/deploy.rs runs it into a temporary directory and checks
the committed files are what it writes, byte for byte, and that the configs differ from
config/gateway.toml only in the values changed here.

Usage: deploy/derive-configs.py [OUTPUT_ROOT]   (default: the repository; the files keep their
paths under it). Only the standard library: no YAML module, the sources are embedded as text."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE = (ROOT / "config/gateway.toml").read_text()
FIRST_LINE = "# plextera-gateway configuration. Every value shown is the default; delete what you do not change."

# The CPU limit of the gateway container in deploy/kubernetes/deployment.yaml (whole CPUs). The
# container config runs exactly this many worker threads: more would be throttled by the CFS quota
# in bursts, fewer would leave the limit unused. tests/deploy.rs checks the two agree.
CONTAINER_CPUS = 2
# Where the Deployment mounts the Secret `plextera-gateway` (a secret volume, not an environment
# variable: the kubelet swaps the files in place when the Secret changes, and the gateway re-reads
# them).
SECRET_DIR = "/var/run/secrets/plextera-gateway"
# Where the systemd unit's secrets live (root:plextera-gateway, mode 0640), beside its config.
HOST_SECRET_DIR = "/etc/plextera-gateway"
# The directory of the commented secret-file examples in config/gateway.toml (client tokens, Redis
# password, webhook secrets): each derived config points them at its own directory, so an example
# uncommented there names a file where that deployment puts its secrets. tests/deploy.rs checks
# every *_file path in the derived configs.
BASE_SECRET_DIR = "/run/secrets/plextera-gateway"
# The label kube-prometheus-stack's Prometheus selects ServiceMonitors and PrometheusRules by (its
# Helm release name). Keep servicemonitor.yaml's label the same.
PROMETHEUS_RELEASE_LABEL = ("release", "kube-prometheus-stack")


def derive(header, replacements):
    text = BASE.replace(FIRST_LINE, header)
    for old, new in replacements:
        assert old in text, f"config/gateway.toml no longer contains {old!r}"
        text = text.replace(old, new)
    return text


def indent(text, prefix):
    """Every non-empty line prefixed; empty lines stay empty (no trailing blanks)."""
    return "".join(prefix + line if line.strip() else line for line in text.splitlines(keepends=True))


def without_leading_comments(text):
    lines = text.splitlines(keepends=True)
    while lines and (lines[0].startswith("#") or not lines[0].strip()):
        lines.pop(0)
    return "".join(lines)


container = derive(
    "# plextera-gateway configuration for containers (the image's default, and the Kubernetes ConfigMap).\n"
    "# It is config/gateway.toml with the changes a container needs, marked \"container:\"; a test keeps\n"
    "# the rest identical. Regenerate with deploy/derive-configs.py.",
    [
        ('admin_listen = "127.0.0.1:9090"',
         '# container: probes and Prometheus reach the admin port from outside the container.\n'
         'admin_listen = "0.0.0.0:9090"'),
        ('shutdown_delay = "0s"',
         '# container: endpoints take a few seconds to drop a terminating pod.\nshutdown_delay = "5s"'),
        ('# worker_threads = 2',
         f'# container: the Deployment\'s CPU limit ({CONTAINER_CPUS}), so the runtime never runs more threads\n'
         '# than the CFS quota lets run at once.\n'
         f'worker_threads = {CONTAINER_CPUS}'),
        ('api_key_env = "PLEXTERA_API_KEY"',
         '# container: the key is a file from the Secret, not a variable (a variable cannot change).\n'
         '# api_key_env = "PLEXTERA_API_KEY"'),
        ('# api_key_file = "/run/secrets/plextera-api-key"',
         '# container: the Secret `plextera-gateway`, item `api-key`, mounted as a volume\n'
         f'# at {SECRET_DIR} (deployment.yaml); the gateway reads it again when the kubelet\n'
         '# swaps in a new version.\n'
         '# Run the image elsewhere with the key mounted there, readable by uid 65532, e.g.\n'
         f'# docker run -v "$PWD/api-key:{SECRET_DIR}/api-key:ro" plextera-gateway:VERSION\n'
         f'api_key_file = "{SECRET_DIR}/api-key"'),
        (f'"{BASE_SECRET_DIR}/', f'"{SECRET_DIR}/'),
        ('# ca_file = "/etc/plextera-gateway/ca.pem"',
         '# container: a CA bundle can be an item of the same Secret.\n'
         f'# ca_file = "{SECRET_DIR}/ca.pem"'),
        ('# ca_file = "/etc/plextera-gateway/collector-ca.pem"',
         '# container: the collector\'s CA can be an item of the same Secret.\n'
         f'# ca_file = "{SECRET_DIR}/collector-ca.pem"'),
    ],
)
host = derive(
    "# plextera-gateway configuration for the systemd unit (install as /etc/plextera-gateway/gateway.toml).\n"
    "# It is config/gateway.toml with the changes marked \"systemd:\"; a test keeps the rest identical.\n"
    "# Regenerate with deploy/derive-configs.py.",
    [
        ('api_key_env = "PLEXTERA_API_KEY"', '# api_key_env = "PLEXTERA_API_KEY"'),
        ('# api_key_file = "/run/secrets/plextera-api-key"',
         '# systemd: root:plextera-gateway, mode 0640, read by the service\'s user directly (not a\n'
         '# LoadCredential= copy, which would not change while the service runs): the gateway reads it\n'
         '# again when it changes and on `systemctl reload plextera-gateway`.\n'
         f'api_key_file = "{HOST_SECRET_DIR}/api-key"'),
        (f'"{BASE_SECRET_DIR}/', f'"{HOST_SECRET_DIR}/'),
    ],
)

label, value = PROMETHEUS_RELEASE_LABEL
prometheus_rule = (
    "# GENERATED by deploy/derive-configs.py from deploy/prometheus/alerts.yml: edit that file (promtool\n"
    "# checks and unit-tests it) and run the script; tests/deploy.rs keeps the two in step.\n"
    f"# The {label} label is what kube-prometheus-stack's Prometheus selects rules by (its Helm release\n"
    "# name, ruleSelector): change PROMETHEUS_RELEASE_LABEL in the script if your release differs.\n"
    "apiVersion: monitoring.coreos.com/v1\n"
    "kind: PrometheusRule\n"
    "metadata:\n"
    "  name: plextera-gateway\n"
    "  labels:\n"
    f"    {label}: {value}\n"
    "spec:\n"
    + indent(without_leading_comments((ROOT / "deploy/prometheus/alerts.yml").read_text()), "  ")
)

dashboard = (ROOT / "deploy/grafana/plextera-gateway.json").read_text()
assert dashboard.endswith("}\n") and not dashboard.endswith("\n\n"), "the dashboard ends in one newline"
grafana_dashboard = (
    "# GENERATED by deploy/derive-configs.py from deploy/grafana/plextera-gateway.json: edit that file\n"
    "# and run the script; tests/deploy.rs keeps the two in step.\n"
    "# Grafana's dashboard sidecar (kube-prometheus-stack: grafana.sidecar.dashboards) loads every\n"
    "# ConfigMap labelled grafana_dashboard: \"1\"; by default only in Grafana's own namespace, so deploy\n"
    "# this there or set grafana.sidecar.dashboards.searchNamespace=ALL.\n"
    "apiVersion: v1\n"
    "kind: ConfigMap\n"
    "metadata:\n"
    "  name: plextera-gateway-dashboard\n"
    "  labels:\n"
    "    grafana_dashboard: \"1\"\n"
    "data:\n"
    "  plextera-gateway.json: |\n"
    + indent(dashboard, "    ")
)

out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT
for path, text in [
    ("deploy/kubernetes/gateway.toml", container),
    ("deploy/systemd/gateway.toml", host),
    ("deploy/kubernetes/prometheusrule.yaml", prometheus_rule),
    ("deploy/kubernetes/grafana-dashboard.yaml", grafana_dashboard),
]:
    (out / path).parent.mkdir(parents=True, exist_ok=True)
    (out / path).write_text(text)
