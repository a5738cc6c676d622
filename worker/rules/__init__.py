"""The pure decisions: the allow-list (a security boundary), request validation, what an
attempt's answer means (``outcomes.classify``) and the retry policies as data. No I/O.
"""

from __future__ import annotations

from worker.rules.allowlist import AllowList
from worker.rules.outcomes import classify
from worker.rules.retries import RedisPatience, RetryPolicy
from worker.rules.validation import InvalidRequest, validate

__all__ = ["AllowList", "InvalidRequest", "RedisPatience", "RetryPolicy", "classify", "validate"]
