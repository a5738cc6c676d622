"""The one settings object, read from the environment (prefix ``NOTIFY_``) or ``.env``.

Every setting is documented in README.md and ``.env.example``. A bad value stops start-up with
one line that names the setting (``SettingsError``), never a traceback.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "NOTIFY_"
US_BASE_URL = "https://us.api.concursolutions.com/notifications/v4"

CommaList = Annotated[list[str], NoDecode]
SecretList = Annotated[list[SecretStr], NoDecode]
MIN_KEY_LENGTH = 16


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
    queue_name: str = Field("notifications", min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")

    api_base_url: str = US_BASE_URL
    api_token: SecretStr | None = None

    allowed_templates: CommaList = []
    allowed_url_domains: CommaList = []

    max_attempts: int = Field(8, ge=1, le=100)
    backoff_base_seconds: float = Field(60.0, ge=0)
    backoff_max_seconds: float = Field(300.0, ge=0)
    backoff_jitter_ratio: float = Field(0.2, ge=0, le=1)
    retry_after_max_seconds: float = Field(3600.0, ge=0)

    http_connect_timeout_seconds: float = Field(5.0, gt=0)
    http_timeout_seconds: float = Field(30.0, gt=0)
    http_max_connections: int = Field(100, ge=1)

    worker_concurrency: int = Field(64, ge=1, le=1024)
    worker_prefetch_multiplier: int = Field(2, ge=1)
    visibility_timeout_seconds: int = Field(3600, ge=10)
    retry_poll_interval_seconds: float = Field(1.0, gt=0, le=60)
    status_ttl_seconds: int = Field(7 * 24 * 3600, ge=60)

    # The HTTP service (`notify api`): partner keys for the gateway, operator keys for the
    # failed-notification endpoints. Both are bearer secrets, never logged or echoed.
    gateway_keys: SecretList = []
    operator_keys: SecretList = []
    service_host: str = Field("127.0.0.1", min_length=1)
    service_port: int = Field(8000, ge=1, le=65535)
    service_max_body_bytes: int = Field(65536, ge=1024, le=16 * 1024 * 1024)
    service_public_url: str | None = None

    log_format: Literal["json", "text"] = "json"
    # Unset: the worker follows celery's --loglevel, the other services log INFO.
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] | None = None

    sentry_dsn: SecretStr | None = None
    sentry_environment: str = "production"
    sentry_traces_sample_rate: float = Field(0.0, ge=0, le=1)

    flower_basic_auth: SecretStr | None = None
    flower_cookie_secret: SecretStr | None = None
    flower_port: int = Field(5555, ge=1, le=65535)

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

    @field_validator("allowed_templates", "allowed_url_domains", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("gateway_keys", "operator_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
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
        return value

    @field_validator("service_public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        if not value.startswith(("https://", "http://")):
            raise ValueError("must be an http(s) URL")
        return value.rstrip("/")

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @field_validator("api_base_url")
    @classmethod
    def _api_url(cls, value: str) -> str:
        value = value.rstrip("/")
        if not value.startswith(("https://", "http://")):
            raise ValueError("must be an http(s) URL")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.backoff_max_seconds < self.backoff_base_seconds:
            raise ValueError(
                f"{ENV_PREFIX}BACKOFF_MAX_SECONDS ({self.backoff_max_seconds}) is below "
                f"{ENV_PREFIX}BACKOFF_BASE_SECONDS ({self.backoff_base_seconds})"
            )
        if self.visibility_timeout_seconds <= self.inflight_lease_seconds:
            raise ValueError(
                f"{ENV_PREFIX}VISIBILITY_TIMEOUT_SECONDS ({self.visibility_timeout_seconds}) must "
                f"exceed the longest attempt ({self.inflight_lease_seconds:.0f} s, from the HTTP "
                "timeouts), or a slow attempt would be handed to a second worker"
            )
        return self

    @property
    def inflight_lease_seconds(self) -> float:
        """How long a claimed message belongs to one worker before another may take it over.

        Covers the worst attempt: two posts (a 401 is retried once with a fresh token), each
        bounded by the connect and read timeouts, plus a margin for Redis and scheduling.
        """
        return 2 * (self.http_connect_timeout_seconds + self.http_timeout_seconds) + 10

    @property
    def uses_sandbox(self) -> bool:
        """True when no Concur credential is configured (posts go to the local sandbox)."""
        return self.api_token is None


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "__root__"]
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if not loc:
        # Cross-field checks name their variables themselves.
        return message if message.startswith(ENV_PREFIX) else f"invalid settings: {message}"
    name = ENV_PREFIX + loc[0].upper()
    value = first.get("input")
    secret = any(word in name for word in ("TOKEN", "DSN", "AUTH", "SECRET", "KEY", "PASSWORD"))
    shown = "" if isinstance(value, dict) or secret else f" (got {value!r})"
    return f"{name}: {message}{shown}"


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
