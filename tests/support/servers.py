"""Serve an ASGI app with uvicorn in a subprocess, for tests that need a real HTTP server."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pg_session_router.devcluster import free_port


@contextmanager
def uvicorn_server(
    python: Path | str, app: str, *, cwd: Path, env: dict[str, str], log: Path
) -> Iterator[str]:
    """`python -m uvicorn <app>` on a free loopback port; yields its base URL."""
    port = free_port()
    with log.open("w") as output:
        server = subprocess.Popen(
            [str(python), "-m", "uvicorn", app, "--port", str(port)],
            cwd=cwd,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_for_port(port, server, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


def _wait_for_port(
    port: int, server: subprocess.Popen[bytes], log: Path, within: float = 60
) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"server exited: {log.read_text()[-3000:]}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"server did not start listening: {log.read_text()[-3000:]}")
