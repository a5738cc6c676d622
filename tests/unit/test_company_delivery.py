"""The pure parts of delivering to many companies: grouping a batch by company, whether a
company's message is posted, waits or is dead-lettered (the time passed in), the bounded cache
of per-company token providers, and each geolocation's breaker keys."""

from __future__ import annotations

import random

from redis import Redis

from worker.concur.companytokens import CompanyAccessShare, CompanyTokens
from worker.concur.oauth import OAuthConfig, TokenEndpoint
from worker.delivery import ends
from worker.delivery.attempts import by_company
from worker.delivery.ends import Attempt, CompanyWaiting, DeadLetter
from worker.limits.breaker import Breaker, BreakerPolicy, geolocation_name
from worker.rules import outcomes
from worker.rules.allowlist import AllowList
from worker.rules.retries import CompanyPolicy, RetryPolicy
from worker.shapes.models import DEFAULT_COMPANY, Message, company_of
from worker.store import keys
from worker.store.codec import Claim
from worker.store.companies import CompanyRegistry, SharedAccess, shared_access_of
from worker.store.sealing import Cipher

POLICY = RetryPolicy(max_attempts=3, backoff_base_seconds=1, backoff_max_seconds=5)
ALLOWLIST = AllowList.from_entries(["welcome"], ["app.example.com"])
ACME = "0f3c2f6e-4a1b-4c2d-9e8f-7a6b5c4d3e2f"
GLOBEX = "7d1e9c2b-5a4f-4e3d-8c2b-1a0f9e8d7c6b"
NOW = 1_800_000_000_000
GRACE = CompanyPolicy(grace_seconds=600, recheck_seconds=60)


def _attempt(user: str, company: str | None = None) -> Attempt:
    request = Message.create(user, "s-1", "welcome").to_wire()
    if company is not None:
        request["company"] = company
    taken = ends.after_claim(
        f"m-{user}",
        "owner",
        Claim("go", attempt=1, request=request),
        policy=POLICY,
        allowlist=ALLOWLIST,
        now_ms=NOW,
    )
    assert isinstance(taken, Attempt), taken
    return taken


def test_a_request_without_a_company_is_the_default_companys() -> None:
    assert company_of({"userId": "u"}) == DEFAULT_COMPANY
    assert company_of(None) == DEFAULT_COMPANY
    assert company_of({"company": ""}) == DEFAULT_COMPANY
    assert company_of({"company": ACME}) == ACME


def test_a_mixed_batch_is_grouped_by_company_in_its_own_order() -> None:
    batch = [
        _attempt("u1", ACME),
        _attempt("u2"),
        _attempt("u3", GLOBEX),
        _attempt("u4", ACME),
        _attempt("u5"),
    ]
    groups = by_company(batch)
    assert list(groups) == [ACME, DEFAULT_COMPANY, GLOBEX]
    assert [a.message.user_id for a in groups[ACME]] == ["u1", "u4"]
    assert [a.message.user_id for a in groups[DEFAULT_COMPANY]] == ["u2", "u5"]
    assert [a.message.user_id for a in groups[GLOBEX]] == ["u3"]


def test_a_connected_companys_message_is_posted() -> None:
    attempt = _attempt("u1", ACME)
    decided = ends.for_company(attempt, ACME, "connected", NOW - 5, policy=GRACE, now_ms=NOW)
    assert decided is attempt


def test_a_disconnected_or_unknown_companys_message_is_dead_lettered_at_once() -> None:
    for state, why in (("disconnected", "is disconnected"), (None, "not in the company registry")):
        decided = ends.for_company(
            _attempt("u1", ACME), ACME, state, NOW - 5, policy=GRACE, now_ms=NOW
        )
        assert isinstance(decided, DeadLetter)
        assert decided.failure.reason == outcomes.COMPANY_DISCONNECTED
        assert why in decided.failure.detail and ACME in decided.failure.detail


def test_a_company_waiting_to_be_reconnected_keeps_its_messages_until_the_next_recheck() -> None:
    since = NOW - 1000  # it has needed a reconnection for a second
    decided = ends.for_company(
        _attempt("u1", ACME),
        ACME,
        "needs_reconnect",
        since,
        policy=GRACE,
        now_ms=NOW,
        rng=random.Random(7),
    )
    assert isinstance(decided, CompanyWaiting)
    assert decided.grace_ends_ms == since + 600_000
    # The next look: a recheck away, plus at most a tenth of it as jitter.
    assert NOW + 60_000 <= decided.due_ms <= NOW + 66_000
    assert decided.company == ACME


def test_a_waiting_message_is_looked_at_again_no_later_than_its_grace_end() -> None:
    since = NOW - 590_000  # ten seconds of grace left, less than a recheck
    decided = ends.for_company(
        _attempt("u1", ACME), ACME, "needs_reconnect", since, policy=GRACE, now_ms=NOW
    )
    assert isinstance(decided, CompanyWaiting)
    assert decided.due_ms == decided.grace_ends_ms == NOW + 10_000


def test_past_the_grace_a_waiting_message_becomes_a_dead_letter_company_disconnected() -> None:
    since = NOW - 600_000
    decided = ends.for_company(
        _attempt("u1", ACME), ACME, "needs_reconnect", since, policy=GRACE, now_ms=NOW
    )
    assert isinstance(decided, DeadLetter)
    assert decided.failure.reason == outcomes.COMPANY_DISCONNECTED
    assert "grace of 600s" in decided.failure.detail
    assert outcomes.COMPANY_DISCONNECTED in outcomes.REASONS


def test_the_token_cache_keeps_at_most_its_capacity_of_companies_least_recent_dropped() -> None:
    # A client that is never asked anything: no provider does I/O until its first token.
    redis = Redis(host="127.0.0.1", port=1)
    config = OAuthConfig(
        client_id="app", client_secret="secret", company_id="c", initial_refresh_token="r"
    )
    tokens = CompanyTokens(
        CompanyRegistry(redis, Cipher(None)),
        config,
        redis,
        capacity=2,
        endpoint=TokenEndpoint(config),
    )
    first = tokens.provider(ACME)
    assert tokens.provider(ACME) is first
    tokens.provider(GLOBEX)
    tokens.provider(ACME)  # used again: GLOBEX is now the least recently used
    third = "11111111-2222-4333-8444-555555555555"
    tokens.provider(third)
    assert len(tokens) == 2
    assert tokens.provider(ACME) is first  # kept
    assert tokens.geolocation(GLOBEX) is None  # dropped: it will fetch again when asked
    # Each provider keeps its state in its own registry hash, under its own lock, with the
    # app's client only (no password grant, no configured refresh token of the default's).
    assert first.lock_key == keys.company_lock(ACME)
    assert first.cooldown_key == keys.company_cooldown(ACME)
    assert not first.config.has_password_grant and first.config.initial_refresh_token is None


def test_the_default_geolocation_keeps_todays_breaker_keys_and_others_have_their_own() -> None:
    redis = Redis(host="127.0.0.1", port=1)
    default = Breaker(redis, BreakerPolicy())
    assert (default.key, default.window_key, default.name) == (
        keys.BREAKER,
        keys.BREAKER_WINDOW,
        "default",
    )
    name = geolocation_name("https://EMEA.api.concursolutions.com")
    assert name == "emea.api.concursolutions.com"
    emea = Breaker(redis, BreakerPolicy(), name)
    assert emea.key == "notify:breaker:geo:emea.api.concursolutions.com"
    assert emea.window_key == "notify:breaker:geo:emea.api.concursolutions.com:window"
    assert geolocation_name("http://127.0.0.1:8101") == "127.0.0.1:8101"


def test_a_shared_access_token_reads_back_as_written_and_anything_else_is_none() -> None:
    access = SharedAccess("at-123456", NOW + 3_600_000, NOW + 3_300_000, "https://us.example")
    assert shared_access_of(access.to_json()) == access
    for text in (
        "",
        "{}",
        "[1]",
        '{"token": "", "expires_ms": 1, "renew_ms": 1, "geolocation": "g"}',
        '{"token": "t", "expires_ms": "soon", "renew_ms": 1, "geolocation": "g"}',
    ):
        assert shared_access_of(text) is None, text


def test_each_company_provider_shares_its_access_token_under_its_own_key() -> None:
    redis = Redis(host="127.0.0.1", port=1)  # never asked: nothing here does I/O
    config = OAuthConfig(client_id="app", client_secret="secret")
    tokens = CompanyTokens(
        CompanyRegistry(redis, Cipher(None)),
        config,
        redis,
        capacity=2,
        endpoint=TokenEndpoint(config),
    )
    share = tokens.provider(ACME).share
    assert isinstance(share, CompanyAccessShare) and share.company_id == ACME
    assert keys.company_access(ACME) == f"notify:company:{ACME}:access"
