"""Allow-list entries that would open it to anyone, and host names that only look like a listed one.

Issue 23, items 3 and 11: a wildcard over a base with public suffixes below it
(``*.amazonaws.com`` covers ``s3.amazonaws.com``, under which anyone names a bucket), wildcard
DNS services (``nip.io``), the Kelvin sign and full-width letters that only UTS-46 folds, and
labels that mix scripts. Pure: no Redis, no network.
"""

from __future__ import annotations

import re

import pytest

from worker.rules.allowlist import WILDCARD_DNS_SERVICES, AllowList


def _refusal(entry: str) -> str:
    with pytest.raises(ValueError, match=re.escape(repr(entry))) as error:
        AllowList.from_entries([], [entry])
    return str(error.value)


@pytest.mark.parametrize(
    ("entry", "suffix_below"),
    [
        ("*.amazonaws.com", "s3.amazonaws.com"),
        ("*.windows.net", "core.windows.net"),
        ("*.core.windows.net", "core.windows.net"),
        ("*.cloudfront.net", None),  # itself a public suffix: the older check
        ("*.herokuapp.com", None),
    ],
)
def test_a_wildcard_over_a_base_with_public_suffixes_below_is_refused(entry, suffix_below):
    reason = _refusal(entry)
    assert "public suffix" in reason
    if suffix_below is not None:
        assert "under it" in reason and "open to anyone" in reason


@pytest.mark.parametrize(
    "url",
    ["https://attacker-bucket.s3.amazonaws.com/x", "https://attacker.blob.core.windows.net/x"],
)
def test_what_the_cloud_wildcards_would_have_let_through_is_refused_by_the_narrower_entry(url):
    # The attack: a bucket anyone can create. With the wildcard refused, the operator lists the
    # partner's own bucket, and a stranger's bucket under the same cloud suffix stays out.
    allowed = AllowList.from_entries([], ["partner-assets.s3.amazonaws.com", "partner.example"])
    assert allowed.check_url("https://partner-assets.s3.amazonaws.com/x") is None
    refusal = allowed.check_url(url)
    assert refusal is not None and "not on the allow-list" in refusal.reason


def test_a_wildcard_over_a_partners_own_domain_is_still_accepted():
    allowed = AllowList.from_entries([], ["*.partner.example", "*.example.co.uk", "*.sap.com"])
    assert allowed.check_url("https://app.partner.example/x") is None
    assert allowed.check_url("https://deep.shop.example.co.uk/") is None


@pytest.mark.parametrize(
    "entry",
    [
        "*.nip.io",
        "*.sslip.io",
        "nip.io",
        "10.0.0.1.nip.io",
        "*.10-0-0-1.sslip.io",
        "*.xip.io",
        "*.traefik.me",
        "app.localtest.me",
        "*.lvh.me:8443",
    ],
)
def test_wildcard_dns_services_are_refused_as_wildcard_or_exact_bases(entry):
    assert "wildcard DNS service" in _refusal(entry)


def test_the_wildcard_dns_list_holds_the_services_the_issue_names():
    assert {"nip.io", "sslip.io", "xip.io", "traefik.me", "localtest.me", "lvh.me"} <= (
        WILDCARD_DNS_SERVICES
    )
    # Each is itself a name this module can hold (so the check is not dead text).
    for service in WILDCARD_DNS_SERVICES:
        assert "wildcard DNS service" in _refusal(f"app.{service}")


# -- look-alike host names (item 11) --------------------------------------------------------------

LISTED = AllowList.from_entries([], ["*.partner.example", "kelvin.example", "*.пример.рф"])


@pytest.mark.parametrize(
    ("url", "why"),
    [
        # U+212A KELVIN SIGN: str.lower() and UTS-46 both make it "k"; IDNA2008 refuses it.
        ("https://\u212aelvin.example/", "only some clients"),
        ("https://app.\u212aelvin.example/", "only some clients"),
        ("https://app.partner.exampl\u212a/", "only some clients"),
        # Full-width letters: UTS-46 folds them to ASCII.
        ("https://\uff41pp.partner.example/", "only some clients"),
        ("https://app.\uff50artner.example/", "only some clients"),
        # A Cyrillic a (U+0430) among Latin letters: a look-alike of apple.partner.example.
        ("https://\u0430pple.partner.example/", "mixes scripts"),
        ("https://xn--pple-43d.partner.example/", "mixes scripts"),  # the same, as punycode
        # Greek omicron in a Latin label.
        ("https://g\u03bfogle.partner.example/", "mixes scripts"),
        # Cyrillic with a Latin letter, under a listed Cyrillic IDN.
        ("https://c\u0430\u0439\u0442.пример.рф/", "mixes scripts"),
    ],
)
def test_look_alike_hosts_are_refused(url, why):
    refusal = LISTED.check_url(url)
    assert refusal is not None and why in refusal.reason


@pytest.mark.parametrize(
    "url",
    [
        "https://kelvin.example/",
        "https://KELVIN.example/",
        "https://сайт.пример.рф/",  # pure Cyrillic, listed
        "https://xn--80aswg.xn--e1afmkfd.xn--p1ai/",  # the same as punycode
        "https://東京shop.partner.example/",  # Han with Latin: UTS 39 allows it
        "https://ひらがなカタカナ漢字.partner.example/",  # Japanese
        "https://한국어abc.partner.example/",  # Hangul with Latin
        "https://bücher-2.partner.example/",
        "https://BÜCHER.partner.example/",  # case folds within Latin
    ],
)
def test_single_script_and_allowed_combinations_pass_when_listed(url):
    assert LISTED.check_url(url) is None


def test_a_pure_cyrillic_host_is_not_allowed_unless_listed():
    refusal = AllowList.from_entries([], ["*.partner.example"]).check_url("https://сайт.пример.рф/")
    assert refusal is not None and "not on the allow-list" in refusal.reason


def test_an_entry_mixing_scripts_stops_start_up():
    assert "mixes scripts" in _refusal("\u0430pple.example")
    assert "mixes scripts" in _refusal("*.p\u0430rtner.example")
