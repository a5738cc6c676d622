"""Flower starts after the first worker answers ``inspect ping``.

Flower inspects the workers once when it starts. Started before any worker is up (``make run``
starts everything at once; compose starts the containers together), that inspection finds nobody:
it logs "Inspect method ... failed" for each method and its Workers page stays empty until
someone refreshes it. cookiecutter-django's start script waits for ``celery inspect ping`` first;
``notify flower`` does the same in-process before it hands over to Flower.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

# Between pings; each ping itself waits up to PING_TIMEOUT_SECONDS for replies.
PING_INTERVAL_SECONDS = 0.5
PING_TIMEOUT_SECONDS = 1.0
# How often the wait says it is still waiting (one line each, so the log stays short).
WAITING_NOTE_SECONDS = 30.0


def ping_workers(app: Any, timeout_s: float = PING_TIMEOUT_SECONDS) -> list[str]:
    """The names of the workers that answer ``inspect ping`` within ``timeout_s``; empty when
    none does or the broker cannot be reached (yet)."""
    from kombu.exceptions import OperationalError

    try:
        replies = app.control.ping(timeout=timeout_s) or []
    except (OperationalError, OSError, ConnectionError):
        return []
    names: list[str] = []
    for reply in replies:
        if isinstance(reply, dict):
            names += [name for name, answer in reply.items() if isinstance(answer, dict)]
    return sorted(names)


def wait_for_worker(
    app: Any,
    timeout_s: float,
    say: Callable[[str], None],
    *,
    ping: Callable[[Any], list[str]] = ping_workers,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[str]:
    """Ping until a worker answers or ``timeout_s`` passes; returns the names
    that answered, empty on timeout. Says one line when it starts waiting, one every
    ``WAITING_NOTE_SECONDS``, and one at the end."""
    started = clock()
    noted = None
    while True:
        names = ping(app)
        if names:
            if noted is not None:
                say(f"a worker answered inspect ping ({', '.join(names)}); starting Flower")
            return names
        now = clock()
        if now - started >= timeout_s:
            say(f"no worker answered inspect ping in {timeout_s:g} s; starting Flower anyway")
            return []
        if noted is None or now - noted >= WAITING_NOTE_SECONDS:
            say("waiting for a worker to answer inspect ping before starting Flower")
            noted = now
        sleep(PING_INTERVAL_SECONDS)
