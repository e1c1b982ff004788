"""A small HTTP/1.1 keep-alive load generator, run as its own process so that it does not share
an interpreter (or a GIL) with the server it measures.

    python -m bench.loadgen --port 8000 --path /items --header "X-Tenant-ID: acme" \\
        [--method POST --body '{"name": "x"}'] --connections 32 --duration 5

Prints one JSON line: requests, errors (non-2xx or broken connections), requests/s, p50 and p99
latency in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time


async def connection_loop(
    port: int, request: bytes, deadline: float, latencies: list[float], errors: list[int]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            if 200 <= status < 300:  # only answers that served the request count
                latencies.append(time.perf_counter() - started)
            else:
                errors.append(status)
    except (ConnectionError, asyncio.IncompleteReadError):
        errors.append(0)
    finally:
        writer.close()


async def run(args: argparse.Namespace) -> dict[str, float]:
    body = args.body.encode() if args.body else b""
    headers = [f"{args.method} {args.path} HTTP/1.1", "Host: 127.0.0.1", *args.header]
    if body:
        headers += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    request = ("\r\n".join(headers) + "\r\n\r\n").encode() + body
    latencies: list[float] = []
    errors: list[int] = []
    started = time.perf_counter()
    deadline = started + args.duration
    await asyncio.gather(
        *(
            connection_loop(args.port, request, deadline, latencies, errors)
            for _ in range(args.connections)
        )
    )
    elapsed = time.perf_counter() - started
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else 0.0
    return {
        "requests": len(latencies),
        "errors": len(errors),
        "rps": len(latencies) / elapsed,
        "p50_ms": statistics.median(latencies) * 1e3 if latencies else 0.0,
        "p99_ms": p99 * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--method", default="GET")
    parser.add_argument("--body", default="")
    parser.add_argument("--header", action="append", default=[])
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=5.0)
    print(json.dumps(asyncio.run(run(parser.parse_args()))))


if __name__ == "__main__":
    main()
