"""The README's first example, verbatim, in a second shell, against `make run`'s stack.

`make run` is `notify dev` in the repository root. Here a fresh directory stands for a fresh
clone (``.env.example`` copied in, no ``.env``, ``.venv`` linked to this one) and ``notify dev``
runs there as `make run` runs it, with free ports for its sandbox, HTTP service and Flower. Its
first shell differs from a newcomer's in one variable only: ``NOTIFY_REDIS_URL`` names a free
port where nothing answers, so the stack starts a Redis of its own there (as on a machine
without Redis) instead of using database 0 of a Redis another test run may share.

The second shell has no ``NOTIFY_*`` variable at all: the README's lines run as written
(``<id>`` replaced by the id ``send`` printed), with ``bash``, in that directory.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from dotenv import dotenv_values

from sandbox.processes import stop_processes
from tests.harness import ROOT, free_port, wait_for
from worker.shapes.models import is_message_id

VENV = Path(sys.executable).parent.parent


def readme_first_steps() -> list[str]:
    """The command block right after "It prints the commands to try in another shell"."""
    text = (ROOT / "README.md").read_text()
    intro = re.search(r"It prints the\s+commands to try in another shell", text)
    assert intro is not None
    block = re.search(r"```sh\n(.*?)```", text[intro.end() :], re.S)
    assert block is not None
    lines = [line.strip() for line in block.group(1).splitlines() if line.strip()]
    assert lines and all(line.startswith(".venv/bin/notify ") for line in lines), lines
    return lines


def _second_shell_env() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if not name.startswith("NOTIFY_")}


def _shell(line: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", line],
        cwd=cwd,
        env=_second_shell_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.slow
def test_readme_first_example_works_verbatim_in_a_second_shell_after_make_run(
    tmp_path: Path,
) -> None:
    clone = tmp_path / "clone"
    clone.mkdir()
    shutil.copy2(ROOT / ".env.example", clone / ".env.example")
    (clone / ".venv").symlink_to(VENV, target_is_directory=True)
    lines = readme_first_steps()
    send, status, failed = lines  # the README shows these three

    first_shell = _second_shell_env()
    first_shell["NOTIFY_REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"
    log_path = tmp_path / "make-run.log"
    with open(log_path, "wb") as log:
        dev = subprocess.Popen(
            [
                ".venv/bin/notify",
                "dev",
                "--sandbox-port",
                str(free_port()),
                "--api-port",
                str(free_port()),
                "--flower-port",
                str(free_port()),
            ],
            cwd=clone,
            env=first_shell,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        # Up to the Flower line, printed after the commands to try: "ready." comes first, each
        # line printed on its own, and the commands may not be there yet when it is.
        wait_for(
            lambda: dev.poll() is not None or b"[notify dev] Flower:" in log_path.read_bytes(),
            timeout=60,
            what="notify dev to be ready",
        )
        printed = log_path.read_text(errors="replace")
        assert dev.poll() is None, printed
        assert "[notify dev] ready. In another shell" in printed, printed
        # It printed the README's lines, as they are written there.
        for line in lines:
            assert f"[notify dev]   {line}\n" in printed, (line, printed)
        written = dotenv_values(clone / ".env")
        assert written["NOTIFY_REDIS_URL"] == first_shell["NOTIFY_REDIS_URL"]
        assert written["NOTIFY_ALLOWED_TEMPLATES"] == "demo-template"

        sent = _shell(send, clone)
        assert sent.returncode == 0, sent.stderr
        message_id = sent.stdout.strip()
        assert is_message_id(message_id), sent.stdout

        def delivered() -> str | None:
            shown = _shell(status.replace("<id>", message_id), clone)
            assert shown.returncode == 0, shown.stderr
            return shown.stdout if re.search(r"\bdelivered\b", shown.stdout) else None

        wait_for(delivered, timeout=60, interval=0.5, what="the message to be delivered")

        listed = _shell(failed, clone)
        assert listed.returncode == 0, listed.stderr
        assert "no failed notifications" in listed.stdout
    finally:
        # Ctrl-C's SIGTERM twin: notify dev stops its workers, services and Redis itself.
        stop_processes([dev], grace_seconds=90)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(dev.pid, signal.SIGKILL)  # anything of its session left behind
    assert dev.returncode == 0, log_path.read_text(errors="replace")
    # The stack's own Redis went with it.
    after = _shell(failed, clone)
    assert after.returncode == 3 and "cannot reach Redis" in after.stderr
