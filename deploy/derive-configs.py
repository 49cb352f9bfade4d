#!/usr/bin/env python3
"""Writes deploy/kubernetes/gateway.toml and deploy/systemd/gateway.toml from config/gateway.toml.

Run after changing config/gateway.toml; tests/deploy.rs checks the results differ from it only in
the values changed here."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE = (ROOT / "config/gateway.toml").read_text()
FIRST_LINE = "# plextera-gateway configuration. Every value shown is the default; delete what you do not change."


def derive(header, replacements):
    text = BASE.replace(FIRST_LINE, header)
    for old, new in replacements:
        assert old in text, f"config/gateway.toml no longer contains {old!r}"
        text = text.replace(old, new)
    return text


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
    ],
)
host = derive(
    "# plextera-gateway configuration for the systemd unit (install as /etc/plextera-gateway/gateway.toml).\n"
    "# It is config/gateway.toml with the changes marked \"systemd:\"; a test keeps the rest identical.\n"
    "# Regenerate with deploy/derive-configs.py.",
    [
        ('api_key_env = "PLEXTERA_API_KEY"', '# api_key_env = "PLEXTERA_API_KEY"'),
        ('# api_key_file = "/run/secrets/plextera-api-key"',
         '# systemd: the unit\'s LoadCredential= puts the key here, readable only by the service.\n'
         'api_key_file = "/run/credentials/plextera-gateway.service/api-key"'),
    ],
)
(ROOT / "deploy/kubernetes/gateway.toml").write_text(container)
(ROOT / "deploy/systemd/gateway.toml").write_text(host)
