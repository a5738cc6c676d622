"""Keys too weak to be bearer secrets stop start-up (issue 23, item 8): the rule is at least
``MIN_KEY_DISTINCT`` distinct characters and length x log2(distinct) >= ``MIN_KEY_BITS``."""

from __future__ import annotations

import secrets
import uuid

import pytest

from worker.settings import MIN_KEY_BITS, SettingsError, key_bits, key_weakness, load_settings

WEAK = [
    "aaaaaaaaaaaaaaaa",  # one character
    "abababababababab",  # a short cycle
    "abcdabcdabcdabcd",  # four distinct characters
    "0000000000000001",
    "password" * 2,  # 6 distinct letters
]


@pytest.mark.parametrize("key", WEAK)
def test_a_weak_operator_key_stops_start_up_without_quoting_it(key):
    with pytest.raises(
        SettingsError, match="NOTIFY_OPERATOR_KEYS: a key has too little entropy"
    ) as error:
        load_settings(operator_keys=key)
    assert key not in str(error.value)


@pytest.mark.parametrize("key", WEAK)
def test_a_weak_gateway_key_stops_start_up_whatever_the_partner_name(key):
    with pytest.raises(
        SettingsError, match="NOTIFY_GATEWAY_KEYS: a key has too little entropy"
    ) as error:
        load_settings(gateway_keys=f"acme-partner-inc:{key}")
    assert key not in str(error.value)


@pytest.mark.parametrize(
    "key",
    [
        secrets.token_urlsafe(16),
        secrets.token_hex(16),
        uuid.uuid4().hex,
        "operator-key-0123456789abcdef",
        "bench-operator-key-0001",
    ],
)
def test_random_keys_of_the_usual_makes_are_accepted(key):
    assert key_weakness(key) is None
    assert load_settings(operator_keys=key, gateway_keys=f"acme:{key}x").operator_keys


def test_the_estimate_is_length_times_log2_of_the_distinct_characters():
    assert key_bits("a" * 40) == 0
    assert key_bits("0123456789abcdef") == 16 * 4 == MIN_KEY_BITS
    assert key_weakness("0123456789abcdef") is None
    assert key_weakness("0123456789abcde") is not None  # 15 characters: too short anyway
