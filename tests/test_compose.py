"""docker-compose.yml parses and only runs commands and options the CLI has."""

import subprocess
import sys

import yaml
from conftest import ROOT


def test_compose_services_run_real_cli_commands():
    spec = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = spec["services"]
    assert {"redis", "postgres", "proxy", "worker-small"} <= services.keys()
    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has no health check"
        command = service.get("command", [])
        if command[:1] != ["quickdraft"]:
            continue
        sub = command[1]
        help_text = subprocess.run([sys.executable, "-m", "quickdraft", sub, "--help"], capture_output=True,
                                   text=True, cwd=ROOT, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
        assert help_text.returncode == 0, help_text.stderr
        for option in (arg for arg in command[2:] if arg.startswith("--")):
            assert option in help_text.stdout, f"{name}: `quickdraft {sub}` has no option {option}"
    from quickdraft.settings import Settings

    for name, service in services.items():
        for var in service.get("environment", {}):
            if var.startswith("QUICKDRAFT_"):
                field = var.removeprefix("QUICKDRAFT_").lower()
                assert field in Settings.model_fields, f"{name}: {var} sets no setting"
    for dependency in services["proxy"]["depends_on"]:
        assert dependency in services
