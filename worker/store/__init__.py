"""The message store: every Redis key (``keys``), every Redis client (``redisclient``), the
status records, fencing and schedule (``records``, their Lua in ``lua/``), the stored form and
the values read from it (``codec``), the dead letters (``deadletters``) and which of them a
person means (``query``), and the durable history in PostgreSQL (``history``).
"""

from __future__ import annotations

from worker.store.codec import DeadLetter, StatusRecord
from worker.store.deadletters import DeadLetterStore
from worker.store.query import DeadLetterFilter, parse_time, read_filter
from worker.store.records import MessageStore, ReplicaWait
from worker.store.redisclient import make_redis

__all__ = [
    "DeadLetter",
    "DeadLetterFilter",
    "DeadLetterStore",
    "MessageStore",
    "ReplicaWait",
    "StatusRecord",
    "make_redis",
    "parse_time",
    "read_filter",
]
