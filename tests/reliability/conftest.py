"""Fixtures for the reliability suite: a moto S3 server that can be killed and restarted with its
data (moto's request recorder, replayed into the new server), a fault proxy in front of it, small
tmpfs mounts. Every process and mount a fixture makes is removed by the fixture, by PID / path."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.moto import start_moto
from tests.multiproc import free_port
from tests.reliability.proxy import FaultProxy

REPO = Path(__file__).resolve().parents[2]
S3_CREDS = {"key": "testing", "secret": "testing"}


class MotoServer:
    """moto_server on a fixed port. Recording on, so `restart()` brings the data back: S3 itself
    keeps objects across a restart of its front end, and so should our stand-in."""

    def __init__(self, workdir: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.record = workdir / f"moto-{self.port}.jsonl"
        self.env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, replay: bool = False) -> MotoServer:
        env = {"MOTO_ENABLE_RECORDING": "True", "MOTO_RECORDER_FILEPATH": str(self.record), **self.env}
        self.proc, _ = start_moto(self.port, env)
        if replay:
            req = urllib.request.Request(self.endpoint + "/moto-api/recorder/replay-recording", method="POST")
            urllib.request.urlopen(req, timeout=60).close()
        return self

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start(replay=True)

    def bucket(self) -> str:
        import s3fs

        name = f"ckpt-{uuid.uuid4().hex[:12]}"
        s3fs.S3FileSystem(endpoint_url=self.endpoint, **S3_CREDS, skip_instance_cache=True).mkdir(name)
        return name


@pytest.fixture
def moto(tmp_path: Path) -> Iterator[MotoServer]:
    server = MotoServer(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def proxy(moto: MotoServer) -> Iterator[FaultProxy]:
    p = FaultProxy(moto.port, seed=0).start()
    try:
        yield p
    finally:
        p.stop()


def make_model(seed: int = 0, width: int = 32) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The small model + AdamW that the storage-fault tests and the report save and reload."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(16, width), nn.Tanh(), nn.Linear(width, 4))
    return m, torch.optim.AdamW(m.parameters(), lr=0.01)


def train_step(m: nn.Module, o: torch.optim.Optimizer, i: int) -> None:
    """One step on batch `i` (seeded, so two runs see the same data)."""
    m(torch.randn(8, 16, generator=torch.Generator().manual_seed(i))).pow(2).mean().backward()
    o.step()
    o.zero_grad()


def s3_options(endpoint: str) -> dict[str, Any]:
    return {"endpoint_url": endpoint, **S3_CREDS}


@contextlib.contextmanager
def tmpfs(path: Path, size: str, options: str = "") -> Iterator[Path]:
    """A small tmpfs at `path`; skips the test (with the reason) where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (f",{options}" if options else "")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount rights): {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True, capture_output=True)
