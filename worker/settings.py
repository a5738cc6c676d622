"""The one settings object, read from the environment (prefix ``NOTIFY_``) or ``.env``.

Every setting is documented in docs/settings.md and ``.env.example``. A bad value stops
start-up with one line that names the setting (``SettingsError``), never a traceback.
"""

from __future__ import annotations

import functools
import ipaddress
import math
import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from worker.shapes.models import (
    BARE_KEY_PARTNER,
    DEFAULT_COMPANY,
    DEFAULT_PARTNER,
    is_company_id,
    is_partner_name,
)

ENV_PREFIX = "NOTIFY_"
US_BASE_URL = "https://us.api.concursolutions.com/notifications/v4"
API_PATH = "/notifications/v4"
# Concur's base hosts by geolocation name (developer docs, "Base URIs"); usg and the -impl
# hosts follow the same naming and are the best-known form, not confirmed from a response.
GEOLOCATIONS = {
    "us": "https://us.api.concursolutions.com",
    "us2": "https://us2.api.concursolutions.com",
    "emea": "https://emea.api.concursolutions.com",
    "eu": "https://emea.api.concursolutions.com",
    "eu2": "https://eu2.api.concursolutions.com",
    "cn": "https://cn.api.concurcdc.cn",
    "usg": "https://usg.api.concursolutions.com",
    "us-impl": "https://us-impl.api.concursolutions.com",
    "emea-impl": "https://emea-impl.api.concursolutions.com",
}

# The longest one attempt waits for rate-limit permits before the message is put back on the
# schedule instead (the lease covers it, so it is a constant rather than a setting).
RATE_LIMIT_MAX_WAIT_SECONDS = 5.0

CommaList = Annotated[list[str], NoDecode]
SecretList = Annotated[list[SecretStr], NoDecode]
# NOTIFY_PARTNER_COMPANIES's "any company of the registry".
ANY_COMPANY = "*"
Grants = Annotated[dict[str, tuple[str, ...]], NoDecode]
Expiries = Annotated[dict[str, float], NoDecode]
# NOTIFY_PARTNER_EXPIRY_SECONDS's "every partner not listed".
ANY_PARTNER = "*"
MAX_EXPIRY_SECONDS = 365 * 86_400
MIN_KEY_LENGTH = 16
# A key's strength, estimated as length x log2(distinct characters): 64 bits is what 16 random
# hex digits give; a repeated or patterned key ("aaaa...", "abab...") falls far below.
MIN_KEY_BITS = 64
MIN_KEY_DISTINCT = 8
_HOST_ENTRY = re.compile(r"(?:\*\.)?[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?(?::[0-9]{1,5})?")


class SettingsError(Exception):
    """A setting has a bad value; the message is one line naming the variable."""


class Settings(BaseSettings):
    """All configuration of the worker, producer, CLI and HTTP service."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
    )

    redis_url: str = "redis://localhost:6379/0"
    # Redis Sentinel (docs/scaling.md): when set, the broker and every store find the master
    # through these sentinels; NOTIFY_REDIS_URL then gives only the database and password.
    redis_sentinels: CommaList = []
    redis_sentinel_master: str | None = None
    redis_sentinel_password: SecretStr | None = None
    # Replicas that must hold a new message's record before it counts as accepted (Redis WAIT);
    # unset: 1 with Sentinel, 0 without.
    redis_wait_replicas: int | None = Field(None, ge=0, le=10)
    # How long a worker or producer waits out a Redis outage (a restart, a failover), command by
    # command, before the command fails (worker.rules.retries.RedisPatience).
    redis_patience_seconds: float = Field(30.0, ge=1, le=600)
    # The Celery broker; unset: the Redis above. amqp:// is RabbitMQ (quorum queues).
    broker_url: str | None = None
    queue_name: str = Field("notifications", min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")

    api_base_url: str = US_BASE_URL
    api_token: SecretStr | None = None

    # Concur company OAuth (worker/concur/oauth.py); when set, these win over NOTIFY_API_TOKEN.
    oauth_client_id: str | None = None
    oauth_client_secret: SecretStr | None = None
    oauth_company_id: str | None = None
    oauth_company_auth_token: SecretStr | None = None
    oauth_refresh_token: SecretStr | None = None
    oauth_token_url: str | None = None
    # Hosts besides Concur's own (*.api.concursolutions.com, *.api.concurcdc.cn) that a
    # geolocation in a token answer may name: "host", "host:port" or "*.suffix" entries.
    oauth_extra_geolocation_hosts: CommaList = []
    token_encryption_key: SecretStr | None = None
    # Plain http:// to a host other than this machine would carry the tokens in clear text.
    allow_insecure_http: bool = False

    allowed_templates: CommaList = []
    allowed_url_domains: CommaList = []

    max_attempts: int = Field(8, ge=1, le=100)
    backoff_base_seconds: float = Field(60.0, ge=0)
    backoff_max_seconds: float = Field(300.0, ge=0)
    backoff_jitter_ratio: float = Field(0.2, ge=0, le=1)
    retry_after_max_seconds: float = Field(3600.0, ge=0)

    http_connect_timeout_seconds: float = Field(5.0, gt=0)
    http_timeout_seconds: float = Field(30.0, gt=0)
    # Connections per worker process; posts beyond it wait inside the attempt's deadline.
    http_max_connections: int = Field(512, ge=1, le=10_000)

    worker_concurrency: int = Field(64, ge=1, le=1024)
    worker_prefetch_multiplier: int = Field(2, ge=1)
    batch_size: int = Field(20, ge=1, le=500)
    # Posts one worker process has in flight at most (worker/limits/inflight.py): what a SIGKILL
    # of it may cost in double posts. 0: no cap (up to concurrency x batch size).
    max_in_flight: int = Field(512, ge=0, le=100_000)
    visibility_timeout_seconds: int = Field(3600, ge=10)
    retry_poll_interval_seconds: float = Field(1.0, gt=0, le=60)
    status_ttl_seconds: int = Field(24 * 3600, ge=60)
    # How long an explicit idempotency key (Idempotency-Key, idempotency_key=) is remembered
    # after its first use; unset: 24 h, or the status TTL when that is shorter (a key outliving
    # its message's record could not say how the message ended).
    idempotency_window_seconds: int | None = Field(None, ge=60, le=30 * 86_400)
    # A deadline for the messages of a partner that give none: "acme=3600,default=600,*=86400"
    # (seconds after intake; * = every partner not listed). Empty: no deadline unless given.
    partner_expiry_seconds: Expiries = {}

    # Fair share (worker/delivery/dispatcher.py): "fair" keeps new messages in lanes per
    # (company, partner) that each worker's dispatcher feeds round-robin into a shallow queue;
    # "fifo" publishes them at intake, in arrival order (as before issue 21).
    # fifo is the default: under fair dispatch the workers publish what the producer published
    # before, so a one-company drain runs 8-16 % slower (docs/performance.md), which a
    # deployment with one company pays for nothing.
    dispatch: Literal["fair", "fifo"] = "fifo"
    # Messages dispatched and not yet claimed, per live worker process; 0: chosen from the batch
    # size, concurrency and the cap on posts in flight (``dispatch_depth_per_worker``).
    dispatch_depth: int = Field(0, ge=0, le=100_000)
    # A dispatched message not claimed within this time is published again by the mover (the
    # copy that arrives second is fenced off). The fair queue is shallow, so a minute outlasts a
    # normal wait in it; it bounds what a dispatcher that could not publish (a partition, a
    # crash) delays. With a low NOTIFY_RATE_LIMIT_PER_SECOND, keep it above depth / rate.
    dispatch_grace_seconds: float = Field(60.0, ge=1, le=86_400)

    # The durable history in PostgreSQL (worker/store/history.py); unset: none beyond the hot
    # window.
    history_url: SecretStr | None = None
    history_days: int = Field(30, ge=1, le=3650)
    history_batch_size: int = Field(1000, ge=1, le=50_000)
    # An outbox batch a writer read and did not acknowledge (it died) is taken over after this.
    history_claim_idle_seconds: float = Field(60.0, gt=0, le=86400)
    # Each worker's writer is a process of its own at this niceness (worker/store/
    # history_process.py): under a burst that uses up the CPU, the deliveries come first and the
    # outbox waits in Redis.
    history_writer_nice: int = Field(10, ge=0, le=19)

    # The global rate limit (worker/limits/ratelimit.py), shared by every worker through Redis.
    rate_limit_per_second: float = Field(0.0, ge=0, le=100_000)  # 0: off
    # Posts allowed at once after an idle spell; 1 (the default) paces strictly, so no second
    # sees more than rate + 1 posts start.
    rate_limit_burst: int = Field(1, ge=1, le=100_000)
    rate_limit_penalty_seconds: float = Field(60.0, ge=0, le=3600)  # half pace after a 429

    # Many companies (worker/concur/companytokens.py): access tokens kept per worker process for at
    # most this many registry companies (least recently used dropped: it fetches again).
    company_token_cache_size: int = Field(1000, ge=1, le=1_000_000)
    # How long a company's messages wait for an operator to reconnect it (Concur refused its
    # refresh token) before they become dead letters company_disconnected: a request token lives
    # 24 h, so a day.
    company_reconnect_grace_seconds: float = Field(86_400.0, ge=0, le=30 * 86_400)
    # A pace per registry company besides the global one (GCRA per company); 0: off.
    company_rate_limit_per_second: float = Field(0.0, ge=0, le=100_000)

    # The fleet-wide circuit breaker (worker/limits/breaker.py): when the API is failing, no worker
    # posts, and waiting messages keep their attempts.
    breaker_enabled: bool = True
    breaker_window_seconds: int = Field(60, ge=1, le=3600)
    breaker_min_calls: int = Field(20, ge=1, le=1_000_000)
    breaker_failure_ratio: float = Field(0.5, gt=0, le=1)
    breaker_open_seconds: float = Field(30.0, gt=0, le=3600)  # doubles while probes fail
    breaker_max_open_seconds: float = Field(600.0, gt=0, le=86_400)

    # The HTTP service (`notify api`): partner keys for the gateway, operator keys for the
    # failed-notification endpoints. Both are bearer secrets, never logged or echoed.
    gateway_keys: SecretList = []
    operator_keys: SecretList = []
    service_host: str = Field("127.0.0.1", min_length=1)
    service_port: int = Field(8000, ge=1, le=65535)
    service_max_body_bytes: int = Field(65536, ge=1024, le=16 * 1024 * 1024)
    # The bulk route (POST /messages/batch, up to 500 messages) reads bodies up to this size.
    service_max_batch_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    service_public_url: str | None = None
    # Slow and greedy clients (worker/front/httpserver.py), per `notify api` process: the request
    # head must arrive within HEADER_TIMEOUT (from the connection, or from its first byte on a
    # kept-alive one) and be at most MAX_HEADER_BYTES; the body within BODY_TIMEOUT once the
    # head is in; an idle kept-alive connection closes after KEEP_ALIVE; beyond MAX_CONNECTIONS
    # a new connection is answered 503 and closed.
    service_header_timeout_seconds: float = Field(10.0, gt=0, le=300)
    service_body_timeout_seconds: float = Field(30.0, gt=0, le=600)
    service_keep_alive_seconds: int = Field(5, ge=1, le=300)
    service_max_header_bytes: int = Field(16 * 1024, ge=1024, le=1024 * 1024)
    service_max_connections: int = Field(512, ge=2, le=100_000)
    # `notify api --workers N`: uvicorn's supervisor pings each child and kills one that does not
    # answer (nor, at start, become ready) within this. uvicorn's 5 s killed every child of a
    # loaded machine, whose pong thread waited for the GIL behind the event loop.
    service_worker_healthcheck_seconds: int = Field(30, ge=1, le=600)
    # Proxies whose X-Forwarded-For / X-Forwarded-Proto are believed (uvicorn's
    # forwarded_allow_ips): the client address the failure limits count, and https for cookies.
    service_trusted_proxies: CommaList = ["127.0.0.1"]
    # The console's sessions (worker/front/sessions.py): closed after this long unused.
    console_idle_seconds: int = Field(1800, ge=10, le=8 * 3600)
    # Failed key checks (console logins, API bearer keys) counted in Redis over a window, per
    # client address and over all addresses; past either limit every key check answers 429
    # until the window ends (worker/front/guard.py).
    auth_failure_window_seconds: int = Field(300, ge=1, le=86_400)
    auth_failures_per_address: int = Field(20, ge=1, le=1_000_000)
    auth_failures_total: int = Field(500, ge=1, le=10_000_000)
    # The companies each gateway partner may name (Concur-Company-Id): "acme=<uuid>|<uuid>,
    # globex=*" (* = any company of the registry). A partner not listed: the default company only.
    partner_companies: Grants = {}

    # Outcome webhooks per partner (docs/webhooks.md): a partner endpoint on a private,
    # loopback or CGNAT address (and plain http:// to loopback) is refused unless this is on (a
    # developer's local receiver; `notify dev` sets it). Link-local and metadata addresses are
    # refused always.
    webhook_allow_private: bool = False
    # After `notify partners webhook rotate`, events are signed with the old secret too for this
    # long, so a partner can switch secrets without losing one.
    webhook_rotation_grace_seconds: int = Field(24 * 3600, ge=0, le=30 * 86_400)
    # One deadline for a webhook post: resolving, connecting, sending and reading the answer.
    webhook_timeout_seconds: float = Field(10.0, gt=0, le=120)
    # Webhook posts one worker process makes at once; the rest wait on the schedule, so slow
    # partner endpoints never hold more than this many of the threads that post to Concur.
    webhook_concurrency: int = Field(2, ge=1, le=64)

    log_format: Literal["json", "text"] = "json"
    # Unset: the worker follows celery's --loglevel, the other services log INFO.
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] | None = None

    sentry_dsn: SecretStr | None = None
    sentry_environment: str = "production"
    sentry_traces_sample_rate: float = Field(0.0, ge=0, le=1)

    flower_basic_auth: SecretStr | None = None
    flower_cookie_secret: SecretStr | None = None
    flower_port: int = Field(5555, ge=1, le=65535)
    # Flower speaks plain HTTP: this machine only unless opened on purpose (a container sets
    # 0.0.0.0, its port published to the host's loopback).
    flower_address: str = Field("127.0.0.1", min_length=1)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        if isinstance(value, str):
            return value.strip().upper() or None
        return value

    @field_validator("flower_basic_auth")
    @classmethod
    def _user_colon_password(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and value.get_secret_value():
            for pair in value.get_secret_value().split(","):
                user, colon, password = pair.partition(":")
                if not (user and colon and password):
                    raise ValueError("must be user:password (several: comma-separated)")
        return value

    @field_validator(
        "allowed_templates",
        "allowed_url_domains",
        "oauth_extra_geolocation_hosts",
        "service_trusted_proxies",
        mode="before",
    )
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("oauth_extra_geolocation_hosts")
    @classmethod
    def _geolocation_hosts(cls, value: list[str]) -> list[str]:
        for entry in value:
            if not _HOST_ENTRY.fullmatch(entry.lower()):
                raise ValueError(
                    f"{entry!r} is not a host entry: host, host:port or *.suffix[:port], "
                    "without a scheme"
                )
        return [entry.lower() for entry in value]

    @field_validator("gateway_keys", "operator_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        for key in value if isinstance(value, list) else []:
            text = key.get_secret_value() if isinstance(key, SecretStr) else str(key)
            printable = text.isascii() and text.isprintable() and " " not in text
            if len(text) < MIN_KEY_LENGTH or not printable:
                # Never quote the key itself: this message is printed.
                raise ValueError(
                    f"each key must be at least {MIN_KEY_LENGTH} printable ASCII characters, "
                    "no spaces"
                )
            # A gateway entry's name is not secret: only its key part counts.
            secret = split_partner_key(text)[1] if info.field_name == "gateway_keys" else text
            weak = key_weakness(secret)
            if weak:
                raise ValueError(weak)
        return value

    @field_validator("gateway_keys")
    @classmethod
    def _partner_names(cls, value: list[SecretStr]) -> list[SecretStr]:
        seen: dict[str, str] = {}
        for entry in value:
            partner, key = split_partner_key(entry.get_secret_value())
            if seen.setdefault(key, partner) != partner:
                # Never quote the key; the partner names are not secret.
                raise ValueError(
                    f"one key is given to two partners ({seen[key]!r} and {partner!r}): "
                    "a key must name one partner"
                )
        return value

    @property
    def gateway_partners(self) -> tuple[tuple[str, SecretStr], ...]:
        """``(partner name, key)`` for each ``NOTIFY_GATEWAY_KEYS`` entry (bare: ``gateway``)."""
        pairs = []
        for entry in self.gateway_keys:
            partner, key = split_partner_key(entry.get_secret_value())
            pairs.append((partner, SecretStr(key)))
        return tuple(pairs)

    @field_validator("partner_companies", mode="before")
    @classmethod
    def _company_grants(cls, value: Any) -> Any:
        if isinstance(value, dict):  # given in code: checked as the variable's text would be
            value = ",".join(f"{name}={'|'.join(ids)}" for name, ids in value.items())
        return parse_partner_companies(value) if isinstance(value, str) else value

    @field_validator("partner_expiry_seconds", mode="before")
    @classmethod
    def _partner_expiry(cls, value: Any) -> Any:
        if isinstance(value, dict):  # given in code: checked as the variable's text would be
            value = ",".join(f"{name}={seconds}" for name, seconds in value.items())
        return parse_partner_expiry(value) if isinstance(value, str) else value

    @property
    def idempotency_window(self) -> int:
        """How long an explicit idempotency key is remembered (seconds)."""
        if self.idempotency_window_seconds is not None:
            return self.idempotency_window_seconds
        return min(24 * 3600, self.status_ttl_seconds)

    @field_validator("service_public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        if not value.startswith(("https://", "http://")):
            raise ValueError("must be an http(s) URL")
        return value.rstrip("/")

    @field_validator("redis_sentinels", mode="before")
    @classmethod
    def _sentinel_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        for entry in value if isinstance(value, list) else []:
            host, colon, port = str(entry).rpartition(":")
            if not (host and colon and port.isdigit() and 0 < int(port) < 65536):
                raise ValueError(f"{entry!r} is not host:port")
        return value

    @field_validator("redis_sentinel_master", mode="before")
    @classmethod
    def _blank_master_is_unset(cls, value: Any) -> Any:
        return value.strip() or None if isinstance(value, str) else value

    @field_validator("broker_url")
    @classmethod
    def _broker_scheme(cls, value: str | None) -> str | None:
        if not value or not value.strip():
            return None
        schemes = ("redis://", "rediss://", "amqp://", "amqps://", "pyamqp://")
        if not value.startswith(schemes):
            raise ValueError("must start with redis://, rediss://, amqp:// or amqps://")
        return value.strip()

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @field_validator("api_base_url")
    @classmethod
    def _api_url(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if value.lower() in GEOLOCATIONS:
            return GEOLOCATIONS[value.lower()] + API_PATH
        if not value.startswith(("https://", "http://")):
            raise ValueError(
                "must be an http(s) URL or a geolocation name (" + ", ".join(GEOLOCATIONS) + ")"
            )
        return value

    @field_validator("oauth_token_url")
    @classmethod
    def _token_url(cls, value: str | None) -> str | None:
        if not value or not value.strip():
            return None
        if not value.startswith(("https://", "http://")):
            raise ValueError("must be an http(s) URL")
        return value.strip()

    @field_validator("oauth_client_id", "oauth_company_id", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        return value.strip() or None if isinstance(value, str) else value

    @field_validator(
        "oauth_client_secret", "oauth_company_auth_token", "oauth_refresh_token", mode="before"
    )
    @classmethod
    def _blank_secret_is_unset(cls, value: Any) -> Any:
        return value or None if isinstance(value, str) else value

    @field_validator("token_encryption_key", mode="before")
    @classmethod
    def _fernet_key(cls, value: Any) -> Any:
        # Several comma-separated keys rotate: the first encrypts, every one decrypts.
        if isinstance(value, str) and value.strip():
            from cryptography.fernet import Fernet

            keys = [part.strip() for part in value.split(",") if part.strip()]
            for number, key in enumerate(keys, 1):
                try:
                    Fernet(key.encode())
                except (ValueError, TypeError):
                    # Never quote the key: this message is printed.
                    raise ValueError(
                        f"key {number} of {len(keys)} is not a Fernet key (URL-safe base64 of "
                        "32 bytes); make one with `python -c 'from cryptography.fernet import "
                        "Fernet; print(Fernet.generate_key().decode())'`"
                    ) from None
            return ",".join(keys)
        return None if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.backoff_max_seconds < self.backoff_base_seconds:
            raise ValueError(
                f"{ENV_PREFIX}BACKOFF_MAX_SECONDS ({self.backoff_max_seconds}) is below "
                f"{ENV_PREFIX}BACKOFF_BASE_SECONDS ({self.backoff_base_seconds})"
            )
        if self.breaker_max_open_seconds < self.breaker_open_seconds:
            raise ValueError(
                f"{ENV_PREFIX}BREAKER_MAX_OPEN_SECONDS ({self.breaker_max_open_seconds}) is below "
                f"{ENV_PREFIX}BREAKER_OPEN_SECONDS ({self.breaker_open_seconds})"
            )
        if self.visibility_timeout_seconds <= self.inflight_lease_seconds:
            raise ValueError(
                f"{ENV_PREFIX}VISIBILITY_TIMEOUT_SECONDS ({self.visibility_timeout_seconds}) must "
                f"exceed the longest attempt ({self.inflight_lease_seconds:.0f} s, from the HTTP "
                "timeouts), or a slow attempt would be handed to a second worker"
            )
        if self.redis_sentinels and not self.redis_sentinel_master:
            raise ValueError(
                f"{ENV_PREFIX}REDIS_SENTINEL_MASTER: required with {ENV_PREFIX}REDIS_SENTINELS"
            )
        if (
            self.idempotency_window_seconds is not None
            and self.idempotency_window_seconds > self.status_ttl_seconds
        ):
            raise ValueError(
                f"{ENV_PREFIX}IDEMPOTENCY_WINDOW_SECONDS ({self.idempotency_window_seconds}) "
                f"exceeds {ENV_PREFIX}STATUS_TTL_SECONDS ({self.status_ttl_seconds}): a key "
                "would outlive its message's record, and a repeat could not be told how it ended"
            )
        self._check_oauth()
        self._check_plain_http()
        self._check_key_roles()
        return self

    def _check_key_roles(self) -> None:
        # A partner's key that is also an operator key makes that partner an operator: every
        # partner's messages, replay, delete. Name the partner, never the key.
        operator = {key.get_secret_value() for key in self.operator_keys}
        shared = sorted(
            partner for partner, key in self.gateway_partners if key.get_secret_value() in operator
        )
        if shared:
            raise ValueError(
                f"{ENV_PREFIX}OPERATOR_KEYS: a key of {ENV_PREFIX}GATEWAY_KEYS is an operator key "
                f"too (partner {', '.join(repr(p) for p in shared)}); that partner would be an "
                "operator: give operators keys of their own"
            )

    def _check_plain_http(self) -> None:
        if self.allow_insecure_http:
            return
        for name, url in (
            ("API_BASE_URL", self.api_base_url),
            ("OAUTH_TOKEN_URL", self.oauth_token_url),
        ):
            if url is not None and url.lower().startswith("http://") and not is_loopback_url(url):
                raise ValueError(
                    f"{ENV_PREFIX}{name}: http:// to a host other than this machine would send "
                    f"the Concur tokens in clear text; use https://, or set "
                    f"{ENV_PREFIX}ALLOW_INSECURE_HTTP=true"
                )

    def _check_oauth(self) -> None:
        p = ENV_PREFIX + "OAUTH_"
        if not self.uses_oauth:
            if self.oauth_client_secret or self.oauth_company_id or self.oauth_refresh_token:
                raise ValueError(f"{p}CLIENT_ID: not set, but other {p}* settings are")
            return
        if self.oauth_client_secret is None:
            raise ValueError(f"{p}CLIENT_SECRET: required with {p}CLIENT_ID")
        if (self.oauth_company_id is None) != (self.oauth_company_auth_token is None):
            missing = "COMPANY_ID" if self.oauth_company_id is None else "COMPANY_AUTH_TOKEN"
            raise ValueError(f"{p}{missing}: required with the other company setting")
        # Client credentials alone are valid: they connect the companies of the registry
        # (`notify companies connect`, issue 21); company credentials or a refresh token besides
        # them make the OAuth company the default one.
        if self.token_encryption_key is None:
            # The refresh token (a year of access to the company) is kept in Redis: never in
            # clear text. `notify dev` makes a key and writes it to .env; nothing else does.
            raise ValueError(
                f"{ENV_PREFIX}TOKEN_ENCRYPTION_KEY: required with {p}CLIENT_ID (the refresh token "
                "is stored in Redis, encrypted with it); make one with `python -c 'from "
                "cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'`"
            )

    @property
    def inflight_lease_seconds(self) -> float:
        """How long a claimed message belongs to one worker before another may take it over.

        Covers the worst attempt: two posts (a 401 is retried once with a fresh token), each
        bounded by the connect and read timeouts, plus a margin for Redis and scheduling, plus
        the longest wait for a rate-limit permit when the limit is on.
        """
        rate_wait = RATE_LIMIT_MAX_WAIT_SECONDS if self.rate_limit_per_second > 0 else 0.0
        # With OAuth an attempt may also fetch a token twice (before the post, after a 401).
        token_wait = 2 * self.token_fetch_budget_seconds if self.uses_oauth else 0.0
        return (
            2 * (self.http_connect_timeout_seconds + self.http_timeout_seconds)
            + 10
            + rate_wait
            + token_wait
        )

    @property
    def token_fetch_budget_seconds(self) -> float:
        """The longest one OAuth token fetch may take, waiting for the lock included."""
        return 2 * (self.http_connect_timeout_seconds + self.http_timeout_seconds)

    @property
    def uses_sentinel(self) -> bool:
        """True when the Redis master is found through Sentinel."""
        return bool(self.redis_sentinels)

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """The sentinels as (host, port) pairs."""
        pairs = (entry.rpartition(":") for entry in self.redis_sentinels)
        return [(host.strip("[]"), int(port)) for host, _, port in pairs]

    @property
    def wait_replicas(self) -> int:
        """Replicas a new message's record must reach before it is accepted (0: no WAIT)."""
        if self.redis_wait_replicas is not None:
            return self.redis_wait_replicas
        return 1 if self.uses_sentinel else 0

    @property
    def celery_broker_url(self) -> str:
        """The broker URL Celery uses: NOTIFY_BROKER_URL, the sentinels, or NOTIFY_REDIS_URL."""
        if self.broker_url:
            return self.broker_url
        if not self.uses_sentinel:
            return self.redis_url
        # kombu's sentinel:// transport: the Redis password and database come from the URL.
        parts = urlsplit(self.redis_url)
        auth = f":{parts.password}@" if parts.password else ""
        if parts.username and parts.password:
            auth = f"{parts.username}:{parts.password}@"
        db = parts.path.lstrip("/") or "0"
        return ";".join(f"sentinel://{auth}{entry}/{db}" for entry in self.redis_sentinels)

    @property
    def broker_is_amqp(self) -> bool:
        """True when the broker is RabbitMQ."""
        return self.celery_broker_url.startswith(("amqp://", "amqps://", "pyamqp://"))

    @property
    def uses_oauth(self) -> bool:
        """True when Concur OAuth client credentials are configured."""
        return self.oauth_client_id is not None

    @property
    def dispatch_depth_per_worker(self) -> int:
        """``NOTIFY_DISPATCH_DEPTH``, or when 0, enough to keep a worker process's posts going:
        half a batch per thread, but no more than half the cap on posts in flight
        (``NOTIFY_MAX_IN_FLIGHT``) when there is one (docs/scaling.md, "Fair share").

        Past the cap a dispatched task only waits in the process for slots, and every message
        of another company dispatched after it waits behind it: deeper posts no faster there.
        """
        if self.dispatch_depth:
            return self.dispatch_depth
        depth = self.batch_size * self.worker_concurrency // 2
        if self.max_in_flight:
            depth = min(depth, self.max_in_flight // 2)
        return max(self.batch_size, depth)

    @property
    def has_oauth_company(self) -> bool:
        """True when the OAuth settings name a company of their own (company credentials or a
        refresh token): it is the default company. Client credentials alone serve only the
        company registry."""
        return self.uses_oauth and (
            self.oauth_company_id is not None or self.oauth_refresh_token is not None
        )

    @property
    def uses_sandbox(self) -> bool:
        """True when no Concur credential is configured (posts go to the local sandbox)."""
        return self.api_token is None and not self.uses_oauth


def split_partner_key(entry: str) -> tuple[str, str]:
    """``name:key`` as ``(name, key)``; a bare key (no ``:``) is partner ``gateway``'s.

    Raises ``ValueError`` (never quoting the key) when the name is not a partner name, or is
    ``default``: that is the partner of unkeyed producers (``notify send``), which no key names.
    """
    name, colon, key = entry.partition(":")
    if not colon:
        return BARE_KEY_PARTNER, entry
    if not is_partner_name(name):
        raise ValueError(
            f"each entry is name:key or a bare key (partner {BARE_KEY_PARTNER!r}, no ':' in it); "
            "a name is 1-64 lower-case letters, digits, '_', '.' or '-', starting with a letter "
            "or digit"
        )
    if name == DEFAULT_PARTNER:
        raise ValueError(
            f"partner {DEFAULT_PARTNER!r} is the one of unkeyed producers (notify send, "
            "tasks.enqueue); a key must name another partner"
        )
    if len(key) < MIN_KEY_LENGTH:
        raise ValueError(f"the key of partner {name!r} is shorter than {MIN_KEY_LENGTH} characters")
    return name, key


def key_bits(key: str) -> float:
    """A key's strength estimate in bits: its length times log2 of its distinct characters.

    An upper bound for a random key and far above the truth for a word; it catches what is
    plainly not random (one character repeated, a short cycle), not every poor choice.
    """
    distinct = len(set(key))
    return len(key) * math.log2(distinct) if distinct > 1 else 0.0


def key_weakness(key: str) -> str | None:
    """Why ``key`` is too weak to be a bearer secret, or None (the message never quotes it)."""
    if len(set(key)) < MIN_KEY_DISTINCT or key_bits(key) < MIN_KEY_BITS:
        return (
            f"a key has too little entropy: it needs at least {MIN_KEY_DISTINCT} distinct "
            f"characters and length x log2(distinct characters) >= {MIN_KEY_BITS}; make one "
            "with `python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
        )
    return None


def parse_partner_companies(text: str) -> dict[str, tuple[str, ...]]:
    """``NOTIFY_PARTNER_COMPANIES`` (``acme=<uuid>|<uuid>,globex=*``) as partner -> company ids
    (``("*",)``: any company of the registry); ``ValueError`` naming the entry that is not one.

    The default company is every partner's already, so it is not listed; a partner is listed
    once; ``*`` stands alone.
    """
    grants: dict[str, tuple[str, ...]] = {}
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        name, equals, listed = (part.strip() for part in entry.partition("="))
        if not equals or not is_partner_name(name):
            raise ValueError(
                f"{entry!r} is not partner=companies (like acme=<company uuid>|<company uuid> "
                f"or globex={ANY_COMPANY}); a partner is named as in {ENV_PREFIX}GATEWAY_KEYS"
            )
        if name == DEFAULT_PARTNER:
            raise ValueError(
                f"partner {DEFAULT_PARTNER!r} is the one of unkeyed producers (notify send, "
                "tasks.enqueue), which may name any company of the registry: grant keyed "
                "partners only"
            )
        if name in grants:
            raise ValueError(f"partner {name!r} is listed twice: list its companies once")
        companies = tuple(company.strip() for company in listed.split("|"))
        if companies == (ANY_COMPANY,):
            grants[name] = companies
            continue
        for company in companies:
            if company == DEFAULT_COMPANY:
                raise ValueError(
                    f"partner {name!r}: every partner may send to the default company; list "
                    "only companies of the registry"
                )
            if not is_company_id(company):
                raise ValueError(
                    f"partner {name!r}: {company!r} is not a company id (the company's UUID in "
                    f"lower case), or {ANY_COMPANY!r} alone for any company of the registry"
                )
        grants[name] = tuple(dict.fromkeys(companies))
    return grants


def parse_partner_expiry(text: str) -> dict[str, float]:
    """``NOTIFY_PARTNER_EXPIRY_SECONDS`` (``acme=3600,default=600,*=86400``) as partner ->
    seconds (``*``: every partner not listed); ``ValueError`` naming the entry that is not one."""
    expiry: dict[str, float] = {}
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        name, equals, seconds = (part.strip() for part in entry.partition("="))
        if not equals or not (name == ANY_PARTNER or is_partner_name(name)):
            raise ValueError(
                f"{entry!r} is not partner=seconds (like acme=3600, or {ANY_PARTNER}=86400 for "
                "every partner not listed)"
            )
        try:
            value = float(seconds)
        except ValueError:
            value = -1.0
        if not 1 <= value <= MAX_EXPIRY_SECONDS:
            raise ValueError(
                f"partner {name!r}: {seconds!r} is not a number of seconds 1..{MAX_EXPIRY_SECONDS}"
            )
        if name in expiry:
            raise ValueError(f"partner {name!r} is listed twice")
        expiry[name] = value
    return expiry


_URL_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^/@\s:]*):[^/@\s]*@")


def mask_url_passwords(text: str) -> str:
    """``text`` with the password of every URL in it replaced (``redis://u:***@host``)."""
    return _URL_PASSWORD.sub(r"\1:***@", text)


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (a URL's host name, without brackets) is this machine."""
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback_url(url: str) -> bool:
    """Whether ``url``'s host is this machine (127.0.0.0/8, ::1, localhost)."""
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return False
    return host is not None and is_loopback_host(host)


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "__root__"]
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if not loc:
        # Cross-field checks name their variables themselves.
        text = message if message.startswith(ENV_PREFIX) else f"invalid settings: {message}"
        return mask_url_passwords(text)
    name = ENV_PREFIX + loc[0].upper()
    value = first.get("input")
    secret = any(word in name for word in ("TOKEN", "DSN", "AUTH", "SECRET", "KEY", "PASSWORD"))
    shown = "" if isinstance(value, dict) or secret else f" (got {value!r})"
    # A URL's password (NOTIFY_REDIS_URL's, say) is never printed, whatever the setting.
    return mask_url_passwords(f"{name}: {message}{shown}")


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment and ``.env``; raise ``SettingsError`` on a bad value."""
    try:
        return Settings(**overrides)
    except ValidationError as error:
        raise SettingsError(_describe(error)) from None


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()
