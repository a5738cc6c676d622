"""Outcome webhooks, the pure parts: Standard Webhooks signatures against the published vectors,
the endpoint guard's decisions (with an injected resolver), event types and bodies."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import time
from collections.abc import Sequence

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from worker.rules.endpoints import EndpointRefused, address_refusal, check_url
from worker.store.webhooks import (
    DEFAULT_EVENTS,
    DELIVERED,
    EXPIRED,
    FAILED,
    Event,
    new_secret,
    parse_events,
)
from worker.webhooks import signing
from worker.webhooks.guard import resolve

# The vector the Standard Webhooks reference libraries share (standard-webhooks/standard-webhooks:
# libraries/python/tests/test_webhooks.py test_sign_function, libraries/go/webhook_test.go
# TestWebhookSign, libraries/javascript/src/webhook.test.ts): secret, id, timestamp, payload and
# the signature they must give.
VECTOR_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
VECTOR_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_TIMESTAMP = 1614265330
VECTOR_PAYLOAD = '{"test": 2432232314}'
VECTOR_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

# The spec's own example (spec/standard-webhooks.md, "Signature scheme" and "Webhook headers"):
# the signed content for this id, timestamp and minified payload. The spec publishes no secret
# for its example signature, so that signature cannot be reproduced; its content can.
SPEC_ID = "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W"
SPEC_TIMESTAMP = 1674087231
SPEC_PAYLOAD = (
    '{"type":"contact.created","timestamp":"2022-11-03T20:26:10.344522Z",'
    '"data":{"id":"1f81eb52-5198-4599-803e-771906343485"}}'
)


def test_the_reference_vector_signs_as_published() -> None:
    assert (
        signing.signature_header([VECTOR_SECRET], VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_PAYLOAD)
        == VECTOR_SIGNATURE
    )


def test_the_spec_example_signs_id_dot_timestamp_dot_body() -> None:
    # The spec's algorithm by hand: HMAC-SHA256 over "msg_id.timestamp.payload", base64, "v1,".
    secret = new_secret()
    key = base64.b64decode(secret.removeprefix("whsec_"))
    content = f"{SPEC_ID}.{SPEC_TIMESTAMP}.{SPEC_PAYLOAD}".encode()
    expected = "v1," + base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()
    assert signing.signature_header([secret], SPEC_ID, SPEC_TIMESTAMP, SPEC_PAYLOAD) == expected


def test_the_packages_verifier_accepts_our_headers_and_refuses_a_changed_body() -> None:
    secret = new_secret()
    now = int(time.time())
    headers = signing.headers([secret], "evt_1", now, SPEC_PAYLOAD)
    assert Webhook(secret).verify(SPEC_PAYLOAD, headers)["type"] == "contact.created"
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(SPEC_PAYLOAD.replace("created", "deleted"), headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(SPEC_PAYLOAD, headers)


def test_rotation_signs_with_both_secrets_and_either_verifies() -> None:
    new, old = new_secret(), new_secret()
    now = int(time.time())
    headers = signing.headers([new, old], "evt_2", now, SPEC_PAYLOAD)
    parts = headers["webhook-signature"].split(" ")
    assert len(parts) == 2 and all(part.startswith("v1,") for part in parts)
    assert parts[0] == signing.signature_header([new], "evt_2", now, SPEC_PAYLOAD)
    assert parts[1] == signing.signature_header([old], "evt_2", now, SPEC_PAYLOAD)
    for secret in (new, old):
        Webhook(secret).verify(SPEC_PAYLOAD, headers)


def test_new_secrets_have_the_spec_form() -> None:
    secret = new_secret()
    assert signing.is_secret(secret)
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) == 32
    assert secret != new_secret()
    assert not signing.is_secret("whsec_" + base64.b64encode(b"x" * 10).decode())


# -- the endpoint guard --------------------------------------------------------------------------


def resolver_of(table: dict[str, Sequence[str]]):  # type: ignore[no-untyped-def]
    """A resolver answering from ``table`` (the tests decide what a name resolves to)."""

    def answer(host: str, port: int) -> Sequence[str]:
        if host not in table:
            raise OSError(f"{host}: name does not resolve")
        return table[host]

    return answer


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://hooks.example.com/in", "scheme"),
        ("ftp://hooks.example.com/in", "scheme"),
        ("https://user:pw@hooks.example.com/in", "url"),
        ("https://hooks.example.com/in#frag", "url"),
        ("https:///in", "url"),
        ("https://hooks example.com/", "url"),
        ("https://hooks.example.com:0/", "url"),
        ("https://hooks.example.com:99999/", "url"),
        ("https://127.0.0.1/in", "address"),
        ("https://169.254.169.254/latest/meta-data", "address"),
        ("https://[fd00:ec2::254]/", "address"),
        ("https://10.1.2.3/", "address"),
        ("https://100.64.0.1/", "address"),
        ("https://[::ffff:127.0.0.1]/", "address"),
        ("https://224.0.0.1/", "address"),
        ("http://127.0.0.1:8080/in", "scheme"),
        ("http://localhost:8080/in", "scheme"),
    ],
)
def test_urls_refused(url: str, reason: str) -> None:
    with pytest.raises(EndpointRefused) as refused:
        check_url(url, allow_private=False)
    assert refused.value.reason == reason


def test_urls_taken() -> None:
    endpoint = check_url("https://Hooks.Example.com/in?x=1", allow_private=False)
    assert (endpoint.host, endpoint.port, endpoint.name) == (
        "hooks.example.com",
        443,
        "hooks.example.com",
    )
    assert check_url("https://hooks.example.com:8443/", allow_private=False).name == (
        "hooks.example.com:8443"
    )
    # A developer's loopback receiver, only with the setting on.
    assert check_url("http://127.0.0.1:8080/in", allow_private=True).port == 8080
    assert check_url("http://localhost:8080/in", allow_private=True).scheme == "http"
    # http:// stays refused off loopback even then.
    with pytest.raises(EndpointRefused):
        check_url("http://10.0.0.5/in", allow_private=True)


@pytest.mark.parametrize(
    ("address", "allowed", "allowed_private"),
    [
        ("93.184.216.34", True, True),
        ("2606:2800:220:1:248:1893:25c8:1946", True, True),
        ("127.0.0.1", False, True),
        ("::1", False, True),
        ("10.0.0.1", False, True),
        ("172.16.5.4", False, True),
        ("192.168.1.1", False, True),
        ("100.64.3.2", False, True),
        ("fd12:3456::1", False, True),
        ("169.254.169.254", False, False),
        ("169.254.1.1", False, False),
        ("fd00:ec2::254", False, False),
        ("fe80::1", False, False),
        ("224.0.0.251", False, False),
        ("ff02::1", False, False),
        ("0.0.0.0", False, False),
        ("::", False, False),
        ("255.255.255.255", False, False),
        ("240.0.0.1", False, False),
        ("::ffff:169.254.169.254", False, False),
        ("::ffff:10.0.0.1", False, True),
        ("64:ff9b::a9fe:a9fe", False, False),  # NAT64 of 169.254.169.254
        ("2002:a9fe:a9fe::1", False, False),  # 6to4 of 169.254.169.254
    ],
)
def test_address_decisions(address: str, allowed: bool, allowed_private: bool) -> None:
    ip = ipaddress.ip_address(address)
    assert (address_refusal(ip, allow_private=False) is None) is allowed
    assert (address_refusal(ip, allow_private=True) is None) is allowed_private


def test_a_name_resolving_to_loopback_or_metadata_is_refused() -> None:
    resolver = resolver_of(
        {
            "loop.example.com": ["127.0.0.1"],
            "meta.example.com": ["169.254.169.254"],
            "rebind.example.com": ["93.184.216.34", "10.0.0.7"],
            "good.example.com": ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"],
        }
    )
    for host in ("loop", "meta", "rebind"):
        with pytest.raises(EndpointRefused) as refused:
            resolve(f"https://{host}.example.com/in", allow_private=False, resolver=resolver)
        assert refused.value.reason == "address"
    with pytest.raises(EndpointRefused) as refused:
        resolve("https://nowhere.example.com/in", allow_private=False, resolver=resolver)
    assert refused.value.reason == "address"
    # The metadata address stays refused with private addresses allowed.
    with pytest.raises(EndpointRefused):
        resolve("https://meta.example.com/in", allow_private=True, resolver=resolver)
    target = resolve("https://good.example.com/in", allow_private=False, resolver=resolver)
    assert target.address == "93.184.216.34"  # pinned: the post connects to this address
    assert target.endpoint.host == "good.example.com"
    loop = resolve("https://loop.example.com/in", allow_private=True, resolver=resolver)
    assert loop.address == "127.0.0.1"


def test_an_ip_literal_is_not_resolved() -> None:
    def never(host: str, port: int) -> Sequence[str]:
        raise AssertionError("an address literal is not resolved")

    assert resolve("https://93.184.216.34/in", allow_private=False, resolver=never).address == (
        "93.184.216.34"
    )


# -- event types and bodies ----------------------------------------------------------------------


def test_event_types() -> None:
    assert parse_events(None) == DEFAULT_EVENTS == (FAILED, EXPIRED)
    assert parse_events("") == DEFAULT_EVENTS
    assert parse_events("message.delivered, message.failed") == (FAILED, DELIVERED)
    with pytest.raises(ValueError, match=r"message\.bounced"):
        parse_events("message.failed,message.bounced")


def test_event_bodies() -> None:
    failed = Event.from_fields(
        "evt_1",
        {
            "type": FAILED,
            "msg": "m1",
            "partner": "acme",
            "company": "default",
            "at": "1764090760118",
            "state": "pending",
            "n": "0",
            "reason": "api_rejected",
            "status": "400",
            "errors": json.dumps([{"errorCode": "BAD"}]),
            "attempts": "1",
        },
    )
    assert json.loads(failed.body()) == {
        "type": "message.failed",
        "timestamp": "2025-11-25T17:12:40.118Z",
        "data": {
            "id": "m1",
            "partner": "acme",
            "company": "default",
            "reason": "api_rejected",
            "status": 400,
            "errors": [{"errorCode": "BAD"}],
            "attempts": 1,
        },
    }
    assert failed.body() == failed.body()  # the same bytes at every attempt
    delivered = Event.from_fields(
        "evt_2", {"type": DELIVERED, "msg": "m2", "partner": "acme", "at": "1764090760118"}
    )
    assert set(json.loads(delivered.body())["data"]) == {"id", "partner", "company"}
