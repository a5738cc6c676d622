"""Concur OAuth company tokens: the provider, the sandbox's token endpoint and real workers.

These tests run in a Redis database of their own (not the session's), so the session worker's
mover never republishes their messages to the static-token queue, and their workers post to a
sandbox of their own that accepts only the access tokens it issued.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet, InvalidToken
from dotenv import dotenv_values
from redis import Redis

from sandbox.concur import Sandbox
from sandbox.devstack import TOKEN_KEY, ensure_token_key
from tests.harness import LOCAL_REDIS, WorkerProcess, claim_database, release_database, wait_for
from worker.concur.oauth import Cipher, OAuthConfig, OAuthTokens, fingerprint, trusted_geolocation
from worker.concur.tokens import TokenUnavailable
from worker.front.stats import collect, render_prometheus
from worker.queue.envelopes import Envelope
from worker.rules.validation import validate
from worker.runtime import Runtime
from worker.settings import GEOLOCATIONS, Settings, SettingsError, load_settings
from worker.store import keys

CLIENT_SECRET = "sandbox-client-secret"
COMPANY_ID = "sandbox-company"
AUTH_TOKEN = "sandbox-auth-token"
FERNET_KEY = "k2y0Ue3MSn3kQ1Yv2c0Jv8wH8d7c3mB0s9J0b1zR6dE="


@pytest.fixture(scope="module")
def oauth_redis_url() -> Iterator[str]:
    """A Redis database for this module alone (see the module docstring)."""
    base = os.environ["NOTIFY_REDIS_URL"]
    claimed: str | None = None
    if base.startswith(LOCAL_REDIS + "/") and not os.environ.get("NOTIFY_TEST_REDIS_URL"):
        claimed = claim_database()
    if claimed is None:
        # An embedded server is this run's alone: any other database number is free.
        root, _, number = base.rpartition("/")
        claimed = f"{root}/{(int(number or 0) + 1) % 16}"
    Redis.from_url(claimed).flushdb()
    yield claimed
    Redis.from_url(claimed).flushdb()
    if claimed.startswith(LOCAL_REDIS + "/") and claimed != base:
        release_database(claimed)


@pytest.fixture(scope="module")
def token_sandbox() -> Iterator[Sandbox]:
    """A sandbox accepting no static token: only access tokens from its token endpoint."""
    sandbox = Sandbox(tokens=[f"static-{uuid.uuid4().hex}"])
    sandbox.start()
    yield sandbox
    sandbox.stop()


@pytest.fixture
def oauth(token_sandbox: Sandbox, oauth_redis_url: str) -> OAuthCase:
    """A fresh token endpoint, a client id and a queue of this test's own."""
    token_sandbox.reset()
    token_sandbox.configure_oauth(reset=True)
    return OAuthCase(token_sandbox, oauth_redis_url)


class OAuthCase:
    """Settings, env and helpers for one test."""

    def __init__(self, sandbox: Sandbox, redis_url: str) -> None:
        self.sandbox = sandbox
        self.redis_url = redis_url
        self.client_id = f"client-{uuid.uuid4().hex[:10]}"
        self.queue = f"notify-oauth-{uuid.uuid4().hex[:8]}"
        self.redis = Redis.from_url(redis_url, decode_responses=True)

    def values(self, **overrides: str) -> dict[str, str]:
        """The settings as environment variables (without the prefix, lower case)."""
        values = {
            "redis_url": self.redis_url,
            "queue_name": self.queue,
            "api_base_url": self.sandbox.url,
            "oauth_client_id": self.client_id,
            "oauth_client_secret": CLIENT_SECRET,
            "oauth_company_id": COMPANY_ID,
            "oauth_company_auth_token": AUTH_TOKEN,
            # Required with OAuth (issue 11, item 6): the refresh token is never stored plainly.
            "token_encryption_key": FERNET_KEY,
        }
        values.update(overrides)
        return {k: v for k, v in values.items() if v != ""}

    def settings(self, **overrides: str) -> Settings:
        values = self.values(**overrides)
        # Unset company credentials must not come back from the session's environment.
        return load_settings(
            **{
                "oauth_company_id": None,
                "oauth_company_auth_token": None,
                "oauth_refresh_token": None,
                **values,
            }
        )

    def provider(self, **overrides: str) -> OAuthTokens:
        return OAuthTokens.from_settings(self.settings(**overrides), self.redis)

    def env(self, **overrides: str) -> dict[str, str]:
        return {f"NOTIFY_{k.upper()}": v for k, v in self.values(**overrides).items()}

    def stored(self) -> dict[str, str]:
        return self.redis.hgetall(keys.oauth_state(self.client_id))

    def grants(self) -> dict[str, int]:
        return dict(self.sandbox.oauth_stats()["grants"])

    def runtime(self) -> Runtime:
        return Runtime.from_settings(self.settings())

    def send(self, rt: Runtime, user_id: str, count: int = 1) -> list[str]:
        """Queue ``count`` messages on this test's queue and broker."""
        ids = []
        for _ in range(count):
            body = {
                "sessionId": f"s-{uuid.uuid4().hex[:8]}",
                "templateId": "welcome",
                "context": {"url": "https://app.example.com/r/1"},
            }
            message = validate(user_id, body, rt.allowlist)
            created, _ = rt.store.create(message.id, message.to_wire())
            assert created
            # The runtime publishes through a Celery app on its own settings' broker.
            rt.publish([Envelope(message.id, 1, message.to_wire())])
            ids.append(message.id)
        return ids


def _state(rt: Runtime, message_id: str) -> str | None:
    record = rt.store.status(message_id)
    return record["state"] if record else None


def _all_finished(rt: Runtime, ids: list[str], timeout: float = 40.0) -> list[dict[str, Any]]:
    wait_for(
        lambda: all(_state(rt, i) in ("delivered", "failed") for i in ids),
        timeout=timeout,
        what=f"{len(ids)} messages to finish",
    )
    return [rt.store.status(i) or {} for i in ids]


def _send_until_refreshed(
    oauth: OAuthCase, rt: Runtime, user_id: str, count: int, refreshes: int = 1
) -> list[str]:
    """Send ``count`` messages a round, each round finished before the next, until the workers
    have replaced their access token ``refreshes`` times; the ids sent.

    A worker replaces its token on first use after half its lifetime, so the rounds go on until
    the sandbox has granted the refreshes: no fixed sleep guessed against the lifetime.
    """
    ids: list[str] = []
    deadline = time.monotonic() + 60
    while oauth.grants().get("refresh_token", 0) < refreshes:
        assert time.monotonic() < deadline, f"fewer than {refreshes} refreshes: {oauth.grants()}"
        sent = oauth.send(rt, user_id, count)
        _all_finished(rt, sent)
        ids += sent
        time.sleep(0.2)  # a round's pace, not a wait for the lifetime
    return ids


def _secrets_absent(text: str, sandbox: Sandbox) -> None:
    for secret in [CLIENT_SECRET, AUTH_TOKEN, *sandbox.issued_tokens()]:
        assert secret not in text


# -- settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "url"),
    [
        ("us", "https://us.api.concursolutions.com/notifications/v4"),
        ("us2", "https://us2.api.concursolutions.com/notifications/v4"),
        ("EMEA", "https://emea.api.concursolutions.com/notifications/v4"),
        ("eu", "https://emea.api.concursolutions.com/notifications/v4"),
        ("eu2", "https://eu2.api.concursolutions.com/notifications/v4"),
        ("cn", "https://cn.api.concurcdc.cn/notifications/v4"),
        ("usg", "https://usg.api.concursolutions.com/notifications/v4"),
        ("us-impl", "https://us-impl.api.concursolutions.com/notifications/v4"),
        ("emea-impl", "https://emea-impl.api.concursolutions.com/notifications/v4"),
    ],
)
def test_api_base_url_accepts_a_geolocation_name(name, url):
    assert load_settings(api_base_url=name).api_base_url == url
    assert len(GEOLOCATIONS) == 9


def test_api_base_url_that_is_neither_url_nor_geolocation_names_the_variable():
    with pytest.raises(SettingsError, match=r"^NOTIFY_API_BASE_URL: .*geolocation name"):
        load_settings(api_base_url="mars")


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"oauth_client_id": "c"}, "NOTIFY_OAUTH_CLIENT_SECRET"),
        (
            {"oauth_client_id": "c", "oauth_client_secret": "s", "oauth_company_id": "x"},
            "NOTIFY_OAUTH_COMPANY_AUTH_TOKEN",
        ),
        # Client credentials alone are valid (the company registry's), but never without a key.
        ({"oauth_client_id": "c", "oauth_client_secret": "s"}, "NOTIFY_TOKEN_ENCRYPTION_KEY"),
        ({"oauth_client_secret": "s"}, "NOTIFY_OAUTH_CLIENT_ID"),
        ({"token_encryption_key": "not-a-key"}, "NOTIFY_TOKEN_ENCRYPTION_KEY"),
    ],
)
def test_incomplete_oauth_settings_name_the_variable_and_never_the_secret(values, named):
    base = {"oauth_company_id": None, "oauth_company_auth_token": None}
    with pytest.raises(SettingsError) as error:
        load_settings(**{**base, **values})
    message = str(error.value)
    assert message.startswith(named)
    assert "not-a-key" not in message and "'s'" not in message


def test_oauth_credentials_mean_no_sandbox_and_a_longer_lease(oauth):
    plain = load_settings(api_token=None)
    with_oauth = oauth.settings()
    assert plain.uses_sandbox and not with_oauth.uses_sandbox
    assert with_oauth.inflight_lease_seconds > plain.inflight_lease_seconds


# -- the provider, in this process ----------------------------------------------------------


def test_password_grant_first_then_refresh_grant_with_the_rotated_token(oauth):
    # Replaced after half its lifetime: the checks before that must fit in 2 s, even when busy.
    oauth.sandbox.configure_oauth(access_ttl_seconds=4)
    tokens = oauth.provider()
    first = tokens.token()
    assert oauth.grants() == {"password": 1}
    assert tokens.token() == first  # kept in memory, not fetched per call
    stored_first = oauth.stored()
    assert stored_first["geolocation"] == oauth.sandbox.root_url
    assert int(stored_first["refresh_expires"]) > time.time() * 1000 + 100 * 86400 * 1000

    second = wait_for(lambda: (t := tokens.token()) != first and t, timeout=10)
    assert oauth.grants() == {"password": 1, "refresh_token": 1}
    stats = oauth.sandbox.oauth_stats()
    assert stats["reusedRefreshTokens"] == 0 and stats["codes"] == {}
    # The rotated refresh token is what is stored now (the old one is retired by the sandbox).
    assert oauth.stored()["refresh"] != stored_first["refresh"]
    assert second in oauth.sandbox.issued_tokens()


def test_access_token_is_never_written_to_redis(oauth):
    access = oauth.provider().token()
    for key in oauth.redis.scan_iter(f"notify:oauth:{oauth.client_id}*"):
        kind = oauth.redis.type(key)
        values = oauth.redis.hvals(key) if kind == "hash" else [oauth.redis.get(key) or ""]
        assert all(access not in value for value in values)


def test_refresh_token_is_encrypted_at_rest_when_a_key_is_set(oauth):
    oauth.provider(token_encryption_key=FERNET_KEY).token()
    raw = oauth.stored()
    issued_refresh = [t for t in oauth.sandbox.issued_tokens() if t.startswith("sbx-rt-")]
    assert raw["refresh"].startswith("f1:")
    assert all(token not in value for token in issued_refresh for value in raw.values())
    # Another process with the same key reads it back and uses it: a refresh, not a password.
    oauth.provider(token_encryption_key=FERNET_KEY).token()
    assert oauth.grants() == {"password": 1, "refresh_token": 1}


def test_oauth_without_an_encryption_key_refuses_to_start_naming_the_setting(oauth, tmp_path):
    with pytest.raises(SettingsError) as error:
        oauth.settings(token_encryption_key="")
    assert str(error.value).startswith("NOTIFY_TOKEN_ENCRYPTION_KEY: required with")
    # A real command stops at once with that one line (nothing stored, nothing listened on).
    env = {key: value for key, value in os.environ.items() if not key.startswith("NOTIFY_")}
    env.update({f"NOTIFY_{k.upper()}": v for k, v in oauth.values(token_encryption_key="").items()})
    done = subprocess.run(
        [str(Path(sys.executable).parent / "notify"), "api", "--port", "1"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "NOTIFY_TOKEN_ENCRYPTION_KEY: required with NOTIFY_OAUTH_CLIENT_ID" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert oauth.stored() == {}


def test_only_notify_dev_makes_a_key_and_keeps_it_in_dotenv(tmp_path, monkeypatch):
    for name in ("NOTIFY_OAUTH_CLIENT_ID", TOKEN_KEY):
        monkeypatch.delenv(name, raising=False)
    dotenv = tmp_path / ".env"
    dotenv.write_text("NOTIFY_OAUTH_CLIENT_ID=client-1\n")
    assert ensure_token_key(tmp_path) is True
    key = dotenv_values(dotenv)[TOKEN_KEY]
    assert key and Fernet(key.encode())  # a real key, kept for the next run
    assert ensure_token_key(tmp_path) is False  # kept, not replaced
    assert dotenv_values(dotenv)[TOKEN_KEY] == key
    without_oauth = tmp_path / "plain"
    without_oauth.mkdir()
    monkeypatch.delenv(TOKEN_KEY)
    (without_oauth / ".env").write_text("NOTIFY_QUEUE_NAME=q\n")
    assert ensure_token_key(without_oauth) is False
    assert TOKEN_KEY not in dotenv_values(without_oauth / ".env")


def test_plain_refresh_token_of_before_is_read_and_sealed_with_the_key(oauth):
    oauth.provider().token()
    sealed = oauth.stored()["refresh"]
    token = Fernet(FERNET_KEY.encode()).decrypt(sealed[3:].encode()).decode()
    # As a version without a key left it in Redis:
    oauth.redis.hset(keys.oauth_state(oauth.client_id), "refresh", "p:" + token)
    oauth.provider().token()
    assert oauth.grants() == {"password": 1, "refresh_token": 1}  # it was read and used
    stored = oauth.stored()["refresh"]
    assert stored.startswith("f1:") and "sbx-rt-" not in stored
    Fernet(FERNET_KEY.encode()).decrypt(stored[3:].encode())


def test_encryption_keys_rotate_the_first_encrypts_every_one_decrypts(oauth):
    new_key = Fernet.generate_key().decode()
    oauth.provider().token()  # sealed with FERNET_KEY
    # Rotation: the new key first, the old one still listed; the stored token is still read.
    oauth.provider(token_encryption_key=f"{new_key}, {FERNET_KEY}").token()
    assert oauth.grants() == {"password": 1, "refresh_token": 1}
    stored = oauth.stored()["refresh"]
    Fernet(new_key.encode()).decrypt(stored[3:].encode())  # now under the new key
    with pytest.raises(InvalidToken):
        Fernet(FERNET_KEY.encode()).decrypt(stored[3:].encode())
    # The old key can go: the new one alone reads it.
    oauth.provider(token_encryption_key=new_key).token()
    assert oauth.grants() == {"password": 1, "refresh_token": 2}
    # A stored form under retired keys only is refused (logged, treated as absent), not misread.
    cipher = Cipher(Fernet.generate_key().decode())
    with pytest.raises(ValueError, match="does not decrypt with any configured key"):
        cipher.open(stored)
    with pytest.raises(SettingsError, match="NOTIFY_TOKEN_ENCRYPTION_KEY: key 2 of 2"):
        load_settings(token_encryption_key=f"{new_key},not-a-key")


def test_configured_refresh_token_is_used_once_then_the_rotated_one(oauth):
    seed = oauth.sandbox.issue_refresh_token(oauth.client_id)
    values = {"oauth_company_id": "", "oauth_company_auth_token": "", "oauth_refresh_token": seed}
    oauth.provider(**values).token()
    oauth.provider(**values).token()  # a restart with the same settings
    assert oauth.grants() == {"refresh_token": 2}
    assert oauth.sandbox.oauth_stats()["codes"] == {}  # the spent seed was not presented again
    assert oauth.stored()["seed"] == fingerprint(seed)


def test_code_108_falls_back_to_the_password_grant(oauth):
    tokens = oauth.provider()
    old = tokens.token()
    oauth.sandbox.configure_oauth(revoke_refresh_tokens=True)
    new = tokens.refresh(old)
    assert new != old
    assert oauth.grants() == {"password": 2}
    assert oauth.sandbox.oauth_stats()["codes"] == {"108": 1}


def test_code_108_without_company_credentials_is_a_clear_error_and_no_secret(oauth):
    seed = oauth.sandbox.issue_refresh_token(oauth.client_id)
    tokens = oauth.provider(
        oauth_company_id="", oauth_company_auth_token="", oauth_refresh_token=seed
    )
    old = tokens.token()
    oauth.sandbox.configure_oauth(revoke_refresh_tokens=True)
    with pytest.raises(TokenUnavailable) as error:
        tokens.refresh(old)
    assert "108" in str(error.value) and "NOTIFY_OAUTH_REFRESH_TOKEN" in str(error.value)
    _secrets_absent(str(error.value), oauth.sandbox)


def _netloc(url: str) -> str:
    return url.split("://", 1)[1]


def test_code_16_retries_at_the_named_geolocation_and_stores_it(oauth):
    with Sandbox(tokens=["x-unused"]) as elsewhere:
        oauth.sandbox.configure_oauth(redirect_to=elsewhere.root_url)
        moved: list[str] = []
        tokens = OAuthTokens.from_settings(
            oauth.settings(oauth_extra_geolocation_hosts=_netloc(elsewhere.root_url)),
            oauth.redis,
            on_geolocation=moved.append,
        )
        tokens.token()
        assert oauth.sandbox.oauth_stats()["codes"] == {"16": 1}
        assert elsewhere.oauth_stats()["grants"] == {"password": 1}
        assert oauth.stored()["geolocation"] == elsewhere.root_url
        assert moved == [elsewhere.root_url]


# -- geolocations Concur names are checked, not trusted (issue 11, item 1) ------------------


def _refused_count(redis: Redis) -> int:
    return int(redis.hget(keys.STATS, "geolocation_refused") or 0)


@pytest.mark.parametrize(
    ("geolocation", "trusted"),
    [
        ("https://us.api.concursolutions.com", True),
        ("https://us2.api.concursolutions.com/", True),
        ("https://emea-impl.api.concursolutions.com", True),
        ("https://cn.api.concurcdc.cn", True),
        ("https://extra.example.net", True),  # listed in the settings
        ("https://a.b.wild.example", True),  # listed as *.wild.example
        ("http://169.254.169.254", False),  # cloud metadata
        ("https://169.254.169.254", False),
        ("http://us.api.concursolutions.com", False),  # a Concur host, but not https
        ("https://api.concursolutions.com", False),  # not under *.api.concursolutions.com
        ("https://us.api.concursolutions.com.evil.example", False),
        ("https://evilapi.concursolutions.com", False),
        ("https://user@us.api.concursolutions.com", False),
        ("https://evil.example@us.api.concursolutions.com", False),
        ("https://us.api.concursolutions.com/../evil", False),  # a path
        ("https://us.api.concursolutions.com?x=1", False),
        ("https://us.api.concursolutions.com:99999", False),
        ("https://extra.example.net:8443", False),  # listed on 443 only
        ("https://wild.example", False),  # the wildcard's apex
        ("http://extra.example.net", False),  # listed, but plain http to another machine
        ("ftp://us.api.concursolutions.com", False),
        ("https://us.api.concursolutions.com\\@evil.example", False),
        ("", False),
    ],
)
def test_trusted_geolocation(geolocation, trusted):
    config = OAuthConfig(
        client_id="c",
        geolocation="https://us.api.concursolutions.com",
        extra_geolocation_hosts=("extra.example.net", "*.wild.example"),
    )
    assert trusted_geolocation(geolocation, config) is trusted


def test_the_configured_origins_are_always_trusted():
    config = OAuthConfig(
        client_id="c", geolocation="http://127.0.0.1:8123", token_url="https://t.example/tok"
    )
    assert trusted_geolocation("http://127.0.0.1:8123", config)
    assert trusted_geolocation("https://t.example", config)
    assert not trusted_geolocation("http://127.0.0.1:8124", config)  # another port, not listed
    assert not trusted_geolocation("http://t.example", config)


def test_extra_geolocation_hosts_setting_is_checked():
    assert load_settings(oauth_extra_geolocation_hosts="A.example, *.b.example:8443")
    with pytest.raises(SettingsError, match=r"^NOTIFY_OAUTH_EXTRA_GEOLOCATION_HOSTS: "):
        load_settings(oauth_extra_geolocation_hosts="https://a.example")


def test_token_answer_naming_a_foreign_geolocation_is_not_followed(oauth, caplog):
    # A hostile upstream's answer names a host of its own: the next refresh would post the
    # client secret and the refresh token there, and every message after it.
    with Sandbox(tokens=["x-unused"]) as attacker:
        oauth.sandbox.configure_oauth(geolocation=attacker.root_url, access_ttl_seconds=2)
        before = _refused_count(oauth.redis)
        moved: list[str] = []
        tokens = OAuthTokens.from_settings(
            oauth.settings(), oauth.redis, on_geolocation=moved.append
        )
        with caplog.at_level("WARNING", logger="notify.tokens"):
            first = tokens.token()
            second = wait_for(lambda: (t := tokens.token()) != first and t, timeout=5)
        assert second in oauth.sandbox.issued_tokens()
        # Both grants went to the configured token endpoint; none to the named host.
        assert oauth.grants() == {"password": 1, "refresh_token": 1}
        assert attacker.oauth_stats()["requests"] == [] and attacker.requests() == []
        assert oauth.stored()["geolocation"] == oauth.sandbox.root_url
        assert moved == [oauth.sandbox.root_url]
        assert _refused_count(oauth.redis) == before + 2
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert any(attacker.root_url in w and "not followed" in w for w in warnings)
        metrics = render_prometheus(collect(oauth.runtime()))
        assert f"notify_oauth_geolocation_refused_total {before + 2}" in metrics


def test_token_answer_naming_the_metadata_address_is_not_followed(oauth):
    oauth.sandbox.configure_oauth(geolocation="http://169.254.169.254")
    before = _refused_count(oauth.redis)
    oauth.provider().token()
    assert oauth.stored()["geolocation"] == oauth.sandbox.root_url
    assert _refused_count(oauth.redis) == before + 1


def test_code_16_naming_a_foreign_geolocation_is_not_followed(oauth):
    with Sandbox(tokens=["x-unused"]) as attacker:
        oauth.sandbox.configure_oauth(redirect_to=attacker.root_url)
        before = _refused_count(oauth.redis)
        moved: list[str] = []
        tokens = OAuthTokens.from_settings(
            oauth.settings(), oauth.redis, on_geolocation=moved.append
        )
        with pytest.raises(TokenUnavailable) as error:
            tokens.token()
        assert "code=16" in str(error.value)
        assert attacker.oauth_stats()["requests"] == []  # the secrets never went there
        assert moved == [] and "geolocation" not in oauth.stored()
        assert _refused_count(oauth.redis) == before + 1


def test_a_foreign_geolocation_already_stored_in_redis_is_not_used(oauth):
    # State written before this check existed (or by a bad answer then): not followed either.
    with Sandbox(tokens=["x-unused"]) as attacker:
        oauth.redis.hset(
            keys.oauth_state(oauth.client_id), mapping={"geolocation": attacker.root_url}
        )
        before = _refused_count(oauth.redis)
        moved: list[str] = []
        tokens = OAuthTokens.from_settings(
            oauth.settings(), oauth.redis, on_geolocation=moved.append
        )
        assert tokens.token() in oauth.sandbox.issued_tokens()
        assert attacker.oauth_stats()["requests"] == []
        assert oauth.stored()["geolocation"] == oauth.sandbox.root_url
        assert moved == [oauth.sandbox.root_url]
        assert _refused_count(oauth.redis) == before + 1


def test_tokens_fetched_at_run_time_are_redacted_from_logs_and_sentry(oauth):
    # Issue 11, item 7: a bare token in a log line or a Sentry event was left as it was.
    from worker.ops.logs import redact
    from worker.ops.monitoring import scrub

    tokens = oauth.provider()
    access = tokens.token()
    refresh = Cipher(FERNET_KEY).open(oauth.stored()["refresh"])
    line = f"posting with {access}; stored {refresh}; Authorization: OAuth {access}"
    assert access not in redact(line) and refresh not in redact(line)
    event = {"message": line, "extra": {"note": access}}
    assert access not in json.dumps(scrub(event, {}))
    # A restarted process that only reads the stored refresh token back knows it too.
    from worker.ops import logs

    logs._runtime_secrets.clear()
    with logs._secrets_lock:
        logs._compile()
    assert refresh in redact(refresh)
    oauth.provider().state.load()
    assert refresh not in redact(f"stored {refresh}")


def test_token_endpoint_down_raises_token_unavailable_and_logs_an_error(oauth, caplog):
    oauth.sandbox.configure_oauth(failures=[503])
    tokens = oauth.provider()
    with caplog.at_level("ERROR", logger="notify.tokens"), pytest.raises(TokenUnavailable):
        tokens.token()
    assert any(r.name == "notify.tokens" and r.levelname == "ERROR" for r in caplog.records)
    # The whole fleet waits a moment before asking again, then it works.
    assert oauth.redis.exists(keys.oauth_cooldown(oauth.client_id))
    assert wait_for(lambda: _try(tokens.token), timeout=10)


def _try(call: Callable[[], str]) -> str | None:
    try:
        return call()
    except TokenUnavailable:
        return None


# -- real workers -----------------------------------------------------------------------------


def _oauth_worker(start_worker: Callable[..., WorkerProcess], oauth: OAuthCase, **env: str):
    return start_worker(**oauth.env(**env))


@pytest.mark.slow
def test_access_token_is_replaced_before_it_expires(oauth, start_worker, user_id):
    # Replaced at half its lifetime: a post would have to stall 3 s to meet an expired token.
    oauth.sandbox.configure_oauth(access_ttl_seconds=6)
    _oauth_worker(start_worker, oauth)
    rt = oauth.runtime()
    ids = _send_until_refreshed(oauth, rt, user_id, 2, refreshes=2)
    records = _all_finished(rt, ids)
    assert {r["state"] for r in records} == {"delivered"}
    statuses = [r["status"] for r in oauth.sandbox.requests(user_id=user_id)]
    assert statuses == [200] * len(ids)  # never a 401: each token was replaced in time
    assert oauth.grants().get("refresh_token", 0) >= 1


@pytest.mark.slow
def test_two_workers_refresh_one_at_a_time_and_never_reuse_a_refresh_token(
    oauth, start_worker, user_id
):
    # Replaced at half its lifetime: a post would have to stall 2 s to meet an expired token.
    oauth.sandbox.configure_oauth(access_ttl_seconds=4)
    workers = [_oauth_worker(start_worker, oauth, worker_concurrency="8") for _ in range(2)]
    rt = oauth.runtime()
    ids = _send_until_refreshed(oauth, rt, user_id, 6, refreshes=3)
    records = _all_finished(rt, ids)
    assert {r["state"] for r in records} == {"delivered"}
    # Both workers did deliver (a delivered record no longer names its worker: their logs do).
    logs = [w.log_path.read_text(errors="replace") for w in workers]
    assert all(any(f"delivered {i} " in text for i in ids) for text in logs)
    stats = oauth.sandbox.oauth_stats()
    assert stats["grants"]["password"] == 1  # the second worker reused what the first stored
    assert stats["grants"]["refresh_token"] >= 3
    assert stats["reusedRefreshTokens"] == 0
    assert stats["codes"] == {}
    assert "401" not in oauth.sandbox.stats()["byStatus"]


@pytest.mark.slow
def test_a_401_refreshes_the_token_once_and_posts_again(oauth, start_worker, user_id):
    _oauth_worker(start_worker, oauth)
    rt = oauth.runtime()
    oauth.sandbox.script([{"status": 401}], user_id=user_id)
    [message_id] = oauth.send(rt, user_id)
    [record] = _all_finished(rt, [message_id])
    assert record["state"] == "delivered"
    seen = oauth.sandbox.requests(user_id=user_id)
    assert [r["status"] for r in seen] == [401, 200]
    assert seen[0]["tokenSha256"] != seen[1]["tokenSha256"]
    assert oauth.grants() == {"password": 1, "refresh_token": 1}


@pytest.mark.slow
def test_token_endpoint_outage_defers_messages_until_it_recovers(oauth, start_worker, user_id):
    # Five failures, one every 2 s at most (the fleet-wide cool-down): about 10 s of outage,
    # far longer than NOTIFY_MAX_ATTEMPTS=3 retries with 0.3-1 s backoff would survive.
    oauth.sandbox.configure_oauth(failures=[503, 503, 502, 503, 504])
    worker = _oauth_worker(start_worker, oauth)
    rt = oauth.runtime()
    ids = oauth.send(rt, user_id, 4)
    records = _all_finished(rt, ids, timeout=60)
    assert {r["state"] for r in records} == {"delivered"}
    assert rt.deadletters.count() == 0
    deferrals = [
        sum(1 for a in r["attempts"] if a["cause"] == "token_unavailable") for r in records
    ]
    assert max(deferrals) > rt.settings.max_attempts
    assert [a["outcome"] for a in records[0]["attempts"]][-1] == "delivered"
    assert oauth.sandbox.oauth_stats()["failuresLeft"] == 0
    log = worker.log()
    assert "Concur token refresh failed" in log and "ERROR" in log
    _secrets_absent(log, oauth.sandbox)


@pytest.mark.slow
def test_code_16_moves_posts_to_the_geolocation_concur_names(oauth, start_worker, user_id):
    with Sandbox(tokens=["x-unused"]) as elsewhere:
        oauth.sandbox.configure_oauth(redirect_to=elsewhere.root_url)
        _oauth_worker(
            start_worker, oauth, oauth_extra_geolocation_hosts=_netloc(elsewhere.root_url)
        )
        rt = oauth.runtime()
        [message_id] = oauth.send(rt, user_id)
        [record] = _all_finished(rt, [message_id])
        assert record["state"] == "delivered"
        assert oauth.sandbox.requests(user_id=user_id) == []
        assert [r["status"] for r in elsewhere.requests(user_id=user_id)] == [200]


@pytest.mark.slow
def test_a_worker_keeps_posting_to_the_configured_host_when_concur_names_a_foreign_one(
    oauth, start_worker, user_id
):
    with Sandbox(tokens=["x-unused"]) as attacker:
        oauth.sandbox.configure_oauth(geolocation=attacker.root_url, access_ttl_seconds=2)
        worker = _oauth_worker(start_worker, oauth)
        rt = oauth.runtime()
        ids = oauth.send(rt, user_id, 2)
        ids += _send_until_refreshed(oauth, rt, user_id, 1)  # a refresh in between
        ids += oauth.send(rt, user_id, 2)
        assert {r["state"] for r in _all_finished(rt, ids)} == {"delivered"}
        statuses = [r["status"] for r in oauth.sandbox.requests(user_id=user_id)]
        assert statuses == [200] * len(ids)
        assert attacker.requests() == [] and attacker.oauth_stats()["requests"] == []
        assert "not followed" in worker.log()


@pytest.mark.slow
def test_no_secret_reaches_the_worker_log(oauth, start_worker, user_id):
    oauth.sandbox.configure_oauth(access_ttl_seconds=2, failures=[503])
    worker = _oauth_worker(start_worker, oauth, token_encryption_key=FERNET_KEY)
    rt = oauth.runtime()
    ids = oauth.send(rt, user_id, 3)
    ids += _send_until_refreshed(oauth, rt, user_id, 1)  # a refresh in between
    ids += oauth.send(rt, user_id, 3)
    assert {r["state"] for r in _all_finished(rt, ids)} == {"delivered"}
    log = worker.log()
    assert "token" in log.lower()  # the log did talk about tokens
    _secrets_absent(log, oauth.sandbox)
    assert FERNET_KEY not in log
