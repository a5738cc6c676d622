"""Every Redis key this product writes, named in one place (as arq's ``constants.py``).

``notify:msg:{id}``            hash: the message's status record (request, state, generation)
``notify:msg:{id}:attempts``   list: one JSON entry per delivery attempt
``notify:schedule``            sorted set: id -> when the message must next be attempted
``notify:dead:{id}``           hash: one dead letter
``notify:dead``                sorted set: dead-letter id -> when it was dead-lettered (ms)
``notify:stats:*``             counters for operators

Celery's own broker keys (the queue list, ``unacked``) are Celery's and not listed here.
"""

from __future__ import annotations

PREFIX = "notify"

SCHEDULE = f"{PREFIX}:schedule"
DEAD_INDEX = f"{PREFIX}:dead"
STATS = f"{PREFIX}:stats"
DELIVERED_PER_MINUTE = f"{PREFIX}:stats:delivered"


def message(message_id: str) -> str:
    """The status record of one message."""
    return f"{PREFIX}:msg:{message_id}"


def attempts(message_id: str) -> str:
    """The attempt history of one message."""
    return f"{PREFIX}:msg:{message_id}:attempts"


def dead_letter(message_id: str) -> str:
    """One dead letter."""
    return f"{PREFIX}:dead:{message_id}"
