"""A load generator for the gateway: ``--connections`` requests kept in flight on libcurl.

    python bench/load.py --url http://127.0.0.1:8000 --key KEY --seconds 10 --connections 64
    python bench/load.py ... --batch 500      # POST /messages/batch of 500 messages each

Each request is a distinct valid v4 message (its own sessionId), so none is a duplicate. Prints
one JSON line: accepted/s (202 answers per second), latency percentiles, the request count, and
counts by status (an exchange that got no answer is counted under its failure kind: ``timeout``,
``connect`` or ``protocol``).

The HTTP is the project's own libcurl engine (``worker.concur.transport.CurlTransport``: one multi
handle, one engine thread, keep-alive connections): each of the ``--connections`` slots sends its
next request from the completion callback of the previous one, so the tool spends no thread or
task per request and its own CPU stays well below the server's.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.concur.transport import Answer, CurlTransport, Done, Exchange, ExchangeFailed

_TIMEOUT_SECONDS = 30.0
_CONNECT_TIMEOUT_SECONDS = 10.0


class _Load:
    """The slots' shared tallies; touched only on the transport's engine thread."""

    def __init__(
        self,
        transport: CurlTransport,
        url: str,
        key: str,
        template: str,
        deadline: float,
        batch: int = 0,
    ) -> None:
        self._transport = transport
        self._url = url.rstrip("/")
        self._batch = batch  # 0: one message per request; N: POST /messages/batch of N
        self._headers = (f"Authorization: Bearer {key}", "Content-Type: application/json")
        # The body around the sessionId, rendered once (ids are hex, digits and dashes).
        self._body_head = '{"sessionId": "'
        self._body_tail = (
            f'", "templateId": {json.dumps(template)}, '
            '"context": {"url": "https://app.example.com/reports/1"}}'
        )
        self._deadline = deadline
        self._run = uuid.uuid4().hex[:8]
        self.latencies: list[float] = []
        self.statuses: dict[str, int] = {}
        self.running = 0
        self.finished = threading.Event()

    def start(self, connections: int) -> None:
        """Send each slot's first request; the rest follow from the callbacks."""
        self.running = connections
        self._transport.submit([self._slot(index) for index in range(connections)])

    def _slot(self, index: int) -> tuple[Exchange, Done]:
        url = f"{self._url}/messages/load-{index}/session"
        if self._batch:
            url = f"{self._url}/messages/batch"
        user_head = '{"userId": "load-' + str(index) + '", ' + self._body_head[1:]
        sequence = 0

        def exchange() -> Exchange:
            nonlocal sequence
            sequence += 1
            session = f"{self._run}-{index}-{sequence}"
            if self._batch:
                items = (user_head + f"{session}-{n}" + self._body_tail for n in range(self._batch))
                body = ("[" + ",".join(items) + "]").encode()
            else:
                body = (self._body_head + session + self._body_tail).encode()
            return Exchange(
                "POST", url, self._headers, body, _TIMEOUT_SECONDS, _CONNECT_TIMEOUT_SECONDS
            )

        def done(result: Answer | ExchangeFailed) -> None:
            self.latencies.append(result.elapsed_seconds)
            outcome = str(result.status) if isinstance(result, Answer) else result.kind
            self.statuses[outcome] = self.statuses.get(outcome, 0) + 1
            if time.perf_counter() < self._deadline:
                self._transport.submit([(exchange(), done)])
                return
            self.running -= 1
            if self.running == 0:
                self.finished.set()

        return exchange(), done


def run(
    url: str, key: str, seconds: float, connections: int, template: str, batch: int = 0
) -> dict[str, object]:
    """Drive the gateway for ``seconds`` with ``connections`` requests in flight; the figures.

    ``batch`` N sends ``POST /messages/batch`` of N messages instead of one message a request:
    ``accepted/s`` then counts messages (N per 202), the latencies are per request."""
    transport = CurlTransport(max_connections=connections)
    started = time.perf_counter()
    load = _Load(transport, url, key, template, started + seconds, batch)
    try:
        load.start(connections)
        load.finished.wait()
    finally:
        transport.close()
    elapsed = time.perf_counter() - started
    ordered = sorted(load.latencies)

    def pct(share: float) -> float:
        return 1000 * ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0.0

    return {
        "accepted/s": load.statuses.get("202", 0) * max(batch, 1) / elapsed,
        "p50 ms": pct(0.50),
        "p99 ms": pct(0.99),
        "requests": len(ordered),
        "statuses": dict(sorted(load.statuses.items())),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--template", default="bench")
    parser.add_argument(
        "--batch", type=int, default=0, help="messages per POST /messages/batch (0: one-message)"
    )
    args = parser.parse_args()
    figures = run(args.url, args.key, args.seconds, args.connections, args.template, args.batch)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
