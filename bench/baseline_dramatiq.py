"""The bare Dramatiq worker a user might write instead: one actor, one shared ``httpx.Client``.

Run by ``bench/run.py`` as ``dramatiq baseline_dramatiq --processes 2 --threads 64`` against the
same sandbox and Redis. No validation, no idempotency, no dead letters: Dramatiq's own retries
(its ``Retries`` middleware) on any HTTP error.
"""

from __future__ import annotations

import os

import dramatiq
import httpx
from dramatiq.brokers.redis import RedisBroker

broker = RedisBroker(url=os.environ["BASELINE_REDIS_URL"], namespace="dramatiq-baseline")
dramatiq.set_broker(broker)

API = os.environ.get("BASELINE_API_URL", "http://127.0.0.1:8099/notifications/v4")
TOKEN = os.environ.get("BASELINE_TOKEN", "sandbox-token")
client = httpx.Client(
    timeout=30,
    limits=httpx.Limits(max_connections=200, max_keepalive_connections=200),
)


@dramatiq.actor(max_retries=7, min_backoff=1000, max_backoff=300_000)
def send(user_id: str, session_id: str, template_id: str, url: str | None = None) -> None:
    """Post one message; raise (and so retry) on any HTTP error status."""
    body = {"sessionId": session_id, "templateId": template_id, "context": {"url": url}}
    response = client.post(
        f"{API}/messages/{user_id}/session",
        json=body,
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    response.raise_for_status()
