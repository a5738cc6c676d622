"""Every fault at once, shortened (issue 24, item 2): bench/chaos.py for 4 minutes.

The same faults as the 20-minute run in docs/testing.md, at the same fractions of the run: a
worker SIGKILLed every minute (the last as the sending ends), the Sentinel master SIGKILLed, a
worker partitioned for 20 s (when a network namespace can be made: root and ``ip``), the API
down for 60 s, the history's private PostgreSQL restarted; 200 messages a second from two
partners to two registry companies, 30 % of posts answered 5xx at a 250 ms median. It runs as a
process of its own (its own Redis, sentinels, PostgreSQL and sandbox; nothing shared with the
test session) and writes its figures as JSON, which this test reads. About 15 minutes.
"""

from __future__ import annotations

import glob
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sandbox.processes import stop_processes
from tests.harness import ROOT


@pytest.mark.slow
@pytest.mark.timeout(35 * 60)
def test_every_fault_at_once_loses_nothing_and_every_double_post_is_explained(
    tmp_path: Path,
) -> None:
    if not glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"):
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) under /usr/lib/postgresql")
    figures_path = tmp_path / "chaos.json"
    run = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "chaos.py"), "--minutes", "4",
         "--settle-minutes", "10", "--json", str(figures_path)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        output, _ = run.communicate(timeout=30 * 60)
    finally:
        # SIGTERM first: the run then stops its servers, workers and namespace itself.
        stop_processes([run], grace_seconds=60)
    done = subprocess.CompletedProcess(run.args, run.returncode, output, "")
    print(done.stdout[-6000:])
    assert figures_path.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(figures_path.read_text())
    sent = figures["sent"]
    assert sent >= 0.9 * 4 * 60 * 200, figures  # the producer kept the pace, near enough
    assert figures.get("lost", 0) == 0, figures
    assert figures["unexplained"] == 0, figures
    assert not [k for k in figures if k.startswith("dead-lettered otherwise")], figures
    scripted = figures.get("dead-lettered for the scripted 4xx", 0)
    assert figures["delivered"] + scripted == sent, figures
    assert scripted == sent // 100 + (1 if sent % 100 > 7 else 0), figures
    assert figures["finished and schedule empty"], figures
    assert figures["history outcomes / finished"] == f"{sent} / {sent}", figures
    # The outage opened the breaker, so it was not spent posting into it.
    assert figures["breaker opened (notify:stats)"] >= 1, figures
    assert len(figures["kills"]) == 4, figures
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
