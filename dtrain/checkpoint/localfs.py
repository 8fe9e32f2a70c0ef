"""Local files the way checkpoints need them: writes that are durable when they return (fsync,
early writeback, temp name + rename + directory fsync for atomic ones), nothing left behind when
they fail, and positional reads that several threads can share on one descriptor."""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from collections.abc import Iterator
from typing import BinaryIO

from dtrain.checkpoint import directio, faultpoints
from dtrain.checkpoint.directio import DirectWriter
from dtrain.checkpoint.faultpoints import Hooked, fault_point
from dtrain.checkpoint.writeback import WritebackFile
from dtrain.errors import CheckpointError


def _iov_max() -> int:
    try:
        return max(16, os.sysconf("SC_IOV_MAX"))
    except (AttributeError, ValueError, OSError):
        return 1024  # Linux's limit


IOV_MAX = _iov_max()  # buffers per preadv call


@contextlib.contextmanager
def open_write(path: str, url: str, size: int | None = None) -> Iterator[BinaryIO]:
    """Write `path`; on success the bytes are durable (fsync), on an exception the file is removed.
    A file of a known `size` of at least directio.MIN_BYTES is written with O_DIRECT where allowed."""
    fd = directio.open_for_write(path) if size is not None and size >= directio.MIN_BYTES else None
    f: DirectWriter | WritebackFile
    if fd is not None and size is not None:
        f = DirectWriter(fd, url, size)
    else:  # 1 MiB buffer: small tensors go out in 1 MiB writes (4096 writes of 16 KiB: 31 ms one
        # syscall each, 18 ms buffered); a piece bigger than the buffer is written straight from
        # the tensor, and writeback starts while later pieces are written
        f = WritebackFile(open(path, "wb", buffering=1 << 20))
    try:
        yield Hooked(f, url) if faultpoints.active() else f  # type: ignore[misc]
        f.flush()
        os.fsync(f.fileno())
    except BaseException:
        # close() of a buffered file flushes again and, on a full disk, fails again: that second
        # error must neither hide the first nor skip the removal (the truncated file held the space)
        with contextlib.suppress(OSError):
            f.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    f.close()
    fault_point("file_closed", url)


def write_atomic(path: str, url: str, data: bytes) -> None:
    """Readers see either no file or all of `data`: temp name, fsync, rename, fsync of the directory."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        fault_point("atomic_before_rename", url)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)
    fault_point("atomic_done", url)


def out_of_space(e: BaseException) -> bool:
    """A full disk or quota (ENOSPC, EDQUOT): the message then says how much is free and what to do."""
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def storage_full(path: str) -> str:
    """'The storage under PATH is full (N MiB free now)': how every disk-full message begins, with
    what is free measured now (no free inodes, when they are what ran out)."""
    where = os.path.abspath(path)
    while not os.path.exists(where) and os.path.dirname(where) != where:  # a directory not made yet
        where = os.path.dirname(where)
    try:
        st = os.statvfs(where)
        inodes = ", no free inodes" if st.f_files and not st.f_favail else ""
        free = f" ({st.f_bavail * st.f_frsize / 2**20:.1f} MiB free now{inodes})"
    except OSError:
        free = ""
    return f"The storage under {path} is full{free}"


def pread_into(fd: int, url: str, offset: int, out: memoryview) -> None:
    """Fill `out` from `fd` at `offset` (os.preadv: no shared file position, so threads can read
    different pieces of one file at once); a short file is a CheckpointError naming `url`."""
    preadv_into(fd, url, offset, [out])


def preadv_into(fd: int, url: str, offset: int, bufs: list[memoryview]) -> None:
    """Fill `bufs`, in order, from the consecutive bytes of `fd` at `offset`: one request for
    what several destinations need (at most IOV_MAX buffers per call); short reads are resumed,
    a short file is a CheckpointError naming `url`."""
    fault_point("read", url)
    want = sum(len(b) for b in bufs)
    todo = [b for b in bufs if len(b)]
    got = i = 0
    while i < len(todo):
        k = os.preadv(fd, todo[i:i + IOV_MAX], offset + got)
        if not k:
            truncated(url, offset, want, got)
        got += k
        while i < len(todo) and k >= len(todo[i]):
            k -= len(todo[i])
            i += 1
        if k:
            todo[i] = todo[i][k:]


def truncated(url: str, offset: int, n: int, got: int) -> None:
    raise CheckpointError(f"{url}: file is truncated: wanted bytes [{offset}, {offset + n}), "
                          f"file ends at {offset + got}; the checkpoint is damaged")


def fsync_dir(directory: str) -> None:
    """Make a rename or a new entry durable; some filesystems cannot open directories (ignore)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
