"""Read stored chunks into the tensors a model/optimizer needs, whatever layout saved them.

For each destination tensor (a DTensor shard or a full tensor) the reader finds the stored chunks
whose boxes overlap the destination's box, reads exactly those chunks' byte ranges, checks their
CRC-32, and copies the overlap in place. That is all N -> M resharding and FSDP <-> DDP <-> single
process loading needs. Nothing is unpickled: bytes are read into tensor memory as they are, and
no tensor is read twice or copied whole: memory beyond the destinations stays at one bounded window.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import numpy as np
import torch

from dtrain.checkpoint import directio, storage
from dtrain.checkpoint.checksum import INLINE, crc32, crc32_combine, format_crc, parse_crc
from dtrain.checkpoint.faultpoints import fault_point
from dtrain.checkpoint.format import MANIFEST, STATE, CheckpointDamagedError, Chunk, Manifest, parse_manifest
from dtrain.checkpoint.jsoncodec import loads
from dtrain.checkpoint.localfs import IOV_MAX, preadv_into, truncated
from dtrain.errors import CheckpointError

log = logging.getLogger(__name__)
SPAN = 16 << 20  # local disk: one request per span of this size at aligned file offsets; see ChunkReader
DIRECT_REQUEST = 8 << 20  # O_DIRECT reads: requests of this size at aligned offsets, DIRECT_IN_FLIGHT
DIRECT_IN_FLIGHT = 4  # at once, each into its own aligned buffer (4 x 16 MiB: as fast; one at a time: 1.3x the time)
CACHED = 0.75  # a file with at least this share of its pages in the page cache is read through it
NUMPY_COPY = 64 << 10  # pieces this big are copied with NumPy, which lets other threads run meanwhile
REMOTE_PIECE = 64 << 20  # object stores: each ranged GET has a fixed cost (moto: 8 MiB ran at 80 MiB/s, 64 at 240)
REMOTE_BYTES_IN_FLIGHT = 4 * REMOTE_PIECE  # GET bodies held at once, over every thread
FILES_IN_FLIGHT = 2  # local files read through the cache side by side, each on its own thread
SIDE_BY_SIDE_BYTES = 4 << 20  # ... when at least this much of each is wanted (a thread costs more otherwise)
BUFFER = 64 << 20  # a chunk that is not one contiguous run of its destination passes through this
# the hash of a piece read: a CRC, or the CRCs of one request's buffers (to come) and which one it is
Part = tuple["Future[list[int]] | int", int, int]  # (hash source, index in it, length)


def read_manifest(dir_url: str, storage_options: storage.StorageOptions = None, name: str = MANIFEST) -> Manifest:
    """The validated manifest of a checkpoint directory; CheckpointError if absent or invalid. `name`:
    another file holding one (`verify` reads a set-aside `manifest.json.damaged`)."""
    url = storage.join(dir_url, name)
    try:
        data = storage.read_bytes(url, storage_options=storage_options)
    except FileNotFoundError:
        raise CheckpointError(f"{url} does not exist: {dir_url} is not a committed checkpoint "
                              f"(it may be incomplete; see `dtrain ckpt ls`)") from None
    return parse_manifest(data, url)


def read_state(dir_url: str, manifest: Manifest, storage_options: storage.StorageOptions = None) -> dict:
    """state.json, checked against the manifest's size and checksum."""
    return read_json_file(dir_url, manifest, STATE, storage_options)


def read_json_file(dir_url: str, manifest: Manifest, name: str,
                   storage_options: storage.StorageOptions = None) -> dict:
    """A small JSON file of the checkpoint, checked against the manifest's size and checksum."""
    url = storage.join(dir_url, name)
    entry = manifest.file(name)
    try:
        data = storage.read_bytes(url, storage_options=storage_options)
    except FileNotFoundError:
        raise CheckpointDamagedError(f"{url} is listed in the manifest but missing") from None
    if len(data) != entry.size or crc32(data) != parse_crc(entry.checksum):
        raise CheckpointDamagedError(f"{url}: size/checksum mismatch ({len(data)} bytes, "
                                     f"{format_crc(crc32(data))}; manifest says {entry.size} bytes, "
                                     f"{entry.checksum}); the checkpoint is damaged")
    state = loads(data, url)
    if not isinstance(state, dict):
        raise CheckpointDamagedError(f"{url}: must be a JSON object")
    return state


class _ByteBudget:
    """Caps the bytes of remote reads held at once (each ranged GET returns its bytes before they
    are copied into place); a request larger than the cap waits for the budget to be empty."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self._cv = threading.Condition()

    @contextlib.contextmanager
    def hold(self, n: int) -> Iterator[None]:
        n = min(n, self.limit)
        with self._cv:
            self._cv.wait_for(lambda: self.used + n <= self.limit)
            self.used += n
        try:
            yield
        finally:
            with self._cv:
                self.used -= n
                self._cv.notify_all()


@dataclass
class ChunkReader:
    """Reads and verifies chunks of one checkpoint; checks each file's size once.

    Local files of at least `directio.MIN_BYTES` that are not mostly in the page cache are read
    with O_DIRECT (numbers in directio.py), unless the caller says not to (`direct`: restore.py
    does for small loads and for bytes other ranks of the host read too): `DIRECT_REQUEST`-aligned
    requests, trimmed to the blocks that hold wanted bytes, `DIRECT_IN_FLIGHT` at once on a pool
    of threads, each into its own aligned buffer, whose pieces are hashed and copied into their
    destinations there.
    Other local files are read front to back with one descriptor per file (kept until `close`), in
    requests that cover `SPAN` bytes at `SPAN`-aligned file offsets whatever the tensors are: one
    preadv scatters a request's bytes into every destination it covers (the tail of one tensor,
    a small bias, the head of the next). The kernel then sees the request stream of a plain
    sequential read of the file, and its readahead streams. Reading tensor by tensor did not: an
    8 MiB pread per piece (the disk's readahead size here) and a 16 KiB one per bias read freshly
    written 256 MiB files cold at 0.72x the speed of 16 MiB reads of the same file; spans of 16,
    32 or 64 MiB read them at 0.97-1.01x (paired medians of 12 rounds, a new file each round).
    Files of which a load wants `SIDE_BY_SIDE_BYTES` or more are read `FILES_IN_FLIGHT` at a time,
    each on its own thread: a file read after another starts with a synchronous read while the
    kernel's readahead ramps up again, and side by side the ramps overlap (two ranks each reading
    the two 32 MiB files of a two-rank save, cold: 44.9 against 49.1 ms one file after the other,
    and 40.8 for one 64 MiB file, paired medians of 16; dtrain's whole load: 1.06x in one quiet
    run, level in another, the rest of it being fixed work and this disk's noise).
    Each request's buffers are hashed on a second thread while the next request is read (the
    last request's on both threads), and the CRCs are combined per chunk. With `defer_checks`
    the hashes are checked in `finish`, so hashing overlaps reading to the end; nothing read may
    be used before `finish` returns. Ranks of one host that read the same files read them through
    the page cache (not `direct`): each byte comes from the disk once, the other ranks copy it
    from memory; with O_DIRECT each rank would read every byte from the disk again (two ranks each
    loading a replicated 2 GiB: 2.34 s against 1.68 s through the cache, medians of 4 rounds).
    Object stores are read in `REMOTE_PIECE` ranged GETs on a few threads (each GET has a fixed
    cost), hashed as they land. Bytes go straight into the destination when a chunk is one
    contiguous run of it; otherwise they pass through a window of at most `BUFFER` bytes (or
    one row along dim 0, if a row is bigger).
    """

    dir_url: str
    manifest: Manifest
    storage_options: storage.StorageOptions = None
    workers: int = 4
    bytes_read: int = 0
    _checked: dict[str, str] = field(default_factory=dict)  # file name -> url, once its size is checked
    _pool: ThreadPoolExecutor | None = None
    _remote: _ByteBudget = field(default_factory=lambda: _ByteBudget(REMOTE_BYTES_IN_FLIGHT))
    defer_checks: bool = False
    _fds: dict[str, int] = field(default_factory=dict)  # local file url -> descriptor, one per file
    _hasher: ThreadPoolExecutor | None = None
    _pending: list[tuple[str, str, Chunk, list[Part]]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    direct: bool = True  # big files not in the page cache may be read with O_DIRECT
    _direct: dict[str, int | None] = field(default_factory=dict)  # local file url -> O_DIRECT descriptor
    _io: ThreadPoolExecutor | None = None
    _buffers: queue.SimpleQueue[memoryview] = field(default_factory=queue.SimpleQueue)
    _files: ThreadPoolExecutor | None = None  # reads cached files side by side (FILES_IN_FLIGHT)

    def _check_size(self, name: str) -> str:
        url = self._checked.get(name)
        if url is not None:
            return url
        url = storage.join(self.dir_url, name)
        want = self.manifest.file(name).size
        try:
            got = storage.size(url, self.storage_options)
        except FileNotFoundError:
            raise CheckpointDamagedError(f"{url} is listed in the manifest but missing") from None
        if got != want:
            raise CheckpointDamagedError(f"{url}: size is {got} bytes, the manifest says {want}; the file "
                                         f"is truncated or was overwritten")
        with self._lock:  # the descriptor is there before the name is marked checked (others skip the lock)
            if storage.is_local(url) and url not in self._fds:
                self._fds[url] = fd = storage.open_local(url)
                self._direct[url] = _open_direct(url, fd, got) if self.direct else None
            self._checked[name] = url
        return url

    def read(self, key: str, chunk: Chunk, out: torch.Tensor) -> None:
        """Read the whole chunk straight into `out` (CPU, contiguous, exactly the chunk's bytes)."""
        self.read_many([(key, chunk, out)])

    def read_many(self, jobs: Sequence[tuple[str, Chunk, torch.Tensor]]) -> None:
        """`read` for many chunks at once: the chunks of each local file are read together, in
        file order, so that requests span destinations (class docstring)."""
        local: dict[str, list[tuple[str, Chunk, memoryview]]] = {}
        for key, chunk, out in jobs:
            url = self._check_size(chunk.file)
            begin, end = chunk.data_offsets
            mv = _byte_view(out)
            if len(mv) != end - begin:
                raise CheckpointError(f"{url}: chunk of {key!r} has {end - begin} bytes, destination {len(mv)}")
            if storage.is_local(url):
                local.setdefault(url, []).append((key, chunk, mv))
            else:
                self._verify(url, key, chunk, self._read_remote(url, begin, mv))
        urls = sorted(local)
        groups = {url: sorted(local[url], key=lambda j: j[1].data_offsets[0]) for url in urls}
        segments = {url: [(c.data_offsets[0], mv) for _, c, mv in groups[url]] for url in urls}
        side = [url for url in urls if self._direct.get(url) is None
                and sum(len(mv) for _, mv in segments[url]) >= SIDE_BY_SIDE_BYTES]
        side = side if FILES_IN_FLIGHT > 1 and len(side) > 1 else []
        rest = [url for url in urls if url not in side]  # O_DIRECT reads (queued, not waited for) first
        parts_of = {url: self._read_local(url, segments[url], last=not side and url == rest[-1]) for url in rest}
        if side:
            if self._files is None:
                self._files = ThreadPoolExecutor(FILES_IN_FLIGHT, thread_name_prefix="dtrain-file")
            parts_of.update(zip(side, self._files.map(lambda u: self._read_local(u, segments[u]), side), strict=True))
        reads = [(url, groups[url], parts_of[url]) for url in urls]
        _wait_all([src for url, _, hashes in reads if self._direct.get(url) is not None
                   for parts in hashes for src, _, _ in parts])  # direct reads: bytes in place
        for url, group, hashes in reads:
            for (key, chunk, _), parts in zip(group, hashes, strict=True):
                if self.defer_checks:
                    with self._lock:
                        self._pending.append((url, key, chunk, parts))
                else:
                    self._verify(url, key, chunk, _combine(parts))

    def finish(self) -> None:
        """Check the hashes of the deferred reads (`defer_checks`); raises on the first mismatch."""
        with self._lock:
            pending, self._pending = self._pending, []
        for url, key, chunk, parts in pending:
            self._verify(url, key, chunk, _combine(parts))

    def stream(self, key: str, chunk: Chunk, dtype: torch.dtype, overlap: tuple[tuple[int, int], ...],
               dest: torch.Tensor) -> None:
        """Read the whole chunk (its CRC covers all of it) through a bounded window of rows along
        dim 0, copying the part inside the global box `overlap` into `dest` (shaped like it)."""
        url = self._check_size(chunk.file)
        begin, end = chunk.data_offsets
        rows, row_shape = (chunk.lengths[0], chunk.lengths[1:]) if chunk.lengths else (1, ())
        row_bytes = math.prod(row_shape) * dtype.itemsize
        if rows * row_bytes != end - begin:
            raise CheckpointError(f"{url}: chunk of {key!r} has {end - begin} bytes, its shape "
                                  f"{list(chunk.lengths)} needs {rows * row_bytes}")
        per = max(1, min(rows, BUFFER // max(row_bytes, 1)))
        buf = torch.empty((per, *row_shape), dtype=dtype)
        rest = tuple(slice(lo - o, hi - o) for (lo, hi), o in zip(overlap[1:], chunk.offsets[1:], strict=True))
        crc = 0
        for r0 in range(0, rows, per):
            r1 = min(rows, r0 + per)
            window = buf[:r1 - r0]
            mv = _byte_view(window)
            at = begin + r0 * row_bytes  # the window is reused: its hash is needed before the next read
            part_crc = _combine(self._read_local(url, [(at, mv)])[0]) if storage.is_local(url) else \
                self._read_remote(url, at, mv)
            crc = crc32_combine(crc, part_crc, len(mv))
            if not chunk.lengths:
                dest.copy_(window.reshape(()))
                continue
            g0 = chunk.offsets[0] + r0  # global row of the window's first row
            lo, hi = max(g0, overlap[0][0]), min(chunk.offsets[0] + r1, overlap[0][1])
            if lo < hi:
                d0 = overlap[0][0]
                dest[lo - d0:hi - d0].copy_(window[(slice(lo - g0, hi - g0), *rest)])
        self._verify(url, key, chunk, crc)

    def _verify(self, url: str, key: str, chunk: Chunk, crc: int) -> None:
        begin, end = chunk.data_offsets
        if crc != parse_crc(chunk.checksum):
            raise CheckpointDamagedError(f"{url}: checksum mismatch in tensor {key!r} (bytes {begin}-{end}: "
                                         f"{format_crc(crc)}, manifest says {chunk.checksum}); the file is damaged")
        with self._lock:
            self.bytes_read += end - begin

    def _read_local(self, url: str, segments: list[tuple[int, memoryview]], last: bool = True) -> list[list[Part]]:
        """Fill each `(file offset, destination)` of `url` (in file order); each segment's hashes to
        come. With O_DIRECT the bytes are in place only once those hashes are (`_wait_all`).
        `last`: no other file is read after this one (`_read_buffered`)."""
        if self._direct.get(url) is not None:
            return self._read_direct(url, segments)
        return self._read_buffered(url, segments, last)

    def _read_direct(self, url: str, segments: list[tuple[int, memoryview]]) -> list[list[Part]]:
        """Submit `DIRECT_REQUEST`-aligned requests, each trimmed to whole blocks around the wanted
        bytes of its window, to the I/O threads; each returns the CRCs of its pieces."""
        fd = self._direct[url]
        assert fd is not None
        if self._io is None:
            with self._lock:
                if self._io is None:
                    for _ in range(DIRECT_IN_FLIGHT):
                        self._buffers.put(directio.aligned_buffer(DIRECT_REQUEST))
                    self._io = ThreadPoolExecutor(DIRECT_IN_FLIGHT, thread_name_prefix="dtrain-read")
        out: list[list[Part]] = [[] for _ in segments]
        pieces: list[tuple[int, int, memoryview]] = []  # (segment, file offset, destination) of one window

        def submit() -> None:
            assert self._io is not None
            start = pieces[0][1] - pieces[0][1] % directio.ALIGN
            end = pieces[-1][1] + len(pieces[-1][2])
            todo = [(off - start, mv) for _, off, mv in pieces]
            crcs = self._io.submit(self._direct_request, url, fd, start, end - start, todo)
            for k, (owner, _, mv) in enumerate(pieces):
                out[owner].append((crcs, k, len(mv)))
            pieces.clear()

        for i, (begin, mv) in enumerate(segments):
            done = 0
            while done < len(mv):
                at = begin + done
                take = min(len(mv) - done, DIRECT_REQUEST - at % DIRECT_REQUEST)
                if pieces and at // DIRECT_REQUEST != pieces[0][1] // DIRECT_REQUEST:
                    submit()
                pieces.append((i, at, mv[done:done + take]))
                done += take
        if pieces:
            submit()
        return out

    def _direct_request(self, url: str, fd: int, start: int, n: int, pieces: list[tuple[int, memoryview]]) -> list[int]:
        """One O_DIRECT read of bytes [start, start + n) into a free buffer (whole blocks: the
        last one may end past the file, which is fine), then each piece's CRC and copy into place."""
        fault_point("read", url)
        buf = self._buffers.get()
        try:
            want = -(-n // directio.ALIGN) * directio.ALIGN
            got = directio.pread(fd, buf[:want], start, self._fds[url])
            if got < n:
                truncated(url, start, n, got)
            crcs = []
            for rel, mv in pieces:
                src = buf[rel:rel + len(mv)]
                crcs.append(crc32(src))
                if len(mv) >= NUMPY_COPY:  # NumPy lets the other threads run during the copy
                    np.copyto(np.frombuffer(mv, np.uint8), np.frombuffer(src, np.uint8))
                else:
                    mv[:] = src
            return crcs
        finally:
            self._buffers.put(buf)

    def _read_buffered(self, url: str, segments: list[tuple[int, memoryview]], last: bool = True
                       ) -> list[list[Part]]:
        """Fill each `(file offset, destination)` of `url`, in the order given, in `SPAN`-aligned
        requests on this thread; a request's buffers are hashed on the hashing thread (a small
        request here: a thread hand-off costs more), the very last big one of the read (`last`:
        no file follows) half here. Returns each segment's hashes to come."""
        if self._hasher is None:
            with self._lock:
                if self._hasher is None:
                    self._hasher = ThreadPoolExecutor(1, thread_name_prefix="dtrain-crc")
        out: list[list[Part]] = [[] for _ in segments]
        left = sum(len(mv) for _, mv in segments)  # bytes still to read
        i = inner = 0  # the next segment, and how much of it is read
        while i < len(segments):
            start = pos = segments[i][0] + inner
            stop = (start // SPAN + 1) * SPAN
            bufs: list[memoryview] = []
            owners: list[int] = []
            while i < len(segments) and pos < stop and len(bufs) < IOV_MAX:
                begin, mv = segments[i]
                if begin + inner != pos:  # not the next byte of the file: a request of its own
                    break
                take = min(len(mv) - inner, stop - pos)
                bufs.append(mv[inner:inner + take])
                owners.append(i)
                pos, inner = pos + take, inner + take
                if inner == len(mv):
                    i, inner = i + 1, 0
            preadv_into(self._fds[url], url, start, bufs)
            left -= pos - start
            if pos - start < INLINE:  # small: hashed here
                for owner, b in zip(owners, bufs, strict=True):
                    out[owner].append((crc32(b), 0, len(b)))
            elif left >= INLINE or not last:  # the hashing thread keeps up while this thread reads on
                crcs = self._hasher.submit(_crcs, bufs)
                for k, (owner, b) in enumerate(zip(owners, bufs, strict=True)):
                    out[owner].append((crcs, k, len(b)))
            else:  # the last big request of the read: nothing left to read, so this thread hashes half
                self._hash_shared(bufs, owners, out)
        return out

    def _hash_shared(self, bufs: list[memoryview], owners: list[int], out: list[list[Part]]) -> None:
        """Hash `bufs` on both threads, the first half of every buffer on the hashing thread and the
        second half here: the wait for the last request's hashes is halved (16 MiB: ~1.7 ms)."""
        assert self._hasher is not None
        halves = [len(b) // 2 for b in bufs]
        firsts = self._hasher.submit(_crcs, [b[:h] for b, h in zip(bufs, halves, strict=True)])
        for k, (owner, b, h) in enumerate(zip(owners, bufs, halves, strict=True)):
            out[owner].append((firsts, k, h))
            out[owner].append((crc32(b[h:]), 0, len(b) - h))

    def _read_remote(self, url: str, begin: int, mv: memoryview) -> int:
        """Read `mv` in ranged GETs of `REMOTE_PIECE` on the reader's threads; their combined CRC."""
        n = len(mv)

        def piece(off: int) -> int:
            part = mv[off:min(off + REMOTE_PIECE, n)]
            with self._remote.hold(len(part)):
                storage.read_into(url, begin + off, part, self.storage_options)
            return crc32(part)

        if n <= REMOTE_PIECE:
            return piece(0) if n else 0
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="dtrain-read")
        crc = 0
        for off, part_crc in zip(range(0, n, REMOTE_PIECE), self._pool.map(piece, range(0, n, REMOTE_PIECE)), strict=True):
            crc = crc32_combine(crc, part_crc, min(REMOTE_PIECE, n - off))
        return crc

    def close(self) -> None:
        """Stop the threads (after the hashes under way) and close the files; unchecked deferred
        reads are dropped, so call `finish` first when the data is to be used."""
        for pool in (self._pool, self._hasher, self._io, self._files):
            if pool is not None:
                pool.shutdown()
        self._pool = self._hasher = self._io = self._files = None
        self._pending = []
        self._buffers = queue.SimpleQueue()
        with self._lock:
            fds = list(self._fds.values()) + [fd for fd in self._direct.values() if fd is not None]
            self._fds, self._direct = {}, {}
        for fd in fds:
            os.close(fd)


def _open_direct(url: str, fd: int, size: int) -> int | None:
    """An O_DIRECT descriptor for a big file that is not mostly in the page cache; else None."""
    if size < directio.MIN_BYTES or not directio.enabled():
        return None
    cached = directio.cached_fraction(fd, size)
    if cached is None or cached >= CACHED:
        return None
    return directio.open_for_read(storage.local_path(url))


def _wait_all(sources: list[Future[list[int]] | int]) -> None:
    """Wait for every request among `sources`, then raise the first one's error, if any (no
    request still writes into a destination once this returns)."""
    futures = {id(s): s for s in sources if isinstance(s, Future)}
    wait(futures.values())
    for f in futures.values():
        f.result()


def _crcs(bufs: list[memoryview]) -> list[int]:
    return [crc32(b) for b in bufs]


def _combine(parts: list[Part]) -> int:
    """The CRC-32 of consecutive pieces from their own CRCs (waits for the hashes to come)."""
    crc = 0
    for src, k, n in parts:
        crc = crc32_combine(crc, src if isinstance(src, int) else src.result()[k], n)
    return crc


def _byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, writable in place."""
    raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
    return raw.numpy().data if raw.numel() else memoryview(bytearray())
