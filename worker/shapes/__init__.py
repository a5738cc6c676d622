"""The shapes every part shares, pure: the seed's request and the message (``models``), the
HTTP service's answers (``contract``) and how times are written (``times``). No I/O.
"""

from __future__ import annotations

from worker.shapes.models import Message, SendRequest, message_id
from worker.shapes.times import iso_utc

__all__ = ["Message", "SendRequest", "iso_utc", "message_id"]
