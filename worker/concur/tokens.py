"""Where the bearer token comes from.

``StaticToken`` serves ``NOTIFY_API_TOKEN``; a refresh (after a 401) re-reads the settings, so an
operator can rotate the token without restarting workers. With no token configured the sandbox's
token is used, but only for a loopback API URL: nothing reaches a real host without credentials.
``worker.concur.oauth.OAuthTokens`` serves Concur OAuth company tokens instead when they are
configured.
"""

from __future__ import annotations

import contextlib
from typing import Protocol
from urllib.parse import urlsplit

from worker.settings import Settings, SettingsError, load_settings

SANDBOX_TOKEN = "sandbox-token"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class TokenUnavailable(Exception):
    """No usable token can be had now (token endpoint down, credentials refused).

    A credentials outage, not a fault of the message: delivery schedules the message for a
    later attempt instead of dead-lettering it. The text never contains a secret.
    """


class CompanyNeedsReconnect(TokenUnavailable):
    """Concur refused a registry company's refresh token: an operator must reconnect it
    (``worker.concur.companytokens``); its messages wait meanwhile."""

    def __init__(self, company_id: str, why: str) -> None:
        super().__init__(f"company {company_id} needs to be reconnected: {why}")
        self.company_id = company_id


class TokenProvider(Protocol):
    """Gives the current access token, and a fresh one after the API refused ``refused``."""

    def token(self) -> str:
        """The token to use now; raises ``TokenUnavailable`` when none can be had."""
        ...

    def refresh(self, refused: str) -> str:
        """A token other than ``refused`` if one can be had (else the same one)."""
        ...


def is_loopback_url(url: str) -> bool:
    """Whether ``url`` points at this machine (the sandbox), never at Concur."""
    return (urlsplit(url).hostname or "") in LOOPBACK_HOSTS


def _token_from(settings: Settings) -> str:
    if settings.api_token is not None:
        return settings.api_token.get_secret_value()
    if is_loopback_url(settings.api_base_url):
        return SANDBOX_TOKEN
    raise SettingsError(
        "NOTIFY_API_TOKEN: not set, and NOTIFY_API_BASE_URL is not the local sandbox; set a "
        "Concur token, or run `notify dev` to post to the sandbox"
    )


class StaticToken:
    """A configured token; refreshing means reading the settings again."""

    def __init__(self, settings: Settings) -> None:
        self._token = _token_from(settings)

    def token(self) -> str:
        """The configured token."""
        return self._token

    def refresh(self, refused: str) -> str:
        """Re-read ``NOTIFY_API_TOKEN`` (from the environment and ``.env``)."""
        # On a bad setting keep the old token; the second 401 dead-letters with the reason.
        with contextlib.suppress(SettingsError):
            self._token = _token_from(load_settings())
        return self._token
