"""The endpoint guard at send time: resolve the host once, check every address, pin one.

The addresses a host resolves to are checked by ``worker.rules.endpoints.address_refusal``; one
refused address refuses the endpoint (a rebinding name answers a public and a private address
and lets the client choose). The post then connects to the checked address itself
(``worker.webhooks.sender`` hands it to libcurl as ``CURLOPT_RESOLVE``), so nothing resolves the
name a second time. The resolver is injected, so tests decide what a name resolves to.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from worker.rules.endpoints import Endpoint, EndpointRefused, address_refusal, check_url

Resolver = Callable[[str, int], Sequence[str]]
"""``(host, port) -> addresses`` (text); raises ``OSError`` when the name does not resolve."""


def system_resolver(host: str, port: int) -> list[str]:
    """The system's resolver (``getaddrinfo``), TCP addresses only, in its order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: list[str] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        address = str(sockaddr[0])
        if address not in seen:
            seen.append(address)
    return seen


@dataclass(frozen=True, slots=True)
class Target:
    """Where one post goes: the checked endpoint and the checked address it is pinned to."""

    endpoint: Endpoint
    address: str


def resolve(url: str, *, allow_private: bool, resolver: Resolver = system_resolver) -> Target:
    """Check ``url``, resolve its host and check each address; ``EndpointRefused`` if any fails.

    A host that does not resolve is refused as ``address`` too (a failed attempt, tried again
    by the retry policy like any other).
    """
    endpoint = check_url(url, allow_private=allow_private)
    literal = endpoint.literal
    if literal is not None:
        return Target(endpoint, str(literal))
    try:
        answers = list(resolver(endpoint.host, endpoint.port))
    except (OSError, UnicodeError) as error:
        raise EndpointRefused("address", f"{endpoint.host} does not resolve: {error}") from None
    if not answers:
        raise EndpointRefused("address", f"{endpoint.host} resolves to no address")
    for text in answers:
        try:
            address = ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            raise EndpointRefused(
                "address", f"{endpoint.host} resolves to {text!r}, not an address"
            ) from None
        refusal = address_refusal(address, allow_private=allow_private)
        if refusal is not None or "%" in text:
            raise EndpointRefused(
                "address",
                f"{endpoint.host} resolves to {text}: {refusal or 'a scoped (link-local) address'}",
            )
    return Target(endpoint, str(ipaddress.ip_address(answers[0])))
