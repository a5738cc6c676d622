"""A worker that cannot run says why at start-up, in one line, naming the setting (and never a
secret): real ``celery worker`` processes started with a bad configuration."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.harness import ROOT


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start each worker from the defaults, not from the test suite's own settings."""
    for name in list(os.environ):
        if name.startswith("NOTIFY_"):
            monkeypatch.delenv(name)


def test_worker_with_a_bad_setting_stops_with_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker", "worker", "--loglevel", "INFO"],
        cwd=ROOT,
        env={**os.environ, "NOTIFY_MAX_ATTEMPTS": "many"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "NOTIFY_MAX_ATTEMPTS: Input should be a valid integer" in result.stderr
    assert "Traceback" not in result.stderr


def test_worker_without_a_token_refuses_to_post_to_a_real_host() -> None:
    env = dict(os.environ)
    env["NOTIFY_API_BASE_URL"] = "https://us.api.concursolutions.com/notifications/v4"
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker", "worker", "--loglevel", "INFO"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "NOTIFY_API_TOKEN: not set" in result.stderr


def test_worker_with_plain_http_to_a_real_host_stops_naming_the_setting() -> None:
    env = dict(os.environ)
    env["NOTIFY_API_BASE_URL"] = "http://us.api.concursolutions.com/notifications/v4"
    env["NOTIFY_API_TOKEN"] = "a-real-token-4f1c"
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker", "worker", "--loglevel", "INFO"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "NOTIFY_API_BASE_URL: http:// to a host other than this machine" in result.stderr
    assert "NOTIFY_ALLOW_INSECURE_HTTP" in result.stderr
    assert "a-real-token-4f1c" not in result.stderr and "Traceback" not in result.stderr


def test_worker_with_a_bad_redis_url_stops_without_printing_its_password() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker", "worker", "--loglevel", "INFO"],
        cwd=ROOT,
        env={**os.environ, "NOTIFY_REDIS_URL": "http://:s3cret-pw-4f1c@redis.internal:6379/0"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "NOTIFY_REDIS_URL: must start with redis://" in result.stderr
    assert "s3cret-pw-4f1c" not in result.stderr + result.stdout
