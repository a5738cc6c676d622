"""The baseline a user would otherwise write: a plain Celery task, a shared ``httpx.Client``,
``autoretry_for`` with Celery's backoff, on a ``--pool threads`` worker. No validation, no
idempotency, no dead letters. Run by ``bench/run.py`` against the same sandbox and Redis.
"""

from __future__ import annotations

import os

import httpx
from celery import Celery

app = Celery("baseline", broker=os.environ["BASELINE_REDIS_URL"])
app.conf.update(
    task_default_queue="baseline",
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    worker_send_task_events=True,
    task_send_sent_event=True,
)

API = os.environ.get("BASELINE_API_URL", "http://127.0.0.1:8099/notifications/v4")
TOKEN = os.environ.get("BASELINE_TOKEN", "sandbox-token")
client = httpx.Client(
    timeout=30,
    limits=httpx.Limits(max_connections=100, max_keepalive_connections=100),
)


@app.task(
    name="baseline.send",
    autoretry_for=(httpx.HTTPError,),
    retry_backoff=True,
    retry_backoff_max=300,
    max_retries=7,
)
def send(user_id: str, session_id: str, template_id: str, url: str | None = None) -> None:
    """Post one message; raise (and so retry) on any HTTP error status."""
    body = {"sessionId": session_id, "templateId": template_id, "context": {"url": url}}
    response = client.post(
        f"{API}/messages/{user_id}/session",
        json=body,
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    response.raise_for_status()
