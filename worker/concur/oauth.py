"""Concur company OAuth tokens: ``OAuthTokens``, a ``TokenProvider`` shared safely by a fleet.

Concur's token endpoint is ``POST {geolocation}/oauth2/v0/token`` (form-encoded). A company gets
its first tokens from the password grant (``username=<companyId>``, ``password=<auth token>``,
``credtype=authtoken``) and later ones from the ``refresh_token`` grant. Access tokens live an
hour, refresh tokens six months; any answer may carry a new refresh token and a new
``geolocation`` (base host), and the latest of both is what counts.

Where things live:

* the access token only in this process's memory (Concur asks that it not be stored), replaced
  shortly before it expires (``REFRESH_MARGIN_SECONDS`` early, at most half its lifetime);
* the refresh token, its expiry and the geolocation in Redis (``keys.oauth_state``), the refresh
  token Fernet-encrypted when ``NOTIFY_TOKEN_ENCRYPTION_KEY`` is set.

One refresh at a time across every worker: a process takes a Redis lock (``SET NX PX`` with a
random owner, released by a compare-and-delete script), reads the latest refresh token, runs its
own grant and stores what came back before letting go. So a rotated refresh token is never
presented twice, and each process still gets an access token of its own, unless the provider is
given an ``AccessShare`` (registry companies: ``worker.concur.companytokens``): then the access
token fetched is handed to the fleet (sealed, until it is due for renewal), and a process that
finds one there, before taking the lock or once it holds it, uses it instead of asking Concur.

Concur's answers are not trusted blindly: a ``geolocation`` (in a token answer, a code-16 error,
or read back from Redis) is followed only when ``trusted_geolocation`` accepts it: ``https`` on a
Concur host (``*.api.concursolutions.com``, ``*.api.concurcdc.cn``), a host listed in
``NOTIFY_OAUTH_EXTRA_GEOLOCATION_HOSTS``, or the origin of the configured API or token URL.
Any other is not followed (the current one is kept), logged at WARNING and counted in
``notify_oauth_geolocation_refused_total``: followed, it would receive the client secret, the
refresh token and every message.

The exchange runs on the transport of the v4 posts (``worker.concur.transport``, libcurl): one
deadline for the whole exchange (connecting, sending and reading the answer: a server dripping
a byte a second cannot stretch it), at most ``MAX_RESPONSE_BYTES`` (64 KiB) of answer, no
redirects followed, TLS verified, proxies from the environment.

Errors: ``code`` 16 names the right geolocation (the request is repeated there once); code 108
is a bad or expired refresh token (the password grant takes over when company credentials are
configured). Anything else that leaves no usable token (endpoint down, 5xx, timeout, a refused
credential, the lock not free in time) raises ``TokenUnavailable`` and is logged at ERROR on
``notify.tokens``; messages then wait for a later attempt instead of being dead-lettered. No
secret ever enters a log line or an exception text, and every token fetched or read back is
registered with ``worker.ops.logs.add_runtime_secret``, so even a stray one is redacted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol
from urllib.parse import SplitResult, urlencode, urlsplit

from redis import Redis
from redis.exceptions import LockError

from worker.concur.client import USER_AGENT
from worker.concur.tokens import TokenUnavailable
from worker.concur.transport import CurlTransport, Exchange, ExchangeFailed
from worker.ops.logs import add_runtime_secret, add_secret
from worker.settings import Settings, is_loopback_host
from worker.store import keys
from worker.store.sealing import RESEAL_SCRIPT, Cipher

log = logging.getLogger("notify.tokens")

TOKEN_PATH = "/oauth2/v0/token"
REFRESH_MARGIN_SECONDS = 300.0
FAILURE_COOLDOWN_SECONDS = 2.0
LOCK_POLL_SECONDS = 0.05
CODE_WRONG_GEOLOCATION = 16
CODE_BAD_REFRESH_TOKEN = 108
# Concur's base hosts all live under these (settings.GEOLOCATIONS); https only.
CONCUR_HOST_SUFFIXES = (".api.concursolutions.com", ".api.concurcdc.cn")
# The keys.STATS counter of geolocations not followed (stats.py: its metric).
GEOLOCATION_REFUSED_COUNTER = "geolocation_refused"
_DEFAULT_PORTS = {"https": 443, "http": 80}
_DNS_NAME = re.compile(r"(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\.)+[a-z]{2,}")
# refresh_expires_in above this is a Unix time (Concur's form), below it a lifetime in seconds.
EPOCH_THRESHOLD_SECONDS = 1_000_000_000


@dataclass(frozen=True, slots=True)
class OAuthConfig:
    """What the OAuth provider needs from the settings (secrets as plain text, kept here only)."""

    client_id: str
    client_secret: str = ""
    company_id: str | None = None
    company_auth_token: str | None = None
    initial_refresh_token: str | None = None
    token_url: str | None = None
    geolocation: str = "https://us.api.concursolutions.com"
    encryption_key: str | None = None
    extra_geolocation_hosts: tuple[str, ...] = ()
    allow_insecure_http: bool = False
    connect_timeout_seconds: float = 5.0
    # One deadline for each exchange with the token endpoint, the whole answer read included.
    timeout_seconds: float = 30.0
    fetch_budget_seconds: float = 70.0

    @classmethod
    def from_settings(cls, settings: Settings) -> OAuthConfig:
        """The OAuth part of the settings; ``settings.uses_oauth`` must be true."""
        assert settings.oauth_client_id is not None

        def secret(value: Any) -> str | None:
            return None if value is None else str(value.get_secret_value())

        return cls(
            client_id=settings.oauth_client_id,
            client_secret=secret(settings.oauth_client_secret) or "",
            company_id=settings.oauth_company_id,
            company_auth_token=secret(settings.oauth_company_auth_token),
            initial_refresh_token=secret(settings.oauth_refresh_token),
            token_url=settings.oauth_token_url,
            geolocation=geolocation_of(settings.api_base_url),
            encryption_key=secret(settings.token_encryption_key),
            extra_geolocation_hosts=tuple(settings.oauth_extra_geolocation_hosts),
            allow_insecure_http=settings.allow_insecure_http,
            connect_timeout_seconds=settings.http_connect_timeout_seconds,
            timeout_seconds=settings.http_timeout_seconds,
            fetch_budget_seconds=settings.token_fetch_budget_seconds,
        )

    @property
    def has_password_grant(self) -> bool:
        """Whether company credentials for the password grant are configured."""
        return bool(self.company_id and self.company_auth_token)


@dataclass(frozen=True, slots=True)
class Grant:
    """A successful token answer."""

    access_token: str
    expires_in_seconds: float
    refresh_token: str | None
    refresh_expires_at_ms: int | None
    geolocation: str | None


@dataclass(frozen=True, slots=True)
class StoredState:
    """What Redis holds for one client id."""

    refresh_token: str | None = None
    refresh_expires_at_ms: int | None = None
    geolocation: str | None = None
    seed: str | None = None  # fingerprint of the configured refresh token this one descends from


class TokenEndpointError(Exception):
    """The token endpoint answered with an error body ``{code, error, error_description}``."""

    def __init__(
        self, status: int, code: int | None, error: str, description: str, geolocation: str | None
    ) -> None:
        super().__init__(f"token endpoint answered {status} code={code} {error}: {description}")
        self.status = status
        self.code = code
        self.error = error
        self.geolocation = geolocation


def geolocation_of(url: str) -> str:
    """The base host (``scheme://host[:port]``) of a URL."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _origin(parts: SplitResult) -> tuple[str, str, int] | None:
    """(scheme, host, port) of a parsed URL, or None when it has none that is plain."""
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        return None
    host = parts.hostname
    if scheme not in _DEFAULT_PORTS or not host or parts.username is not None:
        return None
    return scheme, host.rstrip("."), port if port is not None else _DEFAULT_PORTS[scheme]


def _configured_origins(config: OAuthConfig) -> set[tuple[str, str, int]]:
    origins = set()
    for url in (config.geolocation, config.token_url):
        if url:
            origin = _origin(urlsplit(url))
            if origin is not None:
                origins.add(origin)
    return origins


def _listed(host: str, port: int, scheme: str, entries: tuple[str, ...]) -> bool:
    """Whether ``host:port`` matches an entry: ``host``, ``host:port``, ``*.suffix[:port]``."""
    for entry in entries:
        name, colon, port_text = entry.strip().lower().rpartition(":")
        if not colon or not port_text.isdigit():
            name, entry_port = entry.strip().lower(), _DEFAULT_PORTS[scheme]
        else:
            entry_port = int(port_text)
        if entry_port != port or not name:
            continue
        if name.startswith("*."):
            if host.endswith(name[1:]) and len(host) > len(name) - 1:
                return True
        elif host == name.rstrip("."):
            return True
    return False


def grant_form(config: OAuthConfig, grant_type: str, **fields: str) -> dict[str, str]:
    """A token request's form: the grant, the client's credentials, and the grant's own fields."""
    return {
        "grant_type": grant_type,
        "client_id": config.client_id,
        "client_secret": config.client_secret,
        **fields,
    }


def trusted_geolocation(geolocation: str, config: OAuthConfig) -> bool:
    """Whether a geolocation Concur named may be followed (see the module docstring).

    Accepted: the origin of the configured API base or token URL (the operator chose it); else
    ``https`` (``http`` only to this machine, or with ``NOTIFY_ALLOW_INSECURE_HTTP``) to a
    Concur host or a host listed in ``NOTIFY_OAUTH_EXTRA_GEOLOCATION_HOSTS``. A geolocation is a
    bare ``scheme://host[:port]``: user information, a path, a query or a fragment refuse it.
    """
    if not isinstance(geolocation, str) or not geolocation.isascii() or not geolocation:
        return False
    if any(ch.isspace() or not ch.isprintable() or ch == "\\" for ch in geolocation):
        return False
    try:
        parts = urlsplit(geolocation)
    except ValueError:
        return False
    if parts.path.strip("/") or parts.query or parts.fragment or "@" in parts.netloc:
        return False
    origin = _origin(parts)
    if origin is None:
        return False
    if origin in _configured_origins(config):
        return True
    scheme, host, port = origin
    if scheme == "https" and host.endswith(CONCUR_HOST_SUFFIXES):
        return _DNS_NAME.fullmatch(host) is not None
    if scheme == "http" and not (is_loopback_host(host) or config.allow_insecure_http):
        return False
    return _listed(host, port, scheme, config.extra_geolocation_hosts)


def api_base_for(geolocation: str, configured_api_base: str) -> str:
    """The v4 base URL on ``geolocation``, keeping the configured URL's path."""
    path = urlsplit(configured_api_base).path.rstrip("/")
    return geolocation.rstrip("/") + path


def token_url_for(geolocation: str) -> str:
    """Concur's token endpoint on one geolocation."""
    return geolocation.rstrip("/") + TOKEN_PATH


def fingerprint(secret: str) -> str:
    """A short one-way tag of a secret, safe to store and compare."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()[:16]


def refresh_delay_seconds(expires_in_seconds: float) -> float:
    """How long an access token is used before it is replaced: its lifetime less a margin.

    The margin is ``REFRESH_MARGIN_SECONDS`` but never more than half the lifetime, so even a
    short-lived token is used for a while.
    """
    lifetime = max(0.0, expires_in_seconds)
    return lifetime - min(REFRESH_MARGIN_SECONDS, lifetime / 2)


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def parse_grant(document: Any, now: float) -> Grant:
    """Read a token answer; ``ValueError`` when it holds no usable access token."""
    if not isinstance(document, dict):
        raise ValueError("token answer is not a JSON object")
    access = document.get("access_token")
    if not isinstance(access, str) or not access:
        raise ValueError("token answer has no access_token")
    expires_in = _number(document.get("expires_in"))
    refresh = document.get("refresh_token")
    refresh_expires = _number(document.get("refresh_expires_in"))
    refresh_at_ms: int | None = None
    if refresh_expires is not None:
        at = refresh_expires if refresh_expires > EPOCH_THRESHOLD_SECONDS else now + refresh_expires
        refresh_at_ms = int(at * 1000)
    geolocation = document.get("geolocation")
    return Grant(
        access_token=access,
        expires_in_seconds=3600.0 if expires_in is None else expires_in,
        refresh_token=refresh if isinstance(refresh, str) and refresh else None,
        refresh_expires_at_ms=refresh_at_ms,
        geolocation=geolocation.rstrip("/")
        if isinstance(geolocation, str) and geolocation.startswith(("https://", "http://"))
        else None,
    )


def parse_error(status: int, content: bytes) -> TokenEndpointError | None:
    """The error body of a refused token request, or None when the body is not one."""
    try:
        document = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(document, dict) or not ({"code", "error"} & set(document)):
        return None
    code = _number(document.get("code"))
    geolocation = document.get("geolocation")
    return TokenEndpointError(
        status,
        None if code is None else int(code),
        str(document.get("error") or "")[:100],
        str(document.get("error_description") or "")[:300],
        geolocation.rstrip("/")
        if isinstance(geolocation, str) and geolocation.startswith(("https://", "http://"))
        else None,
    )


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


class TokenState(Protocol):
    """Where an ``OAuthTokens`` keeps its refresh token: the default company's hash
    (``TokenStateStore``) or a registry company's (``worker.concur.companytokens``)."""

    def load(self) -> StoredState:
        """What is stored now (read under the refresh lock)."""
        ...

    def save(self, state: StoredState) -> None:
        """Store what the latest grant returned."""
        ...

    def unusable(self, why: str) -> NoReturn:
        """No refresh token works and no password grant can replace it: raise the error that
        says what an operator must do (a ``TokenUnavailable``)."""
        ...


class TokenStateStore:
    """The Redis hash of one client id's refresh token, its expiry and geolocation."""

    def __init__(self, redis: Redis, client_id: str, cipher: Cipher) -> None:
        self.redis = redis
        self.key = keys.oauth_state(client_id)
        self.cipher = cipher
        self._reseal_script = redis.register_script(RESEAL_SCRIPT)

    def load(self) -> StoredState:
        """What is stored; an unreadable refresh token is logged and treated as absent."""
        raw = {_text(k): _text(v) for k, v in self.redis.hgetall(self.key).items()}
        refresh: str | None = None
        if raw.get("refresh"):
            try:
                refresh = self.cipher.open(raw["refresh"])
            except ValueError as error:
                log.error("stored OAuth refresh token ignored: %s", error)
            add_runtime_secret(refresh)  # redacted from log lines and Sentry events from now on
            if refresh is not None and self.cipher.stale(raw["refresh"]):
                self._reseal(raw["refresh"], refresh)
        expires = raw.get("refresh_expires")
        return StoredState(
            refresh_token=refresh,
            refresh_expires_at_ms=int(expires) if expires and expires.isdigit() else None,
            geolocation=raw.get("geolocation") or None,
            seed=raw.get("seed") or None,
        )

    def _reseal(self, stored: str, refresh: str) -> None:
        # Plain (stored before a key was set) or under a retired key: seal it with the first
        # key, unless another process has stored a newer token meanwhile (compare and set).
        if self._reseal_script(keys=[self.key], args=[stored, self.cipher.seal(refresh)]):
            log.info("stored OAuth refresh token sealed again with the first encryption key")

    def save(self, state: StoredState) -> None:
        """Store the latest state (fields that are None are removed)."""
        fields = {
            "refresh": self.cipher.seal(state.refresh_token) if state.refresh_token else None,
            "refresh_expires": state.refresh_expires_at_ms,
            "geolocation": state.geolocation,
            "seed": state.seed,
            "updated": int(time.time() * 1000),
        }
        pipe = self.redis.pipeline(transaction=True)
        present: dict[Any, Any] = {
            name: value for name, value in fields.items() if value is not None
        }
        absent = [name for name, value in fields.items() if value is None]
        pipe.hset(self.key, mapping=present)
        if absent:
            pipe.hdel(self.key, *absent)
        pipe.execute()

    def unusable(self, why: str) -> NoReturn:
        """The default company's tokens are the settings': the operator must put new ones there."""
        raise TokenUnavailable(
            f"{why} and no company credentials are set: put a new one in "
            "NOTIFY_OAUTH_REFRESH_TOKEN, or set NOTIFY_OAUTH_COMPANY_ID and "
            "NOTIFY_OAUTH_COMPANY_AUTH_TOKEN"
        )


# What each ExchangeFailed.kind means for a token request (worker.concur.transport's tree).
_FAILED = {
    "timeout": "gave no whole answer within the deadline",
    "connect": "unreachable",
    "protocol": "broke off, or answered more than 64 KiB",
}
# Token requests are rare (one an hour per process, a few after a failure): a handful of
# connections is plenty.
_TOKEN_CONNECTIONS = 4


class TokenEndpoint:
    """Posts grants to Concur's token endpoint; follows a code-16 geolocation once."""

    def __init__(
        self,
        config: OAuthConfig,
        transport: CurlTransport | None = None,
        *,
        on_untrusted: Callable[[str, str], None] | None = None,
        connections: int = 0,
    ) -> None:
        """``connections``: of its own transport (0: a handful, enough for one company)."""
        self.config = config
        # Told (geolocation, where it came from) about a geolocation that is not followed.
        self.on_untrusted = on_untrusted
        self._owns_transport = transport is None
        self.transport = transport or CurlTransport(connections or _TOKEN_CONNECTIONS)

    def request(self, url: str, form: dict[str, str], deadline: float) -> tuple[Grant, str]:
        """Run one grant at ``url``; the grant and the URL that answered it.

        Raises ``TokenEndpointError`` for an error answer, ``TokenUnavailable`` when there was
        no usable answer at all.
        """
        try:
            return self._post(url, form, deadline), url
        except TokenEndpointError as error:
            moved = error.geolocation
            if error.code != CODE_WRONG_GEOLOCATION or not moved or token_url_for(moved) == url:
                raise
            if not trusted_geolocation(moved, self.config):
                if self.on_untrusted is not None:
                    self.on_untrusted(moved, "a code-16 error")
                raise
            log.warning("token endpoint: the company lives at %s; asking there", moved)
            there = token_url_for(moved)
            return self._post(there, form, deadline), there

    def _post(self, url: str, form: dict[str, str], deadline: float) -> Grant:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TokenUnavailable("no time left for the token request")
        exchange = Exchange(
            "POST",
            url,
            (
                "Accept: application/json",
                f"User-Agent: {USER_AGENT}",
                "Content-Type: application/x-www-form-urlencoded",
            ),
            urlencode(form).encode("ascii"),
            # The whole exchange, the answer's last byte included, within this one deadline.
            timeout_seconds=min(self.config.timeout_seconds, remaining),
            connect_timeout_seconds=min(self.config.connect_timeout_seconds, remaining),
        )
        try:
            answer = self.transport.request(exchange)
        except ExchangeFailed as failure:
            # The failure's detail is libcurl's sentence (what went wrong, bytes received); it
            # never holds the request's form, so no secret reaches the message.
            raise TokenUnavailable(
                f"token endpoint {url} {_FAILED.get(failure.kind, failure.kind)} after "
                f"{failure.elapsed_seconds:.1f} s ({failure.detail})"
            ) from None
        if answer.status >= 500 or answer.status == 429:
            raise TokenUnavailable(f"token endpoint {url} answered {answer.status}")
        if 200 <= answer.status < 300:
            try:
                return parse_grant(json.loads(answer.body), time.time())
            except ValueError as error:  # JSON errors name a position, never the text
                raise TokenUnavailable(f"token endpoint {url}: {error}") from None
        refused = parse_error(answer.status, answer.body)
        if refused is None:
            raise TokenUnavailable(f"token endpoint {url} answered {answer.status}")
        raise refused

    def close(self) -> None:
        """Close the connections (the transport's, when it is this endpoint's own)."""
        if self._owns_transport:
            self.transport.close()


def report_untrusted_geolocation(redis: Redis, geolocation: str, source: str) -> None:
    """Report a geolocation that is not followed: a warning and a counted metric."""
    log.warning(
        "Concur geolocation %r from %s not followed: not https on a Concur host "
        "(*.api.concursolutions.com, *.api.concurcdc.cn) nor listed in "
        "NOTIFY_OAUTH_EXTRA_GEOLOCATION_HOSTS; keeping the current one",
        geolocation[:200],
        source,
    )
    try:
        redis.hincrby(keys.STATS, GEOLOCATION_REFUSED_COUNTER, 1)
    except Exception:  # a metric must not turn a refused geolocation into a failed fetch
        log.warning("could not count the refused geolocation", exc_info=True)


@dataclass(frozen=True, slots=True)
class SharedToken:
    """An access token another process fetched (wall-clock times, ms)."""

    token: str
    expires_ms: int
    renew_ms: int
    geolocation: str


def shared_token_of(grant: Grant, geolocation: str, wall_ms: int) -> SharedToken:
    """A grant's access token as the fleet shares it, from ``wall_ms`` (when it was answered):
    used until ``refresh_delay_seconds`` of its lifetime, posted to ``geolocation`` (pure)."""
    return SharedToken(
        grant.access_token,
        wall_ms + int(grant.expires_in_seconds * 1000),
        wall_ms + int(refresh_delay_seconds(grant.expires_in_seconds) * 1000),
        geolocation,
    )


class AccessShare(Protocol):
    """Where a provider's fresh access tokens are shared with the fleet's other processes."""

    def load(self) -> SharedToken | None:
        """The token shared now and not yet due for renewal, if any."""
        ...

    def save(self, token: SharedToken) -> None:
        """Share a token just fetched."""
        ...


class _CoolingDown(TokenUnavailable):
    """A refresh failed moments ago (in any worker); this one is not tried yet."""


class OAuthTokens:
    """A ``TokenProvider`` for a Concur company token; see the module docstring."""

    def __init__(
        self,
        config: OAuthConfig,
        redis: Redis,
        *,
        on_geolocation: Callable[[str], None] | None = None,
        transport: CurlTransport | None = None,
        state: TokenState | None = None,
        lock_key: str | None = None,
        cooldown_key: str | None = None,
        endpoint: TokenEndpoint | None = None,
        share: AccessShare | None = None,
    ) -> None:
        """``state``, ``lock_key``, ``cooldown_key``: where the refresh token lives and the
        fleet's one-refresh-at-a-time lock; by default the client id's (the default company).
        ``endpoint``: a token endpoint shared with other providers (then not closed here).
        ``share``: where access tokens are shared with the fleet (None: this process's own)."""
        self.config = config
        self.redis = redis
        self.state: TokenState = state or TokenStateStore(
            redis, config.client_id, Cipher(config.encryption_key)
        )
        self._owns_endpoint = endpoint is None
        self.endpoint = endpoint or TokenEndpoint(config, transport, on_untrusted=self._untrusted)
        self.lock_key = lock_key or keys.oauth_lock(config.client_id)
        self.cooldown_key = cooldown_key or keys.oauth_cooldown(config.client_id)
        self._on_geolocation = on_geolocation
        self.share = share
        add_secret(config.client_secret, config.company_auth_token, config.initial_refresh_token)
        self._mutex = threading.Lock()
        self._access: str | None = None
        self._expires_at = 0.0  # monotonic: the token is refused after this
        self._renew_at = 0.0  # monotonic: a new token is fetched from this moment on
        self._geolocation: str | None = None

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        redis: Redis,
        *,
        on_geolocation: Callable[[str], None] | None = None,
    ) -> OAuthTokens:
        """The provider the settings describe."""
        return cls(OAuthConfig.from_settings(settings), redis, on_geolocation=on_geolocation)

    @property
    def geolocation(self) -> str | None:
        """The geolocation the last token came from."""
        return self._geolocation

    def fresh(self) -> str | None:
        """The access token when it is not yet due for renewal (no I/O); else None."""
        current = self._access
        return current if current is not None and time.monotonic() < self._renew_at else None

    def adopt(self, shared: SharedToken) -> bool:
        """Use a token another process fetched (read from the share by the caller), unless this
        process holds a fresh one or its geolocation may not be followed; whether it is used."""
        if self._checked(shared.geolocation, "a shared access token") is None:
            return False
        with self._mutex:
            if self.fresh() is not None:
                return False
            self._install(shared)
        return True

    def token(self, *, share_read: bool = False) -> str:
        """The access token to use now, fetching a new one when it is due.

        ``share_read``: the caller has just read the fleet's share for this provider and found
        nothing to adopt, so the fetch does not read it again before taking the lock (it still
        does once it holds it)."""
        now = time.monotonic()
        current = self._access
        if current is not None and now < self._renew_at:
            return current
        valid = current is not None and now < self._expires_at
        # While the old token is still valid, one thread renews it and the others keep using it.
        if not self._mutex.acquire(blocking=not valid):
            assert current is not None
            return current
        try:
            if self._access is not None and time.monotonic() < self._renew_at:
                return self._access
            try:
                return self._fetch(look_first=not share_read)
            except TokenUnavailable:
                if self._access is not None and time.monotonic() < self._expires_at:
                    return self._access
                raise
        finally:
            self._mutex.release()

    def refresh(self, refused: str) -> str:
        """A new access token after the API refused ``refused`` (a 401)."""
        with self._mutex:
            if self._access is not None and self._access != refused:
                return self._access  # another thread already replaced it
            self._access = None
            return self._fetch(refused)

    def close(self) -> None:
        """Close the token endpoint's connections (when the endpoint is this provider's own)."""
        if self._owns_endpoint:
            self.endpoint.close()

    def _untrusted(self, geolocation: str, source: str) -> None:
        """Report a geolocation that is not followed: a warning and a counted metric."""
        report_untrusted_geolocation(self.redis, geolocation, source)

    def _checked(self, geolocation: str | None, source: str) -> str | None:
        """``geolocation`` if it may be followed; else None (reported)."""
        if geolocation is None or trusted_geolocation(geolocation, self.config):
            return geolocation
        self._untrusted(geolocation, source)
        return None

    def _install(self, shared: SharedToken) -> None:
        """Use ``shared`` from now on (its wall-clock times turned monotonic)."""
        now, wall_ms = time.monotonic(), time.time() * 1000
        add_runtime_secret(shared.token)
        self._access = shared.token
        self._expires_at = now + (shared.expires_ms - wall_ms) / 1000
        self._renew_at = now + (shared.renew_ms - wall_ms) / 1000
        if shared.geolocation != self._geolocation:
            self._geolocation = shared.geolocation
            if self._on_geolocation is not None:
                self._on_geolocation(shared.geolocation)

    def _shared(self, refused: str | None) -> SharedToken | None:
        """The fleet's shared token, unless it is the one the API just refused (or none is
        shared, or it points where this process may not go)."""
        if self.share is None:
            return None
        found = self.share.load()
        if found is None or found.token == refused:
            return None
        if self._checked(found.geolocation, "a shared access token") is None:
            return None
        return found

    def _fetch(self, refused: str | None = None, *, look_first: bool = True) -> str:
        try:
            return self._fetch_under_lock(refused, look_first)
        except _CoolingDown:
            raise  # the failure itself was reported when it happened
        except TokenUnavailable as error:
            log.error("Concur token refresh failed: %s", error, exc_info=True)
            raise

    def _fetch_under_lock(self, refused: str | None, look_first: bool) -> str:
        shared = self._shared(refused) if look_first else None
        if shared is not None:
            self._install(shared)  # another process fetched it: no token request
            return shared.token
        cooldown = self.cooldown_key
        if self.redis.exists(cooldown):
            raise _CoolingDown("a token refresh failed moments ago; waiting before the next")
        deadline = time.monotonic() + self.config.fetch_budget_seconds
        # redis-py's lock (SET NX PX with a random token, released only by its holder), one
        # Lock object per fetch: the token is this fetch's own, so no thread releases another's.
        lock = self.redis.lock(
            self.lock_key,
            timeout=self.config.fetch_budget_seconds,
            sleep=LOCK_POLL_SECONDS,
            thread_local=False,
        )
        if not lock.acquire(blocking_timeout=self.config.fetch_budget_seconds):
            raise TokenUnavailable("another worker held the token refresh lock for too long")
        try:
            # The holder this process waited for has just shared what it fetched.
            shared = self._shared(refused)
            if shared is None:
                grant, geolocation = self._grant(deadline)
                shared = shared_token_of(grant, geolocation, int(time.time() * 1000))
                if self.share is not None:
                    # Before the lock is let go, so the processes waiting for it find it.
                    self.share.save(shared)
        except TokenUnavailable:
            self.redis.set(cooldown, "1", px=int(FAILURE_COOLDOWN_SECONDS * 1000))
            raise
        finally:
            # Expired meanwhile and taken by another: theirs now, nothing to release.
            with contextlib.suppress(LockError):
                lock.release()
        self._install(shared)
        return shared.token

    def _grant(self, deadline: float) -> tuple[Grant, str]:
        """Run the right grant while holding the lock and store what it returned."""
        stored = self.state.load()
        stored_geolocation = self._checked(stored.geolocation, "the state stored in Redis")
        config = self.config
        seed = fingerprint(config.initial_refresh_token) if config.initial_refresh_token else None
        refresh_token = stored.refresh_token
        if config.initial_refresh_token and stored.seed != seed:
            # A refresh token put in the settings that this store has not seen yet wins: it is
            # how an operator hands over new credentials. Once used, the stored one is used.
            refresh_token = config.initial_refresh_token
        expired = (
            stored.refresh_expires_at_ms is not None
            and stored.refresh_expires_at_ms <= time.time() * 1000
            and refresh_token == stored.refresh_token
        )
        geolocation = stored_geolocation or (
            geolocation_of(config.token_url) if config.token_url else config.geolocation
        )
        url = (
            config.token_url
            if config.token_url and not stored_geolocation
            else token_url_for(geolocation)
        )
        grant: Grant | None = None
        answered = url
        if refresh_token and not expired:
            try:
                form = grant_form(config, "refresh_token", refresh_token=refresh_token)
                grant, answered = self.endpoint.request(url, form, deadline)
            except TokenEndpointError as error:
                if error.code != CODE_BAD_REFRESH_TOKEN:
                    raise TokenUnavailable(f"refresh grant refused: {error}") from None
                log.warning("Concur refused the refresh token (code 108: bad or expired)")
                self.state.save(StoredState(None, None, stored_geolocation, seed))
        if grant is None:
            if not config.has_password_grant:
                self.state.unusable(
                    "the refresh token is bad or expired (Concur code 108)"
                    if refresh_token
                    else "there is no refresh token"
                )
            refresh_token = None
            try:
                form = grant_form(
                    config,
                    "password",
                    username=config.company_id or "",
                    password=config.company_auth_token or "",
                    credtype="authtoken",
                )
                grant, answered = self.endpoint.request(url, form, deadline)
            except TokenEndpointError as error:
                raise TokenUnavailable(f"password grant refused: {error}") from None
        # An answer naming a geolocation that may not be followed keeps the one that answered.
        # Tokens fetched at run time are secrets too: redacted wherever they would appear.
        add_runtime_secret(grant.access_token, grant.refresh_token)
        latest_geolocation = self._checked(grant.geolocation, "a token answer") or geolocation_of(
            answered
        )
        self.state.save(
            StoredState(
                refresh_token=grant.refresh_token or refresh_token,
                refresh_expires_at_ms=grant.refresh_expires_at_ms
                if grant.refresh_token or grant.refresh_expires_at_ms
                else stored.refresh_expires_at_ms,
                geolocation=latest_geolocation,
                # The configured token counts as used from now on, whichever grant ran.
                seed=seed,
            )
        )
        return grant, latest_geolocation
