"""``notify api --workers N``: uvicorn's supervisor keeps a child that is slow to answer its
ping for less than ``NOTIFY_SERVICE_WORKER_HEALTHCHECK_SECONDS`` (uvicorn's own 5 s killed every
child of a loaded machine: their pong thread waited for the GIL behind the event loop)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx

from tests.harness import NotifyApi, wait_for

SILENT_SECONDS = 8.0  # past uvicorn's 5 s, well within the 30 s default


def _children(pid: int) -> set[int]:
    """The supervisor's uvicorn children (multiprocessing's spawned processes; not its
    resource tracker)."""
    found: set[int] = set()
    listed = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for child in map(int, listed):
        try:
            command = Path(f"/proc/{child}/cmdline").read_bytes()
        except FileNotFoundError:
            continue  # gone meanwhile
        if b"spawn_main" in command:
            found.add(child)
    return found


def test_a_child_silent_for_longer_than_uvicorns_5_s_is_kept_and_serves_again(
    tmp_path: Path,
) -> None:
    api = NotifyApi(tmp_path / "api.log", workers=2)
    try:

        def both() -> set[int] | None:
            found = _children(api.process.pid)
            return found if len(found) == 2 else None

        children = wait_for(both, timeout=60, what="two uvicorn children")
        silent = min(children)
        os.kill(silent, signal.SIGSTOP)  # as a child starved of CPU: no pong, no requests
        try:
            time.sleep(SILENT_SECONDS)
        finally:
            os.kill(silent, signal.SIGCONT)
        # Past uvicorn's 5 s the supervisor would have killed and replaced it by now; within the
        # healthcheck its ping is still waiting, and the child answers it once resumed.
        assert api.process.poll() is None, api.log()
        assert _children(api.process.pid) == children, api.log()
        assert "died" not in api.log()
        assert httpx.get(f"{api.url}/readyz", timeout=10).status_code == 200
    finally:
        api.stop()
