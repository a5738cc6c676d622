"""Connecting a Concur company to the registry, and the companies as the front doors list them.

``connect`` exchanges what a company handed over for its refresh token and stores it
(``worker.store.companies``): a **request token** (the App Center's ``requestToken``, or the
Company Request Token tool's; 24 hours, usable more than once) through the password grant
(``username=<company UUID>``, ``password=<request token>``, ``credtype=authtoken``), or a
**refresh token** through the refresh grant. Both go through ``worker.concur.oauth``'s
``TokenEndpoint`` with the app's client id and secret (``NOTIFY_OAUTH_CLIENT_ID`` / ``_SECRET``):
the same HTTP path, the same code-16 geolocation move and the same trust rules
(``trusted_geolocation``) as the default company's tokens. The access token the grant returns is
shared with the fleet as a worker's own fetch would be (``CompanyAccessShare``: sealed, until it
is due for renewal), so the company's first messages cost the workers a Redis read, not a second
token request.

Concur refusing the grant, or not answering, raises ``ConnectError`` with Concur's error text and
nothing is stored: a company already in the registry keeps what it had. No secret enters the
text: the tokens given and received are registered for redaction before anything is logged.

``default_company`` describes the company the settings define (``NOTIFY_API_TOKEN`` or the
``NOTIFY_OAUTH_*`` set), shown first wherever companies are listed.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

from redis import Redis
from redis.exceptions import LockError

from worker.concur.companytokens import CompanyAccessShare
from worker.concur.oauth import (
    LOCK_POLL_SECONDS,
    OAuthConfig,
    TokenEndpoint,
    TokenEndpointError,
    geolocation_of,
    grant_form,
    report_untrusted_geolocation,
    shared_token_of,
    token_url_for,
    trusted_geolocation,
)
from worker.concur.tokens import TokenUnavailable, is_loopback_url
from worker.ops.logs import add_runtime_secret
from worker.settings import Settings
from worker.shapes.models import DEFAULT_COMPANY, is_company_id
from worker.shapes.times import int_or_none
from worker.store import keys
from worker.store.companies import CONNECTED, DISCONNECTED, Company, CompanyRegistry

CLIENT_SETTINGS = "NOTIFY_OAUTH_CLIENT_ID and NOTIFY_OAUTH_CLIENT_SECRET"


class ConnectError(Exception):
    """A company could not be connected; the text says why and holds no secret.

    ``refused``: Concur answered and refused the grant (a bad or expired token, a wrong client
    secret); otherwise it could not be asked (unreachable, 5xx, a timeout).
    """

    def __init__(self, message: str, *, refused: bool) -> None:
        super().__init__(message)
        self.refused = refused


class NotConfigured(Exception):
    """This deployment has no OAuth client to connect companies with."""


def client_config(settings: Settings) -> OAuthConfig:
    """The OAuth client companies are connected with; ``NotConfigured`` when there is none."""
    if not settings.uses_oauth:
        raise NotConfigured(
            f"connecting a company needs the app's OAuth client: set {CLIENT_SETTINGS} "
            "(and NOTIFY_TOKEN_ENCRYPTION_KEY)"
        )
    return OAuthConfig.from_settings(settings)


def connect(
    registry: CompanyRegistry,
    config: OAuthConfig,
    company_id: str,
    *,
    request_token: str | None = None,
    refresh_token: str | None = None,
    endpoint: TokenEndpoint | None = None,
    clock: Callable[[], float] = time.time,
) -> Company:
    """Connect (or reconnect) ``company_id`` with a request token or a refresh token.

    Exactly one of the two; ``ValueError`` otherwise, or for an id that is not a company UUID.
    Runs under the company's lock, so a worker refreshing the same company's token at that
    moment does not overwrite the new connection. Returns the stored company.
    """
    if not is_company_id(company_id):
        raise ValueError("the company id must be the company's UUID in lower case")
    if (request_token is None) == (refresh_token is None):
        raise ValueError("give a request token or a refresh token (exactly one)")
    given = request_token or refresh_token or ""
    if not given.strip():
        raise ValueError("the token is empty")
    # Redacted from every log line and Sentry event from now on; kept with the latest runtime
    # secrets (a bounded list), since a service connects companies by the thousand.
    add_runtime_secret(given)
    if request_token is not None:
        what = "request token"
        form = grant_form(
            config, "password", username=company_id, password=request_token, credtype="authtoken"
        )
    else:
        what = "refresh token"
        form = grant_form(config, "refresh_token", refresh_token=given)
    redis = registry.redis

    def untrusted(geolocation: str, source: str) -> None:
        report_untrusted_geolocation(redis, geolocation, source)

    owned = endpoint is None
    endpoint = endpoint or TokenEndpoint(config, on_untrusted=untrusted)
    budget = config.fetch_budget_seconds
    lock = redis.lock(
        keys.company_lock(company_id), timeout=budget, sleep=LOCK_POLL_SECONDS, thread_local=False
    )
    try:
        if not lock.acquire(blocking_timeout=budget):
            raise ConnectError(
                f"company {company_id}: its token is being refreshed elsewhere; try again",
                refused=False,
            )
        try:
            url = _token_url(registry.get(company_id), config)
            try:
                grant, answered = endpoint.request(url, form, time.monotonic() + budget)
            except TokenEndpointError as error:
                raise ConnectError(
                    f"Concur refused the {what} of company {company_id}: {error}", refused=True
                ) from None
            except TokenUnavailable as error:
                raise ConnectError(
                    f"Concur could not be asked to connect company {company_id}: {error}",
                    refused=False,
                ) from None
            add_runtime_secret(grant.access_token, grant.refresh_token)
            latest = grant.refresh_token or refresh_token
            if latest is None:
                raise ConnectError(
                    f"Concur's answer for company {company_id} held no refresh token", refused=True
                )
            geolocation = grant.geolocation
            if geolocation is not None and not trusted_geolocation(geolocation, config):
                untrusted(geolocation, "a token answer")
                geolocation = None
            followed = geolocation or geolocation_of(answered)
            now_ms = int(clock() * 1000)
            company = registry.connected(
                company_id,
                latest,
                grant.refresh_expires_at_ms,
                followed,
                now_ms,
                reason=f"connected with a {what}",
            )
            # Under the company's lock, as a worker shares what it fetched: a worker waiting for
            # the lock finds it there and asks Concur nothing.
            CompanyAccessShare(registry, company_id, clock).save(
                shared_token_of(grant, followed, now_ms)
            )
            return company
        finally:
            with contextlib.suppress(LockError):  # expired and taken by another: theirs now
                lock.release()
    finally:
        if owned:
            endpoint.close()


def _token_url(known: Company | None, config: OAuthConfig) -> str:
    """Where to ask first: the company's own geolocation when it is known and may be followed,
    else the configured token URL or API geolocation (code 16 then names the right one)."""
    if known is not None and known.geolocation and trusted_geolocation(known.geolocation, config):
        return token_url_for(known.geolocation)
    return config.token_url or token_url_for(config.geolocation)


def default_company(settings: Settings, redis: Redis) -> Company:
    """The company the settings define, as a ``Company`` marked ``from_settings``.

    Its state is the settings': ``connected`` when they hold credentials for it (an OAuth
    company, ``NOTIFY_API_TOKEN``, or none with the API on this machine: the sandbox), else
    ``disconnected``. With an OAuth company, its geolocation and last refresh are the stored
    token state's.
    """
    if settings.has_oauth_company:
        config = OAuthConfig.from_settings(settings)
        raw = redis.hmget(keys.oauth_state(config.client_id), "geolocation", "updated")
        stored, updated = (
            value.decode("utf-8", "replace") if isinstance(value, bytes) else value for value in raw
        )
        configured = geolocation_of(config.token_url) if config.token_url else config.geolocation
        followed = stored if stored and trusted_geolocation(stored, config) else configured
        return Company(
            DEFAULT_COMPANY,
            CONNECTED,
            geolocation=followed,
            refreshed_ms=int_or_none(updated),
            reason="from the settings (NOTIFY_OAUTH_*)",
            from_settings=True,
        )
    geolocation = geolocation_of(settings.api_base_url)
    if settings.api_token is not None:
        reason = "from the settings (NOTIFY_API_TOKEN)"
    elif is_loopback_url(settings.api_base_url):
        reason = "from the settings (no credentials: the local sandbox)"
    else:
        return Company(
            DEFAULT_COMPANY,
            DISCONNECTED,
            geolocation=geolocation,
            reason="the settings name no company (no NOTIFY_API_TOKEN, no NOTIFY_OAUTH_COMPANY_* "
            "or NOTIFY_OAUTH_REFRESH_TOKEN)",
            from_settings=True,
        )
    return Company(
        DEFAULT_COMPANY, CONNECTED, geolocation=geolocation, reason=reason, from_settings=True
    )


def find(settings: Settings, registry: CompanyRegistry, company_id: str) -> Company | None:
    """``default`` (the settings' company) or a registry company; None when unknown.

    ``ValueError`` for an id that is neither ``default`` nor a company UUID.
    """
    if company_id == DEFAULT_COMPANY:
        return default_company(settings, registry.redis)
    return registry.get(company_id)


def listing(settings: Settings, registry: CompanyRegistry) -> list[Company]:
    """Every company: the default one first, then the registry's by id."""
    return [default_company(settings, registry.redis), *registry.all()]
