"""Access tokens per company, in each worker process: ``CompanyTokens``.

The default company (the settings' ``NOTIFY_API_TOKEN`` or ``NOTIFY_OAUTH_*``) keeps the
provider it always had (``StaticToken`` or ``OAuthTokens``), untouched. A registry company
(``worker.store.companies``) gets an ``OAuthTokens`` of its own, the same machinery with its
state elsewhere (``CompanyTokenState``):

* the refresh token is the registry's (sealed in ``notify:company:{id}``), read under the
  company's own lock (``keys.company_lock``), so one process at a time in the fleet uses it, and
  a rotated one is stored through ``CompanyRegistry.refreshed`` (a disconnected company is never
  brought back by a late rotation);
* the access token is kept in this process's memory, in a least-recently-used cache of at
  most ``NOTIFY_COMPANY_TOKEN_CACHE_SIZE`` companies (``cachetools.LRUCache``): thousands of
  companies cost a bounded amount of memory, and an evicted company simply gets it again;
* and shared with the fleet (``CompanyAccessShare``: sealed in ``keys.company_access`` until it
  is due for renewal), so a company costs one token request across every worker process, not
  one per process: the process that fetches it shares it before it lets the company's lock go,
  and the others read it, before the lock or once they hold it;
* a batch's companies get their tokens together (``tokens``): the ones this process holds, then
  the shared ones in one round trip, then the rest fetched side by side on a small pool of
  threads (``FETCH_THREADS``), so a batch of twenty new companies waits for about one fetch,
  not twenty in a row;
* every company's provider shares one token endpoint (one connection pool).

Concur refusing a company's refresh token (code 108, or an expired one) puts the company in
``needs_reconnect`` (``CompanyRegistry.needs_reconnect``), logs an ERROR on ``notify.tokens``
(an operational error: an operator must reconnect it; no secret in the line) and raises
``CompanyNeedsReconnect``: its messages wait (``worker.delivery.ends.company_waits``).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NoReturn

from cachetools import LRUCache
from redis import Redis

from worker.concur.oauth import (
    OAuthConfig,
    OAuthTokens,
    SharedToken,
    StoredState,
    TokenEndpoint,
    report_untrusted_geolocation,
)
from worker.concur.tokens import CompanyNeedsReconnect, TokenUnavailable
from worker.ops.logs import add_runtime_secret
from worker.store import keys
from worker.store.companies import CompanyRegistry, SharedAccess

log = logging.getLogger("notify.tokens")

__all__ = ["CompanyAccessShare", "CompanyNeedsReconnect", "CompanyTokenState", "CompanyTokens"]

# Token requests of one process in flight together (threads of the pool, connections of the
# endpoint): enough for a batch of new companies to wait about one fetch, few enough that a
# burst of thousands of new companies does not open thousands of connections.
FETCH_THREADS = 16


class CompanyTokenState:
    """An ``OAuthTokens`` state (``worker.concur.oauth.TokenState``) kept in the registry."""

    def __init__(
        self,
        registry: CompanyRegistry,
        company_id: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.company_id = company_id
        self._clock = clock

    def load(self) -> StoredState:
        """The company's refresh token (opened), its expiry and its geolocation."""
        company, refresh = self.registry.with_refresh_token(self.company_id)
        if company is None:
            return StoredState()
        add_runtime_secret(refresh)
        return StoredState(refresh, company.refresh_expires_ms, company.geolocation)

    def save(self, state: StoredState) -> None:
        """Store a rotated refresh token and the latest geolocation.

        Nothing without a refresh token: after a refusal the sealed one stays until the company
        is reconnected or disconnected (docs/companies.md).
        """
        if state.refresh_token and state.geolocation:
            self.registry.refreshed(
                self.company_id,
                state.refresh_token,
                state.refresh_expires_at_ms,
                state.geolocation,
                int(self._clock() * 1000),
            )

    def unusable(self, why: str) -> NoReturn:
        """Mark the company ``needs_reconnect``, log an ERROR, raise ``CompanyNeedsReconnect``."""
        reason = f"Concur refused its refresh token: {why}"
        if self.registry.needs_reconnect(self.company_id, reason, int(self._clock() * 1000)):
            log.error(
                "company %s needs to be reconnected (%s): its messages wait; reconnect it with "
                "`notify companies connect %s --request-token ...`",
                self.company_id,
                why,
                self.company_id,
                extra={"company": self.company_id},
            )
        raise CompanyNeedsReconnect(self.company_id, why)


class CompanyAccessShare:
    """An ``AccessShare`` over the registry: one company's access token, sealed in Redis."""

    def __init__(
        self,
        registry: CompanyRegistry,
        company_id: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.company_id = company_id
        self._clock = clock

    def load(self) -> SharedToken | None:
        """The company's shared token not yet due for renewal, if any (one round trip)."""
        found = self.registry.shared_access([self.company_id], int(self._clock() * 1000))
        access = found.get(self.company_id)
        return None if access is None else shared_token(access)

    def save(self, token: SharedToken) -> None:
        """Share a token just fetched (not when the company is no longer connected)."""
        access = SharedAccess(token.token, token.expires_ms, token.renew_ms, token.geolocation)
        self.registry.share_access(self.company_id, access, int(self._clock() * 1000))


def shared_token(access: SharedAccess) -> SharedToken:
    """The registry's form of a shared token as the OAuth provider takes it (pure)."""
    return SharedToken(access.token, access.expires_ms, access.renew_ms, access.geolocation)


class CompanyTokens:
    """Access tokens of registry companies: one ``OAuthTokens`` per company, LRU-bounded."""

    def __init__(
        self,
        registry: CompanyRegistry,
        config: OAuthConfig | None,
        redis: Redis,
        *,
        capacity: int,
        endpoint: TokenEndpoint | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``config``: the app's OAuth client (None: none configured, so no registry company
        can have a token)."""
        self.registry = registry
        # The app's client, without the default company's own credentials: a registry company
        # has only its refresh token (no password grant, no configured seed).
        self.config = (
            None
            if config is None
            else dataclasses.replace(
                config, company_id=None, company_auth_token=None, initial_refresh_token=None
            )
        )
        self.redis = redis
        self.capacity = capacity
        self._clock = clock
        self._endpoint = endpoint
        self._owns_endpoint = endpoint is None
        self._cache: LRUCache[str, OAuthTokens] = LRUCache(maxsize=capacity)
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return len(self._cache)

    def provider(self, company_id: str) -> OAuthTokens:
        """The company's provider (made, and the least recently used one dropped, when new)."""
        with self._lock:
            found = self._cache.get(company_id)
            if found is None:
                found = self._cache[company_id] = self._make(company_id)
            return found

    def token(self, company_id: str) -> str:
        """The company's access token now; ``CompanyNeedsReconnect`` or ``TokenUnavailable``."""
        return self.provider(company_id).token()

    def tokens(self, company_ids: list[str]) -> dict[str, str | TokenUnavailable]:
        """Each company's access token now, or why it has none (``CompanyNeedsReconnect``, a
        ``TokenUnavailable``): held ones first, then the fleet's shared ones in one round trip,
        then the rest fetched side by side. Any other error (Redis away) is raised."""
        found: dict[str, str | TokenUnavailable] = {}
        providers: dict[str, OAuthTokens] = {}
        for company_id in company_ids:
            try:
                provider = providers[company_id] = self.provider(company_id)
            except TokenUnavailable as error:
                found[company_id] = error
                continue
            held = provider.fresh()
            if held is not None:
                found[company_id] = held
        missing = [company_id for company_id in providers if company_id not in found]
        if not missing:
            return found
        shared = self.registry.shared_access(missing, int(self._clock() * 1000))
        fetch: list[str] = []
        for company_id in missing:
            access = shared.get(company_id)
            if access is not None and providers[company_id].adopt(shared_token(access)):
                found[company_id] = access.token
            else:
                fetch.append(company_id)
        # Their share was read just now: the fetches do not read it again before the lock.
        if len(fetch) == 1:
            found[fetch[0]] = _token_or_why(providers[fetch[0]])
        elif fetch:
            pool = self._fetch_pool()
            futures: list[tuple[str, Future[str | TokenUnavailable]]] = [
                (company_id, pool.submit(_token_or_why, providers[company_id]))
                for company_id in fetch
            ]
            for company_id, future in futures:
                found[company_id] = future.result()
        return found

    def refresh(self, company_id: str, refused: str) -> str:
        """A new access token for the company after the API refused ``refused`` (a 401)."""
        return self.provider(company_id).refresh(refused)

    def geolocation(self, company_id: str) -> str | None:
        """The geolocation the company's last token came from (None before the first)."""
        with self._lock:  # a read moves the entry in the LRU order: not concurrently
            found = self._cache.get(company_id)
        return None if found is None else found.geolocation

    def close(self) -> None:
        """Close the shared token endpoint's connections (and the fetching threads)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self._endpoint is not None and self._owns_endpoint:
            self._endpoint.close()

    def _fetch_pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(FETCH_THREADS, "notify-company-tokens")
            return self._pool

    def _make(self, company_id: str) -> OAuthTokens:
        if self.config is None:
            raise TokenUnavailable(
                f"company {company_id}: no OAuth client configured (NOTIFY_OAUTH_CLIENT_ID and "
                "NOTIFY_OAUTH_CLIENT_SECRET) to fetch its tokens with"
            )
        if self._endpoint is None:
            redis = self.redis

            def untrusted(geolocation: str, source: str) -> None:
                report_untrusted_geolocation(redis, geolocation, source)

            self._endpoint = TokenEndpoint(
                self.config, on_untrusted=untrusted, connections=FETCH_THREADS
            )
        return OAuthTokens(
            self.config,
            self.redis,
            state=CompanyTokenState(self.registry, company_id, self._clock),
            lock_key=keys.company_lock(company_id),
            cooldown_key=keys.company_cooldown(company_id),
            endpoint=self._endpoint,
            share=CompanyAccessShare(self.registry, company_id, self._clock),
        )


def _token_or_why(provider: OAuthTokens) -> str | TokenUnavailable:
    """The provider's token (its share read by the caller just before), or the
    ``TokenUnavailable`` that says why it has none."""
    try:
        return provider.token(share_read=True)
    except TokenUnavailable as error:
        return error
