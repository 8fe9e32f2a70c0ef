"""Big local tensor files written and read with O_DIRECT: past the page cache, aligned buffers.

Measured on this machine's VM disk (1 GiB, paired rounds): a write + fsync ran at 0.25 GB/s
through the page cache, early writeback included (writeback.py), and at 1.8 GB/s with O_DIRECT
from two 4 MiB buffers, one filled while a thread writes the other; a whole 1 GiB save took 3.2x
less time (paired median of 6 rounds). The page cache's own pages are what cost: each is
allocated, filled, written back, and stays until memory is needed. Side effects: a save no longer
pushes the training job's cached data (its dataset files) out of the page cache, and a load right
after a save reads from the disk rather than from the cache.

Reads (reader.py) of a file that is not in the page cache go the same way: requests of 8 MiB
into aligned buffers, four in flight, each buffer hashed and copied into place. A cold 1 GiB file
read in 0.57-0.60 s that way, including the CRC-32 and the copy, where plain 16 MiB reads through
the cache took 1.9 s (paired medians of 6 rounds, 6 of 6 won; one direct request at a time:
0.74 s). A file mostly in the page cache is read through it (`cached_fraction`): from memory a
read costs a copy, from the disk far more.

Small files, filesystems that refuse O_DIRECT (fcntl or the first request fails with EINVAL),
other systems and DTRAIN_DIRECT_IO=0 use the page cache as before.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import mmap
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)
ALIGN = 4096  # file offsets, lengths and buffer addresses of direct requests: a multiple of any
# disk's logical block size (512 or 4096 here)
MIN_BYTES = 4 << 20  # smaller files gain nothing worth two buffers and a thread
MIN_LOAD = 128 << 20  # a load of fewer bytes reads through the page cache: freshly written small
# files read back faster that way here (64 MiB, 1 rank: 0.95x, 1.09x and 0.81x a plain read
# against 0.82x, 0.70x and 0.81x with O_DIRECT, medians of 10, 6 and 8 rounds; 256 MiB: 0.95x
# against 1.43x)
WRITE_BUFFER = 4 << 20  # two buffers per file being written, each 1/32 of the file but at least
MIN_BUFFER = 256 << 10  # MIN_BUFFER and at most WRITE_BUFFER (4, 8 and 16 MiB wrote 1 GiB alike):
# 1/16 of the file in all, or 512 KiB
_O_DIRECT = getattr(os, "O_DIRECT", 0)


def enabled() -> bool:
    return bool(_O_DIRECT) and os.environ.get("DTRAIN_DIRECT_IO", "1") != "0"


def set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for an open file (Linux allows both); False if refused."""
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | _O_DIRECT if on else flags & ~_O_DIRECT)
    except OSError as e:
        log.debug("O_DIRECT %s refused (%s); using the page cache", "on" if on else "off", e)
        return False
    return True


def buffer_bytes(size: int) -> int:
    """The size of each of the two write buffers for a file of `size` bytes."""
    return min(WRITE_BUFFER, max(MIN_BUFFER, -(-size // 32 // ALIGN) * ALIGN))


_spare_lock = threading.Lock()
_spare: list[memoryview] = []  # the last file's two buffers, for the next file (every save
# writes one to three files; allocating afresh each time left the freed ones counted in the
# process's memory: 16 MiB more at the peak of two async saves instead of 8)


def _take_buffers(n: int) -> list[memoryview]:
    """Two aligned buffers of at least `n` bytes: the spares if they are big enough; else the
    spares are dropped before new ones are allocated (never both at once)."""
    global _spare
    with _spare_lock:
        spare, _spare = _spare, []
    if len(spare) == 2 and min(len(b) for b in spare) >= n:
        return spare
    del spare
    return [aligned_buffer(n), aligned_buffer(n)]


def _give_buffers(bufs: list[memoryview]) -> None:
    global _spare
    with _spare_lock:
        if not _spare:
            _spare = bufs


def aligned_buffer(n: int) -> memoryview:
    """`n` writable bytes at an ALIGN-aligned address (kept alive by the view)."""
    raw = torch.empty(n + ALIGN, dtype=torch.uint8)
    skip = -raw.data_ptr() % ALIGN
    return raw[skip:skip + n].numpy().data  # the array holds the tensor, the view the array


def open_for_read(path: str) -> int | None:
    """A read-only descriptor with O_DIRECT on; None if disabled or this filesystem refuses it."""
    if not enabled():
        return None
    try:
        return os.open(path, os.O_RDONLY | _O_DIRECT | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:  # EINVAL: a filesystem without O_DIRECT (tmpfs before Linux 6.6, FUSE)
        log.debug("O_DIRECT read of %s refused (%s); using the page cache", path, e)
        return None


def pread(fd: int, buf: memoryview, offset: int, fallback: int) -> int:
    """Read into `buf` (aligned address and length) at `offset` (aligned) until it is full or the
    file ends; the bytes read. A direct request the filesystem refuses (EINVAL: it wants a bigger
    alignment) is redone through the page cache on `fallback`, a plain descriptor of the file."""
    got = 0
    while got < len(buf):
        try:
            k = os.preadv(fd, [buf[got:]], offset + got)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            fd = fallback
            continue
        if not k:
            break
        got += k
    return got


_libc: Any = None


def cached_fraction(fd: int, size: int) -> float | None:
    """The share of the file's first `size` bytes held in the page cache (mincore over a
    read-only map: no I/O, no page touched); None where that cannot be asked."""
    global _libc
    if size <= 0:
        return 1.0
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        vec = np.zeros(-(-size // mmap.PAGESIZE), np.uint8)
        with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as m:
            arr = np.frombuffer(m, np.uint8)  # only for its address; gone before the map closes
            try:
                rc = _libc.mincore(arr.ctypes.data, size, vec.ctypes.data)
            finally:
                del arr
        if rc != 0:
            return None
        return float(np.count_nonzero(vec & 1)) / len(vec)
    except (OSError, ValueError, AttributeError) as e:
        log.debug("cannot ask which pages are cached (%s)", e)
        return None


def open_for_write(path: str) -> int | None:
    """A new file (truncated) with O_DIRECT on; None if this filesystem refuses it."""
    if not enabled():
        return None
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o666)
    if not set_direct(fd, True):
        os.close(fd)
        return None
    return fd


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done, refused = 0, False
    while done < len(data):
        try:
            k = os.pwrite(fd, data[done:], offset + done)
        except OSError as e:
            if e.errno != errno.EINVAL or refused or not set_direct(fd, False):
                raise
            refused = True  # an alignment this filesystem wants bigger: the rest through the cache
            continue
        if not k:
            raise OSError(errno.ENOSPC, "no bytes written")
        done += k


class DirectWriter:
    """A write-only binary file of `size` bytes: bytes gather in two aligned buffers, each written
    with O_DIRECT on a thread while the other fills. `flush` ends the file: whole blocks directly,
    the last partial block through the page cache (O_DIRECT needs whole blocks); the caller fsyncs.
    The buffers are kept for the next file (at most 2 x WRITE_BUFFER per process)."""

    def __init__(self, fd: int, url: str, size: int) -> None:
        self.fd, self.url = fd, url
        n = buffer_bytes(size)
        self._whole = _take_buffers(n)
        self._bufs = [b[:n] for b in self._whole]
        self._cur = self._fill = self._offset = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="dtrain-write")
        self._inflight: Future[None] | None = None
        self._ended = False

    def write(self, data: Any) -> int:
        if self._ended:
            raise ValueError(f"{self.url}: write after the end of the file")
        mv = memoryview(data).cast("B")
        pos = 0
        while pos < len(mv):
            buf = self._bufs[self._cur]
            take = min(len(buf) - self._fill, len(mv) - pos)
            buf[self._fill:self._fill + take] = mv[pos:pos + take]
            self._fill, pos = self._fill + take, pos + take
            if self._fill == len(buf):
                self._hand_off(self._fill)
        return len(mv)

    def _hand_off(self, n: int) -> None:
        """Write the first `n` (whole blocks) bytes of the current buffer on the thread; switch."""
        self._wait()
        self._inflight = self._pool.submit(_pwrite_all, self.fd, self._bufs[self._cur][:n], self._offset)
        self._offset += n
        self._cur ^= 1
        self._fill = 0

    def _wait(self) -> None:
        pending, self._inflight = self._inflight, None
        if pending is not None:
            pending.result()

    def flush(self) -> None:
        if self._ended:
            return
        self._ended = True
        tail = self._bufs[self._cur][self._fill - self._fill % ALIGN:self._fill]
        if self._fill >= ALIGN:
            self._hand_off(self._fill - len(tail))
        self._wait()
        if len(tail):
            set_direct(self.fd, False)
            _pwrite_all(self.fd, tail, self._offset)
            self._offset += len(tail)

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        """Release the thread, the buffers and the descriptor (a write in flight is waited for;
        after a failure its error no longer matters: the file is being removed)."""
        try:
            if self._inflight is not None:
                self._inflight.exception()
        finally:
            self._inflight = None
            self._pool.shutdown()
            _give_buffers(self._whole)
            self._bufs = self._whole = []
            os.close(self.fd)
