"""How messages come in: the producer helpers partners call (``producer``: validate, record,
queue) and the gateway's grouped recording (``intake``).
"""

from __future__ import annotations

from worker.intake.producer import Enqueued, enqueue, enqueue_many, submit

__all__ = ["Enqueued", "enqueue", "enqueue_many", "submit"]
