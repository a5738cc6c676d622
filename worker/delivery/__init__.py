"""A worker's side of a message: a task's attempts (``attempts``), the mover that republishes
what is due and the liveness heartbeat (``mover``), and the Celery consumer that dead-letters
what it cannot run (``consumer``).
"""

from __future__ import annotations

from worker.delivery.attempts import deliver_task

__all__ = ["deliver_task"]
