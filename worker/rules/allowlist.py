"""Allow-list for partner requests: which templates may be used and which URLs may be linked.

This module is a security boundary. A partner request names a ``templateId`` and may carry a
``context.url``; both must pass :meth:`AllowList.check` before anything is sent to Concur.

The URL check is deliberately stricter than any URL parser: rather than trusting that
``urllib.parse`` agrees with whatever eventually renders or follows the link (browsers follow
WHATWG rules, which differ in many corners), anything ambiguous is refused. The module is pure:
no I/O, no settings, no mutable globals.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

import idna
from publicsuffixlist import PublicSuffixList

from worker.shapes.models import MAX_URL_LENGTH

__all__ = ["AllowList", "Refusal", "normalise_host"]

_TEMPLATE_NOT_ALLOWED: Final = "template_not_allowed"
_URL_NOT_ALLOWED: Final = "url_not_allowed"
_TEMPLATE_FIELD: Final = "templateId"
_URL_FIELD: Final = "context.url"

_DEFAULT_HTTPS_PORT: Final = 443

# One LDH label of an already IDNA-encoded, lower-cased name (RFC 1123 host name syntax).
_LABEL_RE: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# WHATWG's "ends in a number" test: a last label like this makes browsers parse the whole host
# as IPv4 (decimal, octal, hex, or short forms), so it can never be treated as a name.
_NUMERIC_LABEL_RE: Final = re.compile(r"[0-9]+|0x[0-9a-f]*")
# int() would accept "+1", " 1" and "1_0"; ports must be plain ASCII digits.
_PORT_RE: Final = re.compile(r"[0-9]{1,5}")
_SCHEME_RE: Final = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*):")
_MAX_HOST_LENGTH: Final = 253
# What RFC 3986 allows after the authority: unreserved, sub-delims, ':', '@', '/', '?', the one
# '#' that starts the fragment, and '%' with two hex digits. Anything else (space, '"', '<',
# '>', '`', '{', '}', '|', '^', backslash, '[', ']', a second '#', non-ASCII) is not a URI
# character: clients escape it differently or not at all, so it is refused, never sent verbatim.
_URI_TAIL_CHARS: Final = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@/?#%"
)
_PERCENT_ESCAPE_RE: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")
# Characters that have no business in a bare "host[:port]" settings entry.
_ENTRY_FORBIDDEN: Final = frozenset("/\\@?#%[]")


class _IpLikeHostError(ValueError):
    """A host that a browser would read as an IP address; lets check_url give a precise reason."""


@dataclass(frozen=True)
class Refusal:
    """Why a request was not allowed.

    ``reason`` is a short human sentence. It never echoes the submitted URL (which may carry
    credentials or tokens); at most it names the normalised host.
    """

    code: str
    field: str
    reason: str


def _url_refusal(reason: str) -> Refusal:
    return Refusal(code=_URL_NOT_ALLOWED, field=_URL_FIELD, reason=reason)


def _template_refusal(reason: str) -> Refusal:
    return Refusal(code=_TEMPLATE_NOT_ALLOWED, field=_TEMPLATE_FIELD, reason=reason)


def normalise_host(host: str) -> str:
    """Return ``host`` as a lower-case ASCII (punycode) DNS name without a trailing dot.

    UTS-46 mapping is applied, so ``BÜCHER.example.`` becomes ``xn--bcher-kva.example``.
    Exactly one trailing dot is removed. Raises ``ValueError`` if the result is not a valid DNS
    host name, including names whose last label is numeric (they would be read as IPv4), and
    names where a character other than ``.`` would turn into a label separator.
    """
    if not isinstance(host, str) or not host:
        raise ValueError("host name is empty")
    raw = host[:-1] if host.endswith(".") else host
    encoded_labels: list[str] = []
    for raw_label in raw.split("."):
        if not raw_label:
            raise ValueError("host name has an empty label")
        try:
            # std3_rules stops UTS-46 mapping compatibility characters onto '/', ':' and the like.
            encoded = idna.encode(raw_label, uts46=True, std3_rules=True, strict=True)
        except (idna.IDNAError, UnicodeError) as exc:
            raise ValueError(f"host name is not valid IDNA: {exc}") from exc
        label = encoded.decode("ascii").lower()
        # Label by label, so that UTS-46 dot look-alikes (U+3002, U+FF0E, '⒈', ...) cannot add
        # a label: "evil\u3002partner.example" is one label to a strict IDNA2008 client but two
        # to a browser, and the allow-list must not depend on which one renders the link.
        if not _LABEL_RE.fullmatch(label):
            raise ValueError("host name contains an invalid label")
        encoded_labels.append(label)
    normalised = ".".join(encoded_labels)
    if len(normalised) > _MAX_HOST_LENGTH:
        raise ValueError("host name is too long")
    if _NUMERIC_LABEL_RE.fullmatch(encoded_labels[-1]):
        raise _IpLikeHostError("host name ends in a number, so it would be read as an IP address")
    return normalised


def _parse_port(text: str) -> int:
    if not _PORT_RE.fullmatch(text):
        raise ValueError("port is not a number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError("port is out of range")
    return port


def _parse_domain_entry(entry: object) -> tuple[bool, str, int]:
    """Parse one settings entry into (is_wildcard, normalised host or suffix, port)."""
    if not isinstance(entry, str) or not entry:
        raise ValueError("entry must be a non-empty string")
    if any(_is_forbidden_char(ch) for ch in entry):
        raise ValueError("entry contains whitespace or control characters")
    if "://" in entry:
        raise ValueError("entry must not include a scheme")
    bad = sorted(set(entry) & _ENTRY_FORBIDDEN)
    if bad:
        # '/' means a path, '@' userinfo, '[' an IPv6 literal, '%' percent-encoding: none of
        # these describe a plain host name.
        raise ValueError(f"entry must be a bare host name, found {''.join(bad)!r}")

    host_part, sep, port_text = entry.rpartition(":")
    if not sep:
        host_part, port = entry, _DEFAULT_HTTPS_PORT
    else:
        if ":" in host_part:
            raise ValueError("entry has more than one ':'")
        port = _parse_port(port_text)

    wildcard = host_part.startswith("*.")
    if wildcard:
        host_part = host_part[2:]
    if "*" in host_part:
        raise ValueError("'*' is only allowed as a whole leading label, as in '*.example.com'")
    try:
        host = normalise_host(host_part)
    except _IpLikeHostError as exc:
        raise ValueError("IP addresses are not allowed, use a host name") from exc
    if host == "localhost" or host.endswith(".localhost"):
        raise ValueError("localhost is this machine, not a partner's site")
    if wildcard:
        # "*.com" would hand out a whole TLD; require a registrable-looking base.
        if host.count(".") < 1:
            raise ValueError("a wildcard needs at least two labels after '*.'")
        if _is_public_suffix(host):
            # "*.co.uk", "*.github.io": anyone may register a name under it.
            raise ValueError(
                f"{host!r} is a public suffix (anyone can register names under it); "
                "name the partner's own domain"
            )
        return True, "." + host, port
    if _is_public_suffix(host):
        raise ValueError(f"{host!r} is a public suffix, not a site; name the partner's own host")
    return False, host, port


@functools.cache
def _public_suffixes() -> PublicSuffixList:
    # The list the package ships (ICANN and private sections, e.g. github.io); never fetched
    # at run time. Rules for unknown TLDs ("*") make any single label a public suffix too.
    return PublicSuffixList()


def _is_public_suffix(host: str) -> bool:
    """Whether ``host`` (normalised, IDNA) is itself a public suffix (``com``, ``co.uk``)."""
    return bool(_public_suffixes().is_public(host))


def _is_plain_idna(raw_host: str, normalised: str) -> bool:
    """True if plain IDNA2008 (lower-casing only, no UTS-46 mapping) gives the same host.

    UTS-46 also folds full-width and other compatibility forms; some clients do that and some
    reject the name, so a URL relying on it would mean different things to different readers.
    """
    bare = raw_host[:-1] if raw_host.endswith(".") else raw_host
    try:
        plain = idna.encode(bare.lower(), strict=True).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        return False
    return plain == normalised


@functools.lru_cache(maxsize=4096)
def _checked_host(host_text: str) -> str | Refusal:
    """The normalised host name in a URL's authority, or why it is refused.

    Pure, and the costliest step of a check (IDNA twice), so verdicts are cached: partners send
    the same few hosts again and again. The cache is bounded, so odd hosts cannot grow it.
    """
    try:
        host = normalise_host(host_text)
    except _IpLikeHostError:
        return _url_refusal("the context URL must not use an IP address as host")
    except ValueError:
        return _url_refusal("the context URL host is not a valid DNS host name")
    if not _is_plain_idna(host_text, host):
        return _url_refusal(
            "the context URL host uses characters that only some clients map to a host name"
        )
    return host


def _is_forbidden_char(ch: str) -> bool:
    # Cc: C0/C1 controls and DEL. Cf: invisible format characters (bidi overrides, zero-width
    # joiners, soft hyphen) that can make a displayed link differ from the real one. Cs: lone
    # surrogates, which cannot be encoded at all.
    return ch.isspace() or unicodedata.category(ch) in {"Cc", "Cf", "Cs"}


def _uri_tail_refusal(tail: str) -> Refusal | None:
    """Why a URL's path, query and fragment are not all URI characters (RFC 3986), or None."""
    for ch in tail:
        if ch not in _URI_TAIL_CHARS:
            shown = repr(ch) if ch.isascii() else "a non-ASCII character"
            return _url_refusal(
                f"the context URL has a character that is not valid in a URI ({shown}) in its "
                "path, query or fragment; percent-encode it"
            )
    if tail.count("#") > 1:
        return _url_refusal(
            "the context URL has a second '#' (not valid in a URI); percent-encode it as %23"
        )
    if _PERCENT_ESCAPE_RE.search(tail):
        return _url_refusal(
            "the context URL has a '%' not followed by two hex digits; write a literal '%' as %25"
        )
    return None


@dataclass(frozen=True)
class AllowList:
    """Templates and URL hosts a partner is allowed to use.

    ``hosts`` holds exact ``(host, port)`` pairs. ``suffixes`` holds ``(".example.com", port)``
    pairs from ``*.example.com`` entries; they match any deeper subdomain but not the apex.
    Hosts are stored normalised (see :func:`normalise_host`); build instances with
    :meth:`from_entries` so that holds.
    """

    templates: frozenset[str]
    hosts: frozenset[tuple[str, int]]
    suffixes: frozenset[tuple[str, int]]

    @classmethod
    def from_entries(cls, templates: Iterable[str], url_domains: Iterable[str]) -> AllowList:
        """Build an allow-list from settings values.

        ``templates`` are kept verbatim. ``url_domains`` entries look like ``example.com``,
        ``*.example.com`` or either with ``:port``; without a port only 443 is allowed.
        Raises ``ValueError`` naming the first bad entry.
        """
        # A bare string is iterable too; iterating it would silently allow single characters.
        if isinstance(templates, str):
            raise ValueError(
                f"templates must be a collection of names, not the string {templates!r}"
            )
        if isinstance(url_domains, str):
            raise ValueError(
                f"url_domains must be a collection of entries, not the string {url_domains!r}"
            )

        template_set: set[str] = set()
        for template in templates:
            if not isinstance(template, str) or not template:
                raise ValueError(f"{template!r} is not a valid template entry: must be non-empty")
            template_set.add(template)

        hosts: set[tuple[str, int]] = set()
        suffixes: set[tuple[str, int]] = set()
        for entry in url_domains:
            try:
                wildcard, name, port = _parse_domain_entry(entry)
            except ValueError as exc:
                raise ValueError(f"{entry!r} is not a valid domain entry: {exc}") from exc
            (suffixes if wildcard else hosts).add((name, port))

        return cls(
            templates=frozenset(template_set),
            hosts=frozenset(hosts),
            suffixes=frozenset(suffixes),
        )

    def check_template(self, template_id: str) -> Refusal | None:
        """Return a refusal unless ``template_id`` is listed exactly (case-sensitive)."""
        # The id is not echoed: it is partner input of unbounded length and content.
        if not isinstance(template_id, str) or template_id not in self.templates:
            return _template_refusal("the template is not on the allow-list")
        return None

    def check_url(self, url: str) -> Refusal | None:
        """Return a refusal unless ``url`` is an https URL to an allowed host and port.

        Never raises: anything that cannot be parsed unambiguously is refused.
        """
        try:
            return self._check_url(url)
        except Exception:  # a parser surprise must refuse, not crash the delivery task
            return _url_refusal("the context URL could not be parsed")

    def check(self, template_id: str, url: str | None) -> list[Refusal]:
        """Check a whole request; an empty list means it is allowed.

        ``url`` of ``None`` means the request has no URL, so only the template is checked.
        """
        refusals: list[Refusal] = []
        template_refusal = self.check_template(template_id)
        if template_refusal is not None:
            refusals.append(template_refusal)
        if url is not None:
            url_refusal = self.check_url(url)
            if url_refusal is not None:
                refusals.append(url_refusal)
        return refusals

    def _host_allowed(self, host: str, port: int) -> bool:
        if (host, port) in self.hosts:
            return True
        # Suffixes start with '.', and normalised hosts have no empty labels, so endswith()
        # implies at least one whole label in front: the apex and "evilpartner.example" fail.
        return any(port == p and host.endswith(suffix) for suffix, p in self.suffixes)

    def _host_listed_on_any_port(self, host: str) -> bool:
        return any(h == host for h, _ in self.hosts) or any(
            host.endswith(suffix) for suffix, _ in self.suffixes
        )

    def _check_url(self, url: object) -> Refusal | None:
        if not isinstance(url, str):
            return _url_refusal("the context URL must be a string")
        if not url:
            return _url_refusal("the context URL is empty")
        if len(url) > MAX_URL_LENGTH:
            return _url_refusal(f"the context URL is longer than {MAX_URL_LENGTH} characters")
        # Parsers disagree about stripping or splitting on these (WHATWG drops tab/CR/LF, urllib
        # strips leading controls), so any of them could change which host is meant.
        if any(_is_forbidden_char(ch) for ch in url):
            return _url_refusal(
                "the context URL must not contain whitespace, control or invisible characters"
            )
        # Browsers treat '\' as '/' in https URLs; urllib does not. Refuse the disagreement.
        if "\\" in url:
            return _url_refusal("the context URL must not contain a backslash")

        scheme_match = _SCHEME_RE.match(url)
        if scheme_match is None or scheme_match.group(1).lower() != "https":
            return _url_refusal("the context URL must use https")
        rest = url[scheme_match.end() :]
        if not rest.startswith("//"):
            return _url_refusal("the context URL must have a host (https://host/...)")

        # Independent scan of the authority: everything up to the first '/', '?' or '#'.
        after_slashes = rest[2:]
        end = min(
            (i for i in (after_slashes.find(c) for c in "/?#") if i != -1),
            default=len(after_slashes),
        )
        authority = after_slashes[:end]
        if "@" in authority:
            return _url_refusal("the context URL must not contain user information ('@')")
        if not authority:
            return _url_refusal("the context URL has no host")
        if "[" in authority or "]" in authority:
            return _url_refusal("the context URL must not use an IP address as host")
        if "%" in authority:
            return _url_refusal("the context URL host must not be percent-encoded")
        tail_refusal = _uri_tail_refusal(after_slashes[end:])
        if tail_refusal is not None:
            return tail_refusal

        host_text, sep, port_text = authority.rpartition(":")
        if not sep:
            host_text, port_text = authority, ""
        elif ":" in host_text:
            return _url_refusal("the context URL host contains more than one ':'")
        if not host_text:
            return _url_refusal("the context URL has no host")
        if sep:
            try:
                port = _parse_port(port_text)
            except ValueError:
                return _url_refusal("the context URL port is not a valid port number")
        else:
            port = _DEFAULT_HTTPS_PORT

        # Cross-check with urllib: if it sees a different host, port or userinfo than our
        # scan, one of us is being fooled, and refusing is the only safe answer.
        try:
            parts = urlsplit(url)
            parsed_port = parts.port
        except ValueError:
            return _url_refusal("the context URL could not be parsed")
        if (
            parts.scheme.lower() != "https"
            or parts.netloc != authority
            or parts.username is not None
            or parts.password is not None
            or parts.hostname != host_text.lower()
            or (parsed_port if parsed_port is not None else _DEFAULT_HTTPS_PORT) != port
        ):
            return _url_refusal("the context URL is ambiguous and could not be parsed safely")

        host = _checked_host(host_text)
        if isinstance(host, Refusal):
            return host

        if self._host_allowed(host, port):
            return None
        if self._host_listed_on_any_port(host):
            return _url_refusal(f"port {port} is not allowed for host {host}")
        return _url_refusal(f"the context URL host {host} is not on the allow-list")
