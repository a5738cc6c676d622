"""The allow-list's Public Suffix List is the package's own: a fresh process with no network
checks entries (a process of its own, so no import of this test run has loaded it yet)."""

from __future__ import annotations

import subprocess
import sys


def test_the_public_suffix_list_is_the_packages_own_and_needs_no_network(tmp_path):
    # No proxy, no route: an entry check must not try to download the list.
    code = (
        "import socket\n"
        "def refuse(*a, **k):\n"
        "    raise OSError('no network in this test')\n"
        "socket.socket.connect = refuse\n"
        "socket.create_connection = refuse\n"
        "from worker.rules.allowlist import AllowList\n"
        "AllowList.from_entries([], ['*.example.co.uk'])\n"
        "try:\n"
        "    AllowList.from_entries([], ['*.co.uk'])\n"
        "except ValueError as e:\n"
        "    print('refused', e)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert "refused" in done.stdout and "public suffix" in done.stdout
