"""The partner-notification worker.

``celery -A worker worker`` finds the Celery app as ``worker.app``. It is built on first access
(PEP 562) so that importing a part of this package (the sandbox, the settings) stays cheap, and a
bad setting stops start-up with one line instead of a traceback.
"""

from __future__ import annotations

import sys
from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("app", "celery"):
        from worker.settings import SettingsError

        try:
            from worker.celery_app import app
        except SettingsError as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
        return app
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
