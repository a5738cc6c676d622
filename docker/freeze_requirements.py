"""Print pinned runtime requirements (the project's dependencies, resolved in this environment).

Run from the repository root after changing ``pyproject.toml`` dependencies:

    .venv/bin/python docker/freeze_requirements.py > docker/requirements.txt

Like ``pip freeze``, but only what the project needs at run time: no dev tools, not the project.
"""

from __future__ import annotations

import sys
import tomllib
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
# The image runs CPython 3.11 on Linux: evaluate markers for that, not for this machine.
TARGET = {
    "python_version": "3.11",
    "python_full_version": "3.11.11",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}


def _wanted(requirement: Requirement, extras: set[str]) -> bool:
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({**TARGET, "extra": e}) for e in {"", *extras})


def pins() -> dict[str, str]:
    """Every distribution the project needs at run time, with the installed version."""
    found: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    # pyproject.toml, not the installed project's metadata, which is stale until reinstalled.
    declared = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    pending = [r for r in map(Requirement, declared) if _wanted(r, set())]
    top = {canonicalize_name(r.name) for r in pending}
    while pending:
        requirement = pending.pop()
        key = (canonicalize_name(requirement.name), frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = distribution(requirement.name)
        except PackageNotFoundError:
            if key[0] in top:
                sys.exit(f"{requirement.name} is not installed: pip install -e '.[dev]' first")
            continue
        found[key[0]] = dist.version
        for raw in dist.requires or []:
            sub = Requirement(raw)
            if _wanted(sub, set(requirement.extras)):
                pending.append(sub)
    return found


if __name__ == "__main__":
    print("# Pinned runtime dependencies of partner-notify, for docker/Dockerfile.")
    print("# Regenerate: .venv/bin/python docker/freeze_requirements.py > docker/requirements.txt")
    for name, version in sorted(pins().items()):
        print(f"{name}=={version}")
