"""Settings: defaults, comma lists, and one-line errors that name the variable."""

from __future__ import annotations

import os

import pytest

from worker.settings import SettingsError, load_settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start each test from the defaults, not from the test suite's own settings."""
    for name in list(os.environ):
        if name.startswith("NOTIFY_"):
            monkeypatch.delenv(name)


def test_defaults_follow_concur_advice() -> None:
    settings = load_settings(_env_file=None, redis_url="redis://localhost:6379/0")
    assert settings.max_attempts == 8
    assert settings.backoff_max_seconds == 300
    assert settings.api_base_url == "https://us.api.concursolutions.com/notifications/v4"


def test_comma_separated_lists_are_split_and_trimmed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_ALLOWED_TEMPLATES", " welcome, expense-approved ,,")
    monkeypatch.setenv("NOTIFY_ALLOWED_URL_DOMAINS", "app.example.com,*.partner.example")
    settings = load_settings(_env_file=None)
    assert settings.allowed_templates == ["welcome", "expense-approved"]
    assert settings.allowed_url_domains == ["app.example.com", "*.partner.example"]


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("NOTIFY_MAX_ATTEMPTS", "lots", "NOTIFY_MAX_ATTEMPTS: Input should be a valid integer"),
        ("NOTIFY_MAX_ATTEMPTS", "0", "NOTIFY_MAX_ATTEMPTS: Input should be greater than"),
        ("NOTIFY_REDIS_URL", "http://x", "NOTIFY_REDIS_URL: must start with redis://"),
        ("NOTIFY_BACKOFF_MAX_SECONDS", "1", "NOTIFY_BACKOFF_MAX_SECONDS (1.0) is below"),
        ("NOTIFY_VISIBILITY_TIMEOUT_SECONDS", "20", "NOTIFY_VISIBILITY_TIMEOUT_SECONDS (20)"),
        ("NOTIFY_API_BASE_URL", "ftp://x", "NOTIFY_API_BASE_URL: must be an http(s) URL"),
    ],
)
def test_bad_value_is_one_line_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as caught:
        load_settings(_env_file=None)
    assert str(caught.value).startswith(expected)
    assert "\n" not in str(caught.value)


def test_secret_values_are_not_echoed_in_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_API_TOKEN", "s3cret-token")
    monkeypatch.setenv("NOTIFY_MAX_ATTEMPTS", "x")
    with pytest.raises(SettingsError) as caught:
        load_settings(_env_file=None)
    assert "s3cret-token" not in str(caught.value)


# -- plain http only to this machine (issue 11, item 10) --------------------------------------


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"api_base_url": "http://us.api.concursolutions.com/notifications/v4"}, "API_BASE_URL"),
        ({"api_base_url": "http://10.0.0.5:8080/notifications/v4"}, "API_BASE_URL"),
        ({"api_base_url": "http://127.0.0.1@concur.example/notifications/v4"}, "API_BASE_URL"),
        (
            {"oauth_token_url": "http://us.api.concursolutions.com/oauth2/v0/token"},
            "OAUTH_TOKEN_URL",
        ),
        ({"oauth_token_url": "http://127.0.0.1.evil.example/oauth2/v0/token"}, "OAUTH_TOKEN_URL"),
    ],
)
def test_plain_http_to_another_host_is_refused_naming_the_setting(
    values: dict[str, str], named: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(_env_file=None, api_token="a-real-token", **values)
    message = str(caught.value)
    assert message.startswith(f"NOTIFY_{named}: ")
    assert "NOTIFY_ALLOW_INSECURE_HTTP=true" in message
    assert "a-real-token" not in message and "\n" not in message


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/notifications/v4",
        "http://localhost:8080/notifications/v4",
        "http://[::1]:8080/notifications/v4",
        "https://concur.example/notifications/v4",
    ],
)
def test_https_and_plain_http_to_this_machine_are_accepted(url: str) -> None:
    assert load_settings(_env_file=None, api_base_url=url, oauth_token_url=url).api_base_url == url


def test_plain_http_to_another_host_is_accepted_when_explicitly_allowed() -> None:
    url = "http://concur-proxy.internal/notifications/v4"
    settings = load_settings(_env_file=None, api_base_url=url, allow_insecure_http="true")
    assert settings.api_base_url == url


# -- URL passwords are never printed (issue 11, item 7) ----------------------------------------


def test_a_bad_redis_url_is_named_without_its_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_REDIS_URL", "http://admin:s3cret-pw@redis.internal:6379/0")
    with pytest.raises(SettingsError) as caught:
        load_settings(_env_file=None)
    message = str(caught.value)
    assert message.startswith("NOTIFY_REDIS_URL: must start with redis://")
    assert "s3cret-pw" not in message and "http://admin:***@redis.internal:6379/0" in message


def test_plain_http_error_does_not_print_a_url_password() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(_env_file=None, oauth_token_url="http://u:tok-pw-123@concur.example/t")
    assert "tok-pw-123" not in str(caught.value)
