"""An ``httpx`` transport on urllib3's connection pool, for many threads sharing one client.

Why: profiling a worker with 64 threads on one ``httpx.Client`` showed httpcore's pool
spending a sixth of the worker's CPU choosing a connection (every request scans every pooled
connection and polls its socket). urllib3 keeps idle connections in a queue and hands one out in
constant time. The client stays an ``httpx.Client`` (same timeouts, requests, responses and
exceptions); only the connection pool underneath changes.

Exceptions are translated to httpx's, so callers see one family::

    urllib3 ConnectTimeoutError       → httpx.ConnectTimeout
    urllib3 ReadTimeoutError          → httpx.ReadTimeout
    urllib3 NewConnectionError etc.   → httpx.ConnectError
    urllib3 ProtocolError             → httpx.RemoteProtocolError
    any other urllib3 HTTPError       → httpx.TransportError
"""

from __future__ import annotations

import httpx
import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    MaxRetryError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)


def _timeout(request: httpx.Request) -> urllib3.Timeout:
    timeouts = request.extensions.get("timeout", {})
    return urllib3.Timeout(connect=timeouts.get("connect"), read=timeouts.get("read"))


class PooledTransport(httpx.BaseTransport):
    """Sends ``httpx`` requests through one thread-safe urllib3 pool manager."""

    def __init__(self, max_connections: int = 100) -> None:
        # block=True: threads beyond the pool size wait for a connection instead of opening
        # throw-away ones, so the number of sockets to Concur stays bounded.
        self._pool = urllib3.PoolManager(num_pools=4, maxsize=max_connections, block=True)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send one request; the whole body is read before returning (answers are small)."""
        try:
            answer = self._pool.urlopen(
                request.method,
                str(request.url),
                body=request.read(),
                headers=dict(request.headers),
                retries=False,
                redirect=False,
                preload_content=True,
                timeout=_timeout(request),
            )
        except ConnectTimeoutError as error:
            raise httpx.ConnectTimeout(str(error), request=request) from error
        except ReadTimeoutError as error:
            raise httpx.ReadTimeout(str(error), request=request) from error
        except NewConnectionError as error:
            raise httpx.ConnectError(str(error), request=request) from error
        except MaxRetryError as error:
            # With retries=False urllib3 still wraps some connection failures this way.
            reason = error.reason
            if isinstance(reason, ConnectTimeoutError):
                raise httpx.ConnectTimeout(str(reason), request=request) from error
            if isinstance(reason, ReadTimeoutError):
                raise httpx.ReadTimeout(str(reason), request=request) from error
            raise httpx.ConnectError(str(reason), request=request) from error
        except ProtocolError as error:
            raise httpx.RemoteProtocolError(str(error), request=request) from error
        except HTTPError as error:
            raise httpx.TransportError(str(error), request=request) from error
        return httpx.Response(
            answer.status,
            headers=list(answer.headers.items()),
            content=answer.data,
            request=request,
        )

    def close(self) -> None:
        """Close every pooled connection."""
        self._pool.clear()
