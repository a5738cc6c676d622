"""Whose is a key: a partner's key never opens the operator endpoints, and no key is the
unkeyed producers' (issue 23, item 9). Pure: settings only."""

from __future__ import annotations

import uuid

import pytest

from worker.settings import SettingsError, load_settings
from worker.shapes.models import BARE_KEY_PARTNER, DEFAULT_PARTNER, message_id


def _key() -> str:
    return "key-" + uuid.uuid4().hex


@pytest.mark.parametrize("shape", ["named", "bare"])
def test_a_key_in_both_the_gateway_and_the_operator_lists_stops_start_up(shape):
    shared, other = _key(), _key()
    gateway = f"acme:{shared},beta:{other}" if shape == "named" else f"{shared},beta:{other}"
    with pytest.raises(SettingsError) as error:
        load_settings(gateway_keys=gateway, operator_keys=f"{_key()},{shared}")
    message = str(error.value)
    assert message.startswith("NOTIFY_OPERATOR_KEYS: a key of NOTIFY_GATEWAY_KEYS is an operator")
    partner = "acme" if shape == "named" else BARE_KEY_PARTNER
    assert repr(partner) in message and "'beta'" not in message
    assert shared not in message and other not in message


def test_distinct_gateway_and_operator_keys_are_accepted():
    partner, operator = _key(), _key()
    settings = load_settings(gateway_keys=f"acme:{partner}", operator_keys=operator)
    assert [name for name, _ in settings.gateway_partners] == ["acme"]


def test_a_bare_key_names_a_partner_of_its_own_not_the_unkeyed_producers():
    bare = _key()
    settings = load_settings(gateway_keys=bare)
    [(partner, key)] = settings.gateway_partners
    assert partner == BARE_KEY_PARTNER != DEFAULT_PARTNER and key.get_secret_value() == bare
    # Its messages' ids are not those of the same request from `notify send`.
    assert message_id("u", "s", "t", partner) != message_id("u", "s", "t")


def test_no_key_may_name_the_unkeyed_producers_partner():
    key = _key()
    with pytest.raises(SettingsError, match="NOTIFY_GATEWAY_KEYS: partner 'default'") as error:
        load_settings(gateway_keys=f"acme:{_key()},default:{key}")
    assert key not in str(error.value)
