"""Behaviour of the template / URL allow-list, which guards everything sent to Concur."""

from __future__ import annotations

import re

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.provisional import domains

from worker.rules.allowlist import AllowList, Refusal, normalise_host

ALLOW = AllowList.from_entries(
    templates={"welcome", "expense-approved"},
    url_domains=[
        "app.example.com",
        "*.partner.example",
        "ports.example.com:8443",
        "bücher.example",
    ],
)

# Written out by hand (not derived from ALLOW) so the property test has an independent oracle.
EXPECTED_EXACT = {
    ("app.example.com", 443),
    ("ports.example.com", 8443),
    ("xn--bcher-kva.example", 443),
}
EXPECTED_SUFFIXES = {("partner.example", 443)}

LONG_URL = "https://app.example.com/" + "a" * 2100

URL_CASES = [
    # --- allowed -------------------------------------------------------------------------
    pytest.param("https://app.example.com/", True, None, id="exact-host"),
    pytest.param("https://app.example.com", True, None, id="exact-host-no-path"),
    pytest.param("https://app.example.com/p/a?q=1&r=2#frag", True, None, id="path-query-fragment"),
    pytest.param("HTTPS://app.example.com/", True, None, id="scheme-upper-case"),
    pytest.param("https://APP.Example.COM/", True, None, id="host-upper-case"),
    pytest.param("https://app.example.com./", True, None, id="trailing-dot-matches"),
    pytest.param("https://app.example.com:443/", True, None, id="explicit-default-port"),
    pytest.param("https://ports.example.com:8443/x", True, None, id="listed-non-default-port"),
    pytest.param("https://a.partner.example/", True, None, id="wildcard-one-level"),
    pytest.param("https://a.b.c.partner.example/", True, None, id="wildcard-any-depth"),
    pytest.param("https://bücher.example/", True, None, id="unicode-host-to-punycode-entry"),
    pytest.param("https://xn--bcher-kva.example/", True, None, id="punycode-host-to-unicode-entry"),
    pytest.param("https://BÜCHER.example/", True, None, id="unicode-host-upper-case"),
    pytest.param("https://app.example.com/@evil.com", True, None, id="at-sign-in-path-is-harmless"),
    pytest.param("https://app.example.com?next=https://evil.com", True, None, id="url-in-query"),
    # --- scheme ----------------------------------------------------------------------------
    pytest.param("http://app.example.com/", False, "must use https", id="http"),
    pytest.param("ftp://app.example.com/", False, "must use https", id="ftp"),
    pytest.param("javascript:alert(1)//app.example.com", False, "must use https", id="javascript"),
    pytest.param("//app.example.com/", False, "must use https", id="scheme-relative"),
    pytest.param("app.example.com", False, "must use https", id="no-scheme"),
    pytest.param("not a url", False, "whitespace", id="garbage-with-spaces"),
    pytest.param("::::", False, "must use https", id="garbage-colons"),
    # --- empty / missing host ----------------------------------------------------------------
    pytest.param("", False, "empty", id="empty-string"),
    pytest.param("https://", False, "no host", id="empty-authority"),
    pytest.param("https:app.example.com", False, "must have a host", id="no-double-slash"),
    pytest.param("https:///app.example.com/", False, "no host", id="triple-slash"),
    pytest.param("https://:443/", False, "no host", id="port-without-host"),
    pytest.param(LONG_URL, False, "longer than 2048", id="too-long"),
    # --- userinfo ------------------------------------------------------------------------
    pytest.param("https://app.example.com@evil.com/", False, "user information", id="userinfo"),
    pytest.param("https://user:pw@app.example.com/", False, "user information", id="user-pass"),
    pytest.param("https://@app.example.com/", False, "user information", id="empty-userinfo"),
    pytest.param(
        "https://app.example.com:443@evil.com/", False, "user information", id="port-as-password"
    ),
    pytest.param("https://evil.com#@app.example.com", False, "evil.com", id="at-after-fragment"),
    pytest.param("https://evil.com?@app.example.com", False, "evil.com", id="at-after-query"),
    # --- look-alikes ---------------------------------------------------------------------
    pytest.param("https://app.example.com.evil.com/", False, "not on the allow-list", id="prefix"),
    pytest.param("https://evilapp.example.com/", False, "not on the allow-list", id="glued-prefix"),
    pytest.param("https://app.example.co/", False, "not on the allow-list", id="shorter-tld"),
    pytest.param("https://partner.example/", False, "not on the allow-list", id="wildcard-apex"),
    pytest.param(
        "https://evilpartner.example/", False, "not on the allow-list", id="wildcard-glued"
    ),
    pytest.param(
        "https://a.partner.example.evil/", False, "not on the allow-list", id="wildcard-prefix"
    ),
    pytest.param("https://bucher.example/", False, "not on the allow-list", id="ascii-folded-idn"),
    pytest.param("https://app.example.com../", False, "not a valid DNS", id="two-trailing-dots"),
    pytest.param("https://app..example.com/", False, "not a valid DNS", id="empty-label"),
    pytest.param("https://.app.example.com/", False, "not a valid DNS", id="leading-dot"),
    # --- IP literals ---------------------------------------------------------------------
    pytest.param("https://127.0.0.1/", False, "IP address", id="ipv4-dotted"),
    pytest.param("https://2130706433/", False, "IP address", id="ipv4-decimal"),
    pytest.param("https://0x7f.0.0.1/", False, "IP address", id="ipv4-hex-octet"),
    pytest.param("https://0x7f000001/", False, "IP address", id="ipv4-hex"),
    pytest.param("https://0177.0.0.1/", False, "IP address", id="ipv4-octal"),
    pytest.param("https://127.1/", False, "IP address", id="ipv4-short"),
    pytest.param("https://127.0.0.1.:443/", False, "IP address", id="ipv4-trailing-dot"),
    pytest.param("https://[::1]/", False, "IP address", id="ipv6-loopback"),
    pytest.param("https://[::ffff:127.0.0.1]/", False, "IP address", id="ipv6-mapped-v4"),
    pytest.param("https://a.partner.123/", False, "IP address", id="numeric-last-label"),
    pytest.param("https://\uff11\uff12\uff17.0.0.1/", False, "IP address", id="full-width-digits"),
    # --- ports ---------------------------------------------------------------------------
    pytest.param("https://app.example.com:8443/", False, "port 8443 is not allowed", id="port"),
    pytest.param(
        "https://ports.example.com/", False, "port 443 is not allowed", id="port-only-listed"
    ),
    pytest.param(
        "https://a.partner.example:8443/", False, "port 8443 is not allowed", id="wildcard-port"
    ),
    pytest.param("https://app.example.com:99999/", False, "port", id="port-out-of-range"),
    pytest.param("https://app.example.com:0/", False, "port", id="port-zero"),
    pytest.param("https://app.example.com:abc/", False, "port", id="port-not-numeric"),
    pytest.param("https://app.example.com:/", False, "port", id="port-empty"),
    pytest.param("https://app.example.com:+443/", False, "port", id="port-with-sign"),
    pytest.param("https://app.example.com:443:443/", False, "more than one", id="two-ports"),
    # --- control characters, whitespace, backslashes -------------------------------------
    pytest.param("https://app.example.com\t/", False, "whitespace", id="tab"),
    pytest.param("https://app.exa\tmple.com/", False, "whitespace", id="tab-inside-host"),
    pytest.param("https://app.example.com/\r\nX-Evil: 1", False, "whitespace", id="crlf"),
    pytest.param("https://app.example.com/\n", False, "whitespace", id="trailing-newline"),
    pytest.param(" https://app.example.com/", False, "whitespace", id="leading-space"),
    pytest.param("https://app.exa\x00mple.com/", False, "control", id="nul"),
    pytest.param("https://app.example.com/\x7f", False, "control", id="del"),
    pytest.param("https://app.example.com/\x85", False, "control", id="c1-control"),
    pytest.param("https://app.example.com\u00a0/", False, "whitespace", id="nbsp"),
    pytest.param("https://app.example.com/\u202egnp.exe", False, "invisible", id="bidi-override"),
    pytest.param("https://app.ex\u00adample.com/", False, "invisible", id="soft-hyphen"),
    pytest.param("https://app.example.com\\@evil.com/", False, "backslash", id="backslash-at"),
    pytest.param("https:\\\\app.example.com/", False, "backslash", id="backslash-slashes"),
    # --- host encoding -------------------------------------------------------------------
    pytest.param("https://app%2Eexample.com/", False, "percent-encoded", id="percent-dot"),
    pytest.param("https://%61pp.example.com/", False, "percent-encoded", id="percent-letter"),
    pytest.param("https://xn--zz.partner.example/", False, "not a valid DNS", id="bad-punycode"),
    pytest.param("https://under_score.partner.example/", False, "not a valid DNS", id="underscore"),
    pytest.param("https://-x.partner.example/", False, "not a valid DNS", id="leading-hyphen"),
    pytest.param("https://a;b.partner.example/", False, "not a valid DNS", id="semicolon"),
    pytest.param(
        "https://evil\u3002partner.example/", False, "not a valid DNS", id="ideographic-dot"
    ),
    pytest.param("https://app.example.com\uff0e/", False, "not a valid DNS", id="fullwidth-dot"),
    pytest.param(
        "https://\uff41pp.example.com/", False, "only some clients", id="fullwidth-letter"
    ),
    pytest.param("https://[app.example.com]/", False, "IP address", id="bracketed-name"),
    pytest.param(
        "https://evil.com\uff0fapp.example.com/", False, "could not be parsed", id="nfkc-slash"
    ),
]


@pytest.mark.parametrize(("url", "allowed", "reason_part"), URL_CASES)
def test_url_verdicts(url: str, allowed: bool, reason_part: str | None) -> None:
    refusal = ALLOW.check_url(url)
    if allowed:
        assert refusal is None
        return
    assert refusal is not None
    assert refusal.code == "url_not_allowed"
    assert refusal.field == "context.url"
    assert reason_part is not None
    assert reason_part in refusal.reason


def test_at_least_35_url_cases_are_covered() -> None:
    assert len(URL_CASES) >= 35


@pytest.mark.parametrize("value", [None, 42, b"https://app.example.com/", ["x"]])
def test_non_string_url_is_refused_not_raised(value: object) -> None:
    refusal = ALLOW.check_url(value)  # type: ignore[arg-type]
    assert refusal is not None
    assert "must be a string" in refusal.reason


def test_userinfo_cannot_smuggle_another_host() -> None:
    for url in (
        "https://app.example.com@evil.com/",
        "https://app.example.com:pw@evil.com/",
        "https://evil.com@app.example.com/",
        "https://a@b@app.example.com/",
    ):
        assert ALLOW.check_url(url) is not None, url


def test_refusal_reason_never_echoes_credentials_or_path() -> None:
    refusal = ALLOW.check_url("https://admin:hunter2@evil.com/secret-token")
    assert refusal is not None
    assert "hunter2" not in refusal.reason
    assert "secret-token" not in refusal.reason


def test_refusal_reason_names_normalised_host() -> None:
    refusal = ALLOW.check_url("https://EVIL.example/")
    assert refusal is not None
    assert "evil.example" in refusal.reason


# --- templates ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template_id", "allowed"),
    [
        pytest.param("welcome", True, id="listed"),
        pytest.param("expense-approved", True, id="listed-with-hyphen"),
        pytest.param("Welcome", False, id="case-sensitive"),
        pytest.param("WELCOME", False, id="upper-case"),
        pytest.param(" welcome", False, id="leading-space-not-trimmed"),
        pytest.param("welcome ", False, id="trailing-space-not-trimmed"),
        pytest.param("welcome\n", False, id="newline-not-trimmed"),
        pytest.param("expense_approved", False, id="underscore-vs-hyphen"),
        pytest.param("welcom", False, id="prefix"),
        pytest.param("welcome*", False, id="no-wildcards"),
        pytest.param("", False, id="empty"),
    ],
)
def test_template_must_match_exactly(template_id: str, allowed: bool) -> None:
    refusal = ALLOW.check_template(template_id)
    if allowed:
        assert refusal is None
    else:
        assert refusal == Refusal(
            code="template_not_allowed",
            field="templateId",
            reason="the template is not on the allow-list",
        )


def test_template_refusal_does_not_echo_the_id() -> None:
    refusal = ALLOW.check_template("<script>")
    assert refusal is not None
    assert "<script>" not in refusal.reason


# --- check() -----------------------------------------------------------------------------


def test_check_reports_both_refusals_template_first() -> None:
    refusals = ALLOW.check("nope", "http://evil.com/")
    assert [(r.code, r.field) for r in refusals] == [
        ("template_not_allowed", "templateId"),
        ("url_not_allowed", "context.url"),
    ]


def test_check_allows_good_template_and_url() -> None:
    assert ALLOW.check("welcome", "https://x.partner.example/a") == []


def test_check_without_url_only_checks_template() -> None:
    assert ALLOW.check("welcome", None) == []
    assert [r.code for r in ALLOW.check("nope", None)] == ["template_not_allowed"]


def test_check_treats_empty_url_as_a_url_not_as_absent() -> None:
    assert [r.code for r in ALLOW.check("welcome", "")] == ["url_not_allowed"]


# --- building the allow-list -------------------------------------------------------------


def test_entries_are_normalised_into_hosts_and_suffixes() -> None:
    allow = AllowList.from_entries(
        ["t"],
        ["APP.Example.COM.", "*.Partner.Example:8443", "bücher.example", "x.example:443"],
    )
    assert allow.templates == frozenset({"t"})
    assert allow.hosts == frozenset(
        {("app.example.com", 443), ("xn--bcher-kva.example", 443), ("x.example", 443)}
    )
    assert allow.suffixes == frozenset({(".partner.example", 8443)})


@pytest.mark.parametrize(
    "entry",
    [
        "*",
        "*.com",
        "*.com:x",
        "*.",
        "*.*.example.com",
        "a.*.example.com",
        "exa*mple.com",
        "*example.com",
        "https://example.com",
        "example.com/path",
        "example.com?x",
        "user@example.com",
        "@example.com",
        "127.0.0.1",
        "10.0.0.1:8443",
        "2130706433",
        "[::1]",
        "::1",
        "example.com:",
        "example.com:0",
        "example.com:65536",
        "example.com:+443",
        "example.com:44:3",
        "",
        " example.com",
        "example.com\n",
        "example..com",
        "example%2Ecom",
        "under_score.example",
        "example\\com",
    ],
)
def test_invalid_domain_entry_raises_naming_the_entry(entry: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"{entry!r} is not a valid domain entry")):
        AllowList.from_entries(["welcome"], ["app.example.com", entry])


def test_invalid_template_entry_raises() -> None:
    with pytest.raises(ValueError, match="''"):
        AllowList.from_entries([""], [])


def test_a_bare_string_is_not_accepted_as_a_collection() -> None:
    with pytest.raises(ValueError, match="welcome"):
        AllowList.from_entries("welcome", [])
    with pytest.raises(ValueError, match=re.escape("app.example.com")):
        AllowList.from_entries([], "app.example.com")


def test_empty_allow_list_allows_nothing() -> None:
    empty = AllowList.from_entries([], [])
    assert empty.check_url("https://app.example.com/") is not None
    assert empty.check_template("welcome") is not None


# --- normalise_host ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("Example.COM", "example.com"),
        ("example.com.", "example.com"),
        ("Bücher.Example", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ],
)
def test_normalise_host_lowercases_encodes_and_strips_one_dot(host: str, expected: str) -> None:
    assert normalise_host(host) == expected


@pytest.mark.parametrize(
    "host", ["", ".", "example.com..", "a_b.example", "127.0.0.1", "x" * 64 + ".com", "a b.com"]
)
def test_normalise_host_rejects_invalid_names(host: str) -> None:
    with pytest.raises(ValueError):
        normalise_host(host)


# --- properties --------------------------------------------------------------------------

_label = st.from_regex(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,8}[a-zA-Z0-9])?", fullmatch=True)
_hosts = st.one_of(
    domains(),
    st.sampled_from(
        [
            "app.example.com",
            "APP.example.com",
            "ports.example.com",
            "partner.example",
            "bücher.example",
            "BÜCHER.example",
            "xn--bcher-kva.example",
            "evil.com",
            "127.0.0.1",
            "[::1]",
        ]
    ),
    st.builds(lambda labels: ".".join([*labels, "partner.example"]), st.lists(_label, max_size=3)),
    st.builds(lambda a, b: a + b, _label, st.sampled_from(["app.example.com", "partner.example"])),
    st.builds(
        lambda a, b: a + b, st.sampled_from(["app.example.com.", "x.partner.example."]), domains()
    ),
)
_userinfo = st.sampled_from(["", "", "", "user@", "u:p@", "app.example.com@", "@", "x.com:443@"])
_ports = st.sampled_from(["", "", ":443", ":8443", ":80", ":0443", ":65536"])
_tails = st.sampled_from(["", "/", "/a?b=c#d", "/@evil.com", "?@evil.com", "#@evil.com", "."])


@st.composite
def _urls(draw: st.DrawFn) -> str:
    scheme = draw(st.sampled_from(["https", "HTTPS", "https", "http"]))
    host = draw(_hosts)
    if draw(st.booleans()):
        host = host.upper()
    if draw(st.booleans()):
        host += "."
    return f"{scheme}://{draw(_userinfo)}{host}{draw(_ports)}{draw(_tails)}"


def _independently_listed(url: str) -> bool:
    parsed = httpx.URL(url)
    assert parsed.scheme == "https"
    assert parsed.userinfo == b""
    host = parsed.raw_host.decode("ascii").lower()
    if host.endswith("."):
        host = host[:-1]
    port = parsed.port if parsed.port is not None else 443
    if (host, port) in EXPECTED_EXACT:
        return True
    return any(host.endswith("." + s) and port == p for s, p in EXPECTED_SUFFIXES)


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(_urls())
@example("https://app.example.com/")
@example("https://x.y.partner.example:443/")
@example("https://BÜCHER.example./")
def test_allowed_url_host_is_listed_per_an_independent_parser(url: str) -> None:
    if ALLOW.check_url(url) is None:
        assert _independently_listed(url), url


@settings(max_examples=300)
@given(st.text(max_size=300))
def test_check_url_never_raises_on_arbitrary_text(text: str) -> None:
    result = ALLOW.check_url(text)
    assert result is None or isinstance(result, Refusal)


@settings(max_examples=300)
@given(st.from_regex(r"https://[^/?#]{0,40}(/[ -~]{0,20})?", fullmatch=True))
def test_odd_authorities_never_allowed_unless_independently_listed(url: str) -> None:
    if ALLOW.check_url(url) is None:
        assert _independently_listed(url), url


# --- characters not valid in a URI after the authority (issue 11, item 5) ------------------------


@pytest.mark.parametrize(
    "tail",
    [
        '/"',
        "/<",
        "/>",
        "/`",
        "/{",
        "/}",
        "/|",
        "/^",
        "/[",
        "/]",
        "/caf\u00e9",
        "?q=\u00e9",
        "#\u00e9",
        "?q=a|b",
        "#frag{x}",
        "/p#a#b",
        "/100%",
        "/%zz",
        "/%4",
    ],
)
def test_characters_not_valid_in_a_uri_are_refused_after_the_host(tail: str) -> None:
    refusal = ALLOW.check_url("https://app.example.com" + tail)
    assert refusal is not None
    assert refusal.code == "url_not_allowed"
    assert "URI" in refusal.reason or "%" in refusal.reason


def test_a_space_is_refused_too() -> None:
    refusal = ALLOW.check_url("https://app.example.com/a b")
    assert refusal is not None and "whitespace" in refusal.reason


@pytest.mark.parametrize(
    "tail",
    [
        "/caf%C3%A9",
        "/a%20b?q=%7B%7D&r=%7c#x%5E",
        "/p;x=1/q:r@s!$&'()*+,=-._~",
        "?next=https://app.example.com/x?y=1",
        "#/route?x=1/y",
    ],
)
def test_percent_encoded_and_rfc3986_characters_pass(tail: str) -> None:
    assert ALLOW.check_url("https://app.example.com" + tail) is None


def test_refusal_of_a_non_uri_character_does_not_echo_the_url() -> None:
    refusal = ALLOW.check_url("https://app.example.com/secret-token/<x>")
    assert refusal is not None
    assert "secret-token" not in refusal.reason and "'<'" in refusal.reason


# -- entries that would open the list to anyone (issue 11, "Also") -------------------------------


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        ("localhost", "localhost"),
        ("*.localhost", "localhost"),
        ("app.localhost:8443", "localhost"),
        ("127.0.0.1", "IP addresses"),
        ("10.0.0.1:8443", "IP addresses"),
        ("[::1]", "bare host name"),
        ("*.co.uk", "public suffix"),
        ("co.uk", "public suffix"),
        ("*.com", "two labels"),
        ("com", "public suffix"),
        ("*.github.io", "public suffix"),  # the list's private section: anyone's Pages site
        ("*.xn--80ao21a.xn--p1ai", None),  # a registrable IDN base is fine
    ],
)
def test_entries_naming_localhost_an_ip_or_a_public_suffix_are_refused(entry, why):
    if why is None:
        AllowList.from_entries([], [entry])
        return
    with pytest.raises(ValueError, match=re.escape(repr(entry))) as error:
        AllowList.from_entries([], [entry])
    assert why in str(error.value)


def test_a_public_suffix_entry_stops_start_up_naming_the_setting_and_the_entry():
    from worker.runtime import make_allowlist
    from worker.settings import SettingsError, load_settings

    settings = load_settings(allowed_url_domains="app.example.com,*.co.uk")
    with pytest.raises(SettingsError, match=r"^NOTIFY_ALLOWED_URL_DOMAINS: '\*\.co\.uk'"):
        make_allowlist(settings)
    # What the entry would have let through: any site registered under .co.uk.
    allowed = AllowList.from_entries([], ["*.example.co.uk"])
    assert allowed.check_url("https://shop.example.co.uk/x") is None
    assert allowed.check_url("https://attacker.co.uk/x") is not None
