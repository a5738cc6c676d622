"""Stored numbers and times, read one way: epoch milliseconds and counters as Redis hands them back.

Redis returns every field as text (``"1764090760118"``, ``"200"``, ``""``); what an operator sees
is UTC ISO-8601. One reader and one formatter serve the HTTP service, the CLI, the console and
the notifications-by-status documents.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any


def int_or_none(value: Any) -> int | None:
    """A stored number as an int (``"200"``, ``"1.7e12"``), or None when absent or not one."""
    if value is None or value == "" or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if math.isfinite(number) else None


def iso_utc(ms: Any, *, millis: bool = False) -> str | None:
    """Epoch milliseconds as ``2026-11-25T17:12:40Z`` (``.118Z`` with ``millis``); None for
    no time (absent, not a number, or not after the epoch)."""
    number = int_or_none(ms)
    if number is None or number <= 0:
        return None
    moment = datetime.fromtimestamp(number / 1000, UTC)
    if millis:
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{number % 1000:03d}Z"
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
