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
import unicodedataplus
from publicsuffixlist import PSLFILE, PublicSuffixList

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


# Services that answer any name under them with an address chosen by whoever writes the name
# ("10.0.0.1.nip.io" is 10.0.0.1, "anything.localtest.me" is 127.0.0.1): a name there is
# nobody's site, so no entry may name one, exact or wildcard. From each service's own
# documentation; extend it when another such service is seen in an entry.
WILDCARD_DNS_SERVICES: Final = frozenset(
    {
        "nip.io",
        "sslip.io",
        "xip.io",
        "traefik.me",
        "localtest.me",
        "lvh.me",
        "vcap.me",
        "lacolhost.com",
        "localhost.direct",
    }
)

# UTS 39's "highly restrictive" level: a label's letters come from one script, or Latin joined
# with one of these (Japanese: Han, Hiragana, Katakana; Korean: Han, Hangul; Han with Bopomofo).
_LATIN: Final = "Latn"
_CJK_WITH_LATIN: Final = frozenset({"Hanb", "Jpan", "Kore"})
# Common (digits, '-') and Inherited (combining marks) characters go with any script.
_ANY_SCRIPT: Final = frozenset({"Zyyy", "Zinh"})


class _IpLikeHostError(ValueError):
    """A host that a browser would read as an IP address; lets check_url give a precise reason."""


class _MixedScriptHostError(ValueError):
    """A label mixing scripts (``apple`` spelt with a Cyrillic ``a``): a look-alike name."""


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
    host name, including names whose last label is numeric (they would be read as IPv4), names
    where a character other than ``.`` would turn into a label separator, and labels that mix
    scripts (see ``_is_one_script``).
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
        if label.startswith("xn--") and not _is_one_script(idna.decode(label)):
            raise _MixedScriptHostError(
                "host name mixes scripts in one label (as a look-alike name would)"
            )
        encoded_labels.append(label)
    normalised = ".".join(encoded_labels)
    if len(normalised) > _MAX_HOST_LENGTH:
        raise ValueError("host name is too long")
    if _NUMERIC_LABEL_RE.fullmatch(encoded_labels[-1]):
        raise _IpLikeHostError("host name ends in a number, so it would be read as an IP address")
    return normalised


def _script_set(ch: str) -> frozenset[str] | None:
    """UTS 39's augmented script set of ``ch``; None for a character of every script."""
    codes = set(unicodedataplus.script_extensions(ch))
    if codes & _ANY_SCRIPT:
        return None
    if "Hani" in codes:
        codes |= {"Hanb", "Jpan", "Kore"}
    if codes & {"Hira", "Kana"}:
        codes.add("Jpan")
    if "Hang" in codes:
        codes.add("Kore")
    if "Bopo" in codes:
        codes.add("Hanb")
    return frozenset(codes)


def _resolved(sets: Iterable[frozenset[str] | None]) -> frozenset[str] | None:
    """The scripts every character shares (None: no character narrows it)."""
    shared: frozenset[str] | None = None
    for scripts in sets:
        if scripts is not None:
            shared = scripts if shared is None else shared & scripts
    return shared


def _is_one_script(label: str) -> bool:
    """Whether ``label`` (Unicode) passes UTS 39's "highly restrictive" test.

    Its letters are of one script, or Latin with Han and Hiragana/Katakana (Japanese), Han and
    Hangul (Korean) or Han and Bopomofo. So ``apple`` with a Cyrillic ``a`` (U+0430) fails,
    ``пример`` and ``東京shop`` pass.
    """
    sets = [_script_set(ch) for ch in label]
    shared = _resolved(sets)
    if shared is None or shared:
        return True
    without_latin = _resolved(s for s in sets if s is None or _LATIN not in s)
    return without_latin is None or bool(without_latin & _CJK_WITH_LATIN)


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
    service = _wildcard_dns_service(host)
    if service is not None:
        raise ValueError(
            f"{service!r} is a wildcard DNS service (any name under it resolves to an address "
            "of the writer's choosing), not a partner's site"
        )
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
        below = _public_suffixes_below().get(host)
        if below is not None:
            # "*.amazonaws.com" covers s3.amazonaws.com, under which anyone names a bucket.
            raise ValueError(
                f"{host!r} has public suffixes under it (such as {below!r}: anyone can register "
                "names there), so a wildcard over it is open to anyone; list the partner's own "
                "hosts or a wildcard under them"
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


def _wildcard_dns_service(host: str) -> str | None:
    """The wildcard DNS service ``host`` is at or under, or None."""
    labels = host.split(".")
    for start in range(len(labels) - 1):
        name = ".".join(labels[start:])
        if name in WILDCARD_DNS_SERVICES:
            return name
    return None


def _encoded_label(label: str) -> str:
    try:
        return idna.encode(label, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        # A label IDNA2008 cannot write is no label of a host this module accepts; kept as it
        # is, so that the names above it still count as having a rule below them.
        return label


@functools.cache
def _public_suffixes_below() -> dict[str, str]:
    """Every name with a public-suffix rule strictly under it, mapped to one such rule.

    Built once from the package's bundled list (the same file ``PublicSuffixList`` reads, ICANN
    and private sections): ``amazonaws.com`` maps to a rule like ``s3.amazonaws.com``, so
    "is there a rule below this base" is one dict look-up. Exception rules (``!www.ck``) make a
    name registrable, not public, so they add nothing.
    """
    below: dict[str, str] = {}
    with open(PSLFILE, encoding="utf-8") as lines:
        for line in lines:
            words = line.split()
            if not words or words[0].startswith(("//", "!")):
                continue
            labels = [_encoded_label(label) for label in words[0].lower().split(".")]
            # Every name above the rule has it below; for "*.x.y" that includes x.y itself.
            for start in range(1, len(labels)):
                name = ".".join(labels[start:])
                if name not in below or len(words[0]) < len(below[name]):
                    below[name] = words[0].lower()
    return below


def _is_public_suffix(host: str) -> bool:
    """Whether ``host`` (normalised, IDNA) is itself a public suffix (``com``, ``co.uk``)."""
    return bool(_public_suffixes().is_public(host))


def _is_plain_idna(raw_host: str, normalised: str) -> bool:
    """True if plain IDNA2008 (lower-casing only, no UTS-46 mapping) gives the same host.

    UTS-46 also folds full-width and other compatibility forms; some clients do that and some
    reject the name, so a URL relying on it would mean different things to different readers.
    IDNA2008 takes NFC text only: the Kelvin sign (U+212A, whose NFC form is ``K``) is mapped by
    UTS-46 and by ``str.lower()``, not by plain IDNA, so a host spelt with it is refused here.
    """
    bare = raw_host[:-1] if raw_host.endswith(".") else raw_host
    if not unicodedata.is_normalized("NFC", bare):
        return False
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
    except _MixedScriptHostError:
        return _url_refusal(
            "the context URL host mixes scripts in one label (a look-alike of another name)"
        )
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
