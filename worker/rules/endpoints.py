"""Which partner webhook endpoints may be posted to (pure: no resolution, no I/O).

A partner's webhook URL points at the internet; the worker that posts to it sits inside the
operator's network, beside Redis, cloud metadata services and other internal hosts. So:

* ``check_url``: https only (plain http only to this machine, and only with
  ``NOTIFY_WEBHOOK_ALLOW_PRIVATE``), no credentials in the URL, no fragment, a host name or an IP
  literal, a valid port.
* ``address_refusal``: what the host resolves to, checked at send time for each address
  (``worker.webhooks.guard`` resolves, then pins the connection to the checked address, so a DNS
  answer that changes between the check and the connection, DNS rebinding, changes nothing).
  Refused always: link-local (169.254.0.0/16, fe80::/10), cloud metadata addresses
  (169.254.169.254, fd00:ec2::254, 100.100.100.200), multicast, unspecified, broadcast and
  reserved ranges. Refused unless ``NOTIFY_WEBHOOK_ALLOW_PRIVATE``: loopback, private (RFC 1918,
  fc00::/7), CGNAT (100.64.0.0/10) and every other address that is not globally reachable.
  IPv6 forms that carry an IPv4 address (mapped, 6to4, Teredo, NAT64) are judged by it.

Refusals, as ``EndpointRefused.reason``::

    EndpointRefused
     ├── scheme     not https (or http outside loopback, or loopback without the setting)
     ├── url        not a URL this product posts to: credentials, fragment, no host, bad port
     └── address    the host resolves (or is) an address that is refused (see above)
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_URL_LENGTH = 2048
_HOST_NAME = re.compile(
    r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*\.?"
)
_METADATA = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_LOOPBACK_NAMES = frozenset({"localhost", "localhost."})


class EndpointRefused(Exception):
    """A webhook URL or address this product does not post to; ``reason`` as the module tree."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A checked webhook URL: ``host`` lower-case (an IP literal without brackets), ``port``."""

    url: str
    scheme: str
    host: str
    port: int

    @property
    def name(self) -> str:
        """``host[:port]``: the endpoint's name for its breaker (the port only when not 443)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == 443 else f"{host}:{self.port}"

    @property
    def literal(self) -> IPAddress | None:
        """The host as an address when the URL names one, else None."""
        try:
            return ipaddress.ip_address(self.host)
        except ValueError:
            return None


def is_loopback_name(host: str) -> bool:
    """Whether ``host`` names this machine: localhost, 127.0.0.0/8 or ::1 (pure)."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(url: str, *, allow_private: bool) -> Endpoint:
    """The endpoint of ``url``, or ``EndpointRefused`` saying why not."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL_LENGTH:
        raise EndpointRefused("url", f"a webhook URL is 1 to {MAX_URL_LENGTH} characters")
    if any(ord(c) <= 32 or ord(c) == 127 for c in url):
        raise EndpointRefused("url", "a webhook URL has no spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise EndpointRefused("url", f"not a URL: {error}") from None
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if scheme not in ("https", "http"):
        raise EndpointRefused("scheme", "a webhook URL is https://")
    if not host:
        raise EndpointRefused("url", "a webhook URL names a host")
    if parts.username is not None or parts.password is not None:
        raise EndpointRefused("url", "a webhook URL carries no credentials (user:password@)")
    if parts.fragment or url.endswith("#"):
        raise EndpointRefused("url", "a webhook URL has no #fragment")
    if port == 0:
        raise EndpointRefused("url", "port 0 is not a port")
    literal: IPAddress | None
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is None and _HOST_NAME.fullmatch(host) is None:
        raise EndpointRefused(
            "url", "the host is not a DNS name (letters, digits, '-' and '.'; IDNs in A-label form)"
        )
    if scheme == "http":
        if not is_loopback_name(host):
            raise EndpointRefused("scheme", "a webhook URL is https:// (http:// only to loopback)")
        if not allow_private:
            raise EndpointRefused(
                "scheme",
                "http:// to loopback needs NOTIFY_WEBHOOK_ALLOW_PRIVATE=true (development)",
            )
    endpoint = Endpoint(url, scheme, host, port or (443 if scheme == "https" else 80))
    if literal is not None:
        refusal = address_refusal(literal, allow_private=allow_private)
        if refusal is not None:
            raise EndpointRefused("address", f"{host}: {refusal}")
    return endpoint


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    # IPv6 forms that reach an IPv4 address: judged by that address.
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def address_refusal(address: IPAddress, *, allow_private: bool) -> str | None:
    """Why a webhook may not be posted to ``address`` (pure), or None when it may."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            return address_refusal(embedded, allow_private=allow_private)
        if address.scope_id:
            return "a scoped (link-local) address"
    if address in _METADATA:
        return "a cloud metadata address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_multicast:
        return "a multicast address"
    if address.is_unspecified:
        return "the unspecified address"
    if address.is_loopback:  # before "reserved": ::1 is in ::/8, a reserved block
        if allow_private:
            return None
        return "a loopback address (NOTIFY_WEBHOOK_ALLOW_PRIVATE=true lets a developer's in)"
    if address.is_reserved or (
        isinstance(address, ipaddress.IPv4Address) and address == ipaddress.IPv4Address(-1 + 2**32)
    ):
        return "a reserved address"
    if address.is_global and address not in _CGNAT:
        return None
    if allow_private:
        return None
    if isinstance(address, ipaddress.IPv4Address) and address in _CGNAT:
        return "a carrier-grade NAT address (100.64.0.0/10)"
    if address.is_private:
        return "a private address"
    return "an address that is not globally reachable"
