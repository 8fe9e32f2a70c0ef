"""A real moto S3 server on 127.0.0.1, started as a subprocess and stopped by PID (tests, benchmarks)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

from tests.multiproc import free_port


def start_moto(port: int | None = None, env: dict[str, str] | None = None,
               timeout_s: float = 30.0) -> tuple[subprocess.Popen[bytes], str]:
    """Start moto_server and wait until it answers; returns (process, endpoint URL)."""
    port = port or free_port()
    server = os.path.join(os.path.dirname(sys.executable), "moto_server")
    cmd = [server] if os.path.exists(server) else [sys.executable, "-m", "moto.server"]
    proc = subprocess.Popen([*cmd, "-H", "127.0.0.1", "-p", str(port)], env={**os.environ, **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1).close()
            return proc, endpoint
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_process(proc)
                raise RuntimeError(f"moto_server did not answer on {endpoint} (exit code {proc.poll()})") from None
            time.sleep(0.05)  # polling a server that is starting up


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Stop a server we started: `sig`, then SIGKILL after 10 s."""
    if proc.poll() is None:
        os.kill(proc.pid, sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
