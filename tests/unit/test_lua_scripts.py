"""The store's Lua, shipped as files and put together the one way every script is (pure)."""

from __future__ import annotations

from worker.store import keys
from worker.store.records import SCRIPTS, script_source


def test_every_script_is_its_helpers_then_its_own_file() -> None:
    helpers = script_source("create").split("-- KEYS:")[0]
    assert "local function request_json(record)" in helpers
    for name in SCRIPTS:
        text = script_source(name)
        assert text.startswith(helpers), name
        assert "@PARTNER_STATS@" not in text, name


def test_the_gauges_count_by_partner_under_the_partner_stats_key() -> None:
    assert f"'{keys.partner_stats('')}' .. partner" in script_source("claim")
