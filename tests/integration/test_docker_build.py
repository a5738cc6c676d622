"""docker/Dockerfile's pip steps, replayed as written in clean virtualenvs (no Docker engine here).

The test reads the Dockerfile itself: each stage gets a directory standing for its filesystem,
``WORKDIR`` and ``COPY`` (from the build context) are carried out, and every ``pip`` command of
every ``RUN`` runs with that stage's own clean virtualenv's pip, its paths mapped into the stage's
directory (``--mount=type=bind,from=...`` too). The one change: ``--no-cache-dir`` becomes a
shared pip cache, so a second run downloads nothing; what gets installed is the same. pip reads
no configuration of this machine (no local indexes or find-links, no constraints), as in an
image.

Then the image's site-packages must hold exactly the pins plus the project, and the pins must
be what ``make pins`` resolves from pyproject.toml now (drift fails here, not at docker build).
"""

from __future__ import annotations

import glob
import json
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

from tests.harness import ROOT, docker_pins

pytestmark = pytest.mark.slow

DOCKERFILE = ROOT / "docker" / "Dockerfile"
PINS = ROOT / "docker" / "requirements.txt"
PIP_CACHE = Path.home() / ".cache" / "pip"
# What uvicorn[standard] and the posts to Concur need in the image (issue 12: these were missing).
MUST_BE_PINNED = {"httptools", "uvloop", "websockets", "watchfiles", "pyyaml", "pycurl"}
# Kept for TLS and proxies only; every other PIP_* variable of this machine is dropped.
PASSED_THROUGH = ("PATH", "HOME", "LANG", "SSL_CERT_FILE", "PIP_CERT", "PIP_DEFAULT_TIMEOUT")


@dataclass
class Stage:
    name: str
    root: Path  # stands for the stage's "/"
    venv: Path
    workdir: str = "/"
    env: dict[str, str] = field(default_factory=dict)

    def path(self, container_path: str) -> Path:
        """Where a path of the stage's filesystem lies on this machine."""
        absolute = posixpath.normpath(posixpath.join(self.workdir, container_path))
        return self.root / absolute.lstrip("/")


def _instructions() -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def _clean_env() -> dict[str, str]:
    env = {name: os.environ[name] for name in PASSED_THROUGH if name in os.environ}
    env["PIP_CONFIG_FILE"] = os.devnull  # no pip.conf of this machine
    return env


def _map_arg(arg: str, stage: Stage, mounts: dict[str, Path]) -> list[str]:
    """A pip argument with container paths made host paths (globs expanded, as sh would)."""
    option, equals, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
    if not value or (not equals and option):
        return [arg]
    host: str | None = None
    for target, source in mounts.items():
        if value == target or value.startswith(target + "/"):
            host = str(source) + value[len(target) :]
    if host is None and (value.startswith("/") or stage.path(value).exists()):
        host = str(stage.path(value))
    if host is None:
        return [arg]  # a name, such as a package
    if any(ch in host for ch in "*?["):
        matches = sorted(glob.glob(host))
        assert matches, f"{value} matches nothing"
        return [f"{option}={m}" if equals else m for m in matches]
    return [f"{option}={host}" if equals else host]


def _run_pip(command: list[str], stage: Stage, mounts: dict[str, Path]) -> None:
    argv = [str(stage.venv / "bin" / "pip")]
    for arg in command[1:]:
        if arg == "--no-cache-dir":
            argv.append(f"--cache-dir={PIP_CACHE}")
        else:
            argv.extend(_map_arg(arg, stage, mounts))
    cwd = stage.path(stage.workdir)
    cwd.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        argv,
        cwd=cwd,
        env={**_clean_env(), **stage.env},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    shown = " ".join(command)
    assert done.returncode == 0, f"[{stage.name}] {shown}\n{done.stdout[-3000:]}{done.stderr}"


def _run(instruction: str, stage: Stage, stages: dict[str, Stage]) -> list[str]:
    """One RUN: its pip commands are carried out; returns the commands it skipped."""
    words = shlex.split(instruction)
    mounts: dict[str, Path] = {}
    while words and words[0].startswith("--mount="):
        spec = dict(part.split("=", 1) for part in words.pop(0).removeprefix("--mount=").split(","))
        assert spec.get("type") == "bind", spec
        mounts[spec["target"]] = stages[spec["from"]].path(spec["source"])
    skipped = []
    command: list[str] = []
    for word in [*words, "&&"]:
        if word != "&&":
            command.append(word)
            continue
        if command and command[0] == "pip":
            _run_pip(command, stage, mounts)
        elif command:
            skipped.append(command[0])
        command = []
    return skipped


def _replay(tmp: Path) -> tuple[Stage, list[str]]:
    """Carry out the Dockerfile; returns the last stage and the pip commands that ran."""
    stages: dict[str, Stage] = {}
    stage: Stage | None = None
    pip_commands: list[str] = []
    for keyword, rest in _instructions():
        if keyword == "FROM":
            name = rest.split(" AS ")[-1].strip() if " AS " in rest else f"stage{len(stages)}"
            root = tmp / name
            venv = tmp / f"{name}-venv"
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
            stage = stages[name] = Stage(name, root, venv)
        elif stage is None:
            continue  # ARG before the first FROM
        elif keyword == "WORKDIR":
            stage.workdir = rest
        elif keyword == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                stage.env[key] = value
        elif keyword == "COPY":
            words = [w for w in shlex.split(rest) if not w.startswith("--")]
            *sources, target = words
            for source in sources:
                into = stage.path(target)
                if target.endswith("/") or len(sources) > 1:
                    into = into / Path(source).name
                into.parent.mkdir(parents=True, exist_ok=True)
                origin = ROOT / source
                if origin.is_dir():
                    shutil.copytree(origin, into, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy2(origin, into)
        elif keyword == "RUN":
            if re.search(r"\bpip\b", rest):
                pip_commands.append(rest)
            _run(rest, stage, stages)
    assert stage is not None
    return stage, pip_commands


def test_pins_are_complete_hashed_and_satisfy_pyproject() -> None:
    pins = docker_pins()
    assert pins.keys() >= MUST_BE_PINNED, MUST_BE_PINNED - pins.keys()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for raw in project["dependencies"]:
        requirement = Requirement(raw)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not pinned: run `make pins`"
        assert requirement.specifier.contains(pins[name], prereleases=True), raw


def test_pins_are_what_make_pins_resolves_from_pyproject_now(tmp_path: Path) -> None:
    # `make pins` keeps the versions already pinned: a second run changes nothing unless
    # pyproject.toml's dependencies (or the Dockerfile's Python) changed since the last one.
    uv = Path(sys.executable).parent / "uv"
    assert uv.exists(), "uv is a dev dependency: make install"
    again = tmp_path / "requirements.txt"
    shutil.copy2(PINS, again)
    done = subprocess.run(
        ["make", "--no-print-directory", "-s", "-o", "install", "pins", f"PINS={again}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert again.read_text() == PINS.read_text(), "docker/requirements.txt drifted: run `make pins`"


def test_dockerfile_pip_steps_build_and_install_exactly_the_pins_and_the_project(
    tmp_path: Path,
) -> None:
    base = re.search(r"^ARG PYTHON_IMAGE=python:(\d+\.\d+)", DOCKERFILE.read_text(), re.M)
    assert base is not None
    if f"{sys.version_info.major}.{sys.version_info.minor}" != base.group(1):
        pytest.skip(f"the image runs Python {base.group(1)}; this is {sys.version.split()[0]}")
    PIP_CACHE.mkdir(parents=True, exist_ok=True)
    runtime, pip_commands = _replay(tmp_path)
    assert len(pip_commands) >= 3, pip_commands  # two wheel steps, the runtime install

    pins = docker_pins()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    expected = {**pins, canonicalize_name(project["name"]): project["version"]}

    # The build stage's wheel directory: the pins and the project, nothing unpinned beside them.
    wheel_dirs = {p for p in tmp_path.glob("*/wheels") if p.is_dir()}
    assert len(wheel_dirs) == 1, wheel_dirs
    built = {}
    for wheel in next(iter(wheel_dirs)).glob("*.whl"):
        name, version, _, _ = parse_wheel_filename(wheel.name)
        built[str(name)] = str(version)
    assert built == expected

    # The image's environment: exactly those, at those versions (pip and setuptools come with
    # the base image's Python), and pip check finds every declared requirement met.
    python = str(runtime.venv / "bin" / "python")
    listed = subprocess.run(
        [python, "-m", "pip", "list", "--format=json"],
        env=_clean_env(),
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    installed = {
        canonicalize_name(item["name"]): item["version"] for item in json.loads(listed.stdout)
    }
    for tool in ("pip", "setuptools", "wheel"):
        if tool not in expected:
            installed.pop(tool, None)
    assert installed == expected

    # And what the image runs starts: the worker app, the HTTP service's server, libcurl.
    smoke = subprocess.run(
        [
            python,
            "-c",
            "import pycurl, httptools, uvloop, websockets, watchfiles, yaml, uvicorn, flower; "
            "import worker.celery_app, worker.front.api, worker.front.cli; print(pycurl.version)",
        ],
        cwd=tmp_path,
        env={**_clean_env(), "NOTIFY_REDIS_URL": "redis://127.0.0.1:1/0"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert smoke.returncode == 0, smoke.stderr
    assert "libcurl" in smoke.stdout
    notify = subprocess.run(
        [str(runtime.venv / "bin" / "notify"), "--help"],
        cwd=tmp_path,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert notify.returncode == 0 and "send" in notify.stdout, notify.stderr
