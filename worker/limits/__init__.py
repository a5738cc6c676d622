"""What holds posts back for everyone: the fleet-wide circuit breaker (``breaker``) and the
global rate limit (``ratelimit``), both kept in Redis.
"""

from __future__ import annotations

from worker.limits.breaker import Breaker, BreakerPolicy
from worker.limits.ratelimit import RateLimiter, RateLimitPolicy

__all__ = ["Breaker", "BreakerPolicy", "RateLimitPolicy", "RateLimiter"]
