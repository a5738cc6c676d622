"""The message store: every Redis key (``keys``), every Redis client (``redisclient``), the
status records, fencing and schedule (``records``), the dead letters (``deadletters``) and the
durable history in PostgreSQL (``history``).
"""

from __future__ import annotations

from worker.store.deadletters import DeadLetterFilter, DeadLetterStore
from worker.store.records import MessageStore
from worker.store.redisclient import make_redis

__all__ = ["DeadLetterFilter", "DeadLetterStore", "MessageStore", "make_redis"]
