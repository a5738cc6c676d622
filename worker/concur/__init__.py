"""Everything that speaks to Concur: the v4 client (``client``) on the libcurl engine
(``transport``), and where the bearer token comes from (``tokens``: static; ``oauth``: company
OAuth).
"""

from __future__ import annotations

from worker.concur.client import ConcurClient
from worker.concur.tokens import StaticToken, TokenProvider, TokenUnavailable

__all__ = ["ConcurClient", "StaticToken", "TokenProvider", "TokenUnavailable"]
