"""What every process runs beside its job: JSON logs with secrets redacted (``logs``), Sentry
(``monitoring``) and the background loop a worker's threads run on (``background``).
"""

from __future__ import annotations

from worker.ops.background import Loop

__all__ = ["Loop"]
