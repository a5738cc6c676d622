"""A small HTTP/1.1 load generator for the gateway (stdlib asyncio, keep-alive connections).

    python bench/load.py --url http://127.0.0.1:8000 --key KEY --seconds 10 --connections 64

Each request is a distinct valid v4 message (its own sessionId), so none is a duplicate. Prints
one JSON line: accepted/s, latency percentiles, and counts by status. Its own per-request cost is
far below an HTTP client library's, so the figure is the server's, not the tool's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from urllib.parse import urlsplit


async def _connection(
    host: str,
    port: int,
    key: str,
    template: str,
    deadline: float,
    run: str,
    index: int,
    latencies: list[float],
    statuses: dict[int, int],
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    sequence = 0
    try:
        while time.perf_counter() < deadline:
            sequence += 1
            body = json.dumps(
                {
                    "sessionId": f"{run}-{index}-{sequence}",
                    "templateId": template,
                    "context": {"url": "https://app.example.com/reports/1"},
                }
            ).encode()
            request = (
                f"POST /messages/load-{index}/session HTTP/1.1\r\nHost: {host}\r\n"
                f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode() + body
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            length = 0
            for line in lines[1:]:
                if line.lower().startswith("content-length:"):
                    length = int(line.split(":", 1)[1])
            if length:
                await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            statuses[status] = statuses.get(status, 0) + 1
    finally:
        writer.close()


async def _run(
    url: str, key: str, seconds: float, connections: int, template: str
) -> dict[str, object]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    run = uuid.uuid4().hex[:8]
    started = time.perf_counter()
    deadline = started + seconds
    await asyncio.gather(
        *(
            _connection(host, port, key, template, deadline, run, i, latencies, statuses)
            for i in range(connections)
        )
    )
    elapsed = time.perf_counter() - started
    ordered = sorted(latencies)

    def pct(share: float) -> float:
        return 1000 * ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0.0

    return {
        "accepted/s": statuses.get(202, 0) / elapsed,
        "p50 ms": pct(0.50),
        "p99 ms": pct(0.99),
        "requests": len(latencies),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--template", default="bench")
    args = parser.parse_args()
    result = asyncio.run(_run(args.url, args.key, args.seconds, args.connections, args.template))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
