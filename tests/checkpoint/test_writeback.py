"""Early writeback of checkpoint files: the bytes are unchanged, the ranges handed to the kernel
cover the file in order, and a filesystem that refuses the call is written to as before."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from dtrain.checkpoint import storage, writeback


def test_the_kernel_call_is_there_on_linux_and_accepts_a_real_file(tmp_path: Path) -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("sync_file_range is Linux-only")
    with open(tmp_path / "f", "wb") as f:
        f.write(b"x" * 8192)
        f.flush()
        assert writeback.start_writeback(f.fileno(), 0, 8192)


def test_ranges_are_queued_in_order_and_the_file_is_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writeback, "WRITEBACK_BYTES", 1000)
    calls: list[tuple[int, int]] = []
    real = writeback.start_writeback
    monkeypatch.setattr(writeback, "start_writeback",
                        lambda fd, off, n: (calls.append((off, n)), real(fd, off, n))[1])
    pieces = [os.urandom(n) for n in (10, 700, 400, 2500, 30)]
    url = str(tmp_path / "ckpt.bin")
    with storage.open_write(url) as f:
        for p in pieces:
            f.write(p)
    assert (tmp_path / "ckpt.bin").read_bytes() == b"".join(pieces)
    if writeback._SFR is not None:  # queued after 1110 and 3610 bytes; the last 30 are left to fsync
        assert calls == [(0, 1110), (1110, 2500)]


def test_a_refused_call_turns_it_off_and_the_file_is_still_written(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writeback, "WRITEBACK_BYTES", 10)
    calls: list[int] = []
    monkeypatch.setattr(writeback, "start_writeback", lambda fd, off, n: (calls.append(off), False)[1])
    monkeypatch.setattr(writeback, "_SFR", lambda *a: -1)
    with storage.open_write(str(tmp_path / "f")) as f:
        for _ in range(5):
            f.write(b"y" * 20)
    assert calls == [0] and (tmp_path / "f").read_bytes() == b"y" * 100
