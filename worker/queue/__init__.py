"""The Celery queue: the wire format of a send task (``envelopes``), the one publish path
(``publisher``), the Celery configuration (``config``) and kombu's Redis transport, adjusted
(``broker``).
"""

from __future__ import annotations

from worker.queue.envelopes import Envelope
from worker.queue.publisher import Publisher

__all__ = ["Envelope", "Publisher"]
