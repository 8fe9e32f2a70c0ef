"""A lease on a checkpoint root, so two jobs never write checkpoints into the same root at once.

The lease is a small JSON file, `<root>/.dtrain-lease.json`: who holds it (job id, host, pid), since
when, and when it was last renewed. Rank 0 of the writing job takes it and a background heartbeat
renews it every ttl/3 seconds. Another job may take it over only when it has expired (its holder
stopped renewing `ttl_s` ago: crashed or hung), when the holder is a dead process on this same host,
or when it is the same job restarted (same job id: DTRAIN_JOB_ID, TORCHELASTIC_RUN_ID from
`torchrun --rdzv-id`, or SLURM_JOB_ID).

Every change is a compare-and-swap. Local roots: `flock` on the root directory around
read-decide-write, and an atomic rename. S3: conditional PUTs (`If-None-Match: *` to create, `If-Match: <etag>` to
renew or take over), which AWS S3 and moto honour; a store that ignores these headers makes the
lease best effort (two jobs starting within the same second could both believe they hold it).
Wall clocks of the hosts are assumed to agree within a few seconds of `ttl_s`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from dtrain.checkpoint import storage
from dtrain.checkpoint.s3upload import with_retries
from dtrain.errors import CheckpointError

log = logging.getLogger(__name__)


class LeaseConflictError(CheckpointError):
    """Another job holds the lease, or changed it under this one: the root is not ours to write.
    Storage that cannot be read or written raises a plain CheckpointError (it may come back)."""


LEASE_FILE = ".dtrain-lease.json"
DEFAULT_TTL_S = 60.0


def job_identity(explicit: str | None = None) -> str:
    """This job's id: explicit, else DTRAIN_JOB_ID, torchrun's run id (not its default 'none'),
    SLURM_JOB_ID, else host:pid (a job that cannot be recognised after a restart)."""
    for value in (explicit, os.environ.get("DTRAIN_JOB_ID"), os.environ.get("TORCHELASTIC_RUN_ID"),
                  os.environ.get("SLURM_JOB_ID")):
        if value and value != "none":
            return str(value)
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class Holder:
    job_id: str
    host: str
    pid: int
    since: float
    renewed: float
    ttl_s: float
    token: str  # unique per acquisition

    def describe(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since))
        left = self.renewed + self.ttl_s - now
        return (f"job {self.job_id!r} (host {self.host}, pid {self.pid}) since {since}, renewed "
                f"{now - self.renewed:.0f} s ago, " + (f"expires in {left:.0f} s" if left > 0 else "expired"))

    def is_this_process(self) -> bool:
        return self.host == socket.gethostname() and self.pid == os.getpid()


def _parse(data: bytes, url: str) -> Holder | None:
    """The holder in a lease file; None (with a warning) for a file we cannot read: it is taken over."""
    try:
        body = json.loads(data.decode("utf-8"))
        return Holder(str(body["job_id"]), str(body["host"]), int(body["pid"]), float(body["since"]),
                      float(body["renewed"]), float(body["ttl_s"]), str(body["token"]))
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        log.warning("%s is not a valid lease file (%s); taking it over", url, e)
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """The lease on `root` for this job; `acquire()` raises CheckpointError naming the holder."""

    def __init__(self, root: str, storage_options: storage.StorageOptions = None, job_id: str | None = None,
                 ttl_s: float = DEFAULT_TTL_S) -> None:
        if ttl_s <= 0:
            raise CheckpointError(f"lease ttl_s={ttl_s} must be positive")
        self.root, self.url = root, storage.join(root, LEASE_FILE)
        self.so = storage_options
        self.job_id, self.ttl_s = job_identity(job_id), float(ttl_s)
        self.token = uuid.uuid4().hex
        self.since: float | None = None
        self._etag: str | None = None
        self._root_checked = False  # see root_checked()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- the protocol ---------------------------------------------------------------------------
    def root_checked(self) -> None:
        """The caller has just made sure the root can be written (CheckpointManager.check_root): the
        next `acquire` skips its own check, on S3 a second HEAD of the bucket at start-up."""
        self._root_checked = True

    def acquire(self, *, renew: bool = False) -> None:
        """Take (or keep) the lease. Cheap to call again: on a lease this process holds it only reads
        the file, and writes a renewal when asked (the heartbeat) or once the last one is ttl/3 old."""
        if self.since is None and not self._root_checked:
            storage.makedirs(self.root, self.so)  # a local root is created; a missing bucket is an error
        self._root_checked = False
        with self._locked():
            current, etag = self._read()
            now = time.time()
            if (not renew and current is not None and current.token == self.token
                    and 0 <= now - current.renewed < self.ttl_s / 3):
                return  # still ours and fresh: nobody may take it before it expires
            if current is not None and current.token != self.token and not self._may_take(current, now):
                raise LeaseConflictError(
                    f"checkpoint root {self.root} is in use by another job: {current.describe(now)}. Two "
                    f"jobs writing one root would mix their checkpoints. Stop the other job or use another "
                    f"checkpoint root; if it is this job restarted, give both the same job id "
                    f"(DTRAIN_JOB_ID={current.job_id}). A crashed job's lease expires {current.ttl_s:.0f} s "
                    f"after its last renewal (lease file: {self.url})")
            if current is not None and current.token != self.token:
                level = logging.DEBUG if current.is_this_process() else logging.WARNING
                log.log(level, "taking over the checkpoint lease of %s: %s", self.root, current.describe(now))
            self.since = self.since or now
            body = Holder(self.job_id, socket.gethostname(), os.getpid(), self.since, now, self.ttl_s, self.token)
            self._write(json.dumps(asdict(body)).encode("utf-8"), None if current is None else etag)

    def _may_take(self, h: Holder, now: float) -> bool:
        if now > h.renewed + h.ttl_s or h.job_id == self.job_id or h.is_this_process():
            return True
        return h.host == socket.gethostname() and not _pid_alive(h.pid)  # its process died here

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours."""
        self.stop_heartbeat()
        if self.since is None:
            return
        try:
            with self._locked():
                current, etag = self._read()
                if current is not None and current.token == self.token:
                    self._delete(etag)
        except Exception as e:  # it expires by itself
            log.warning("could not release the checkpoint lease %s: %s", self.url, e)
        self.since = None

    def start_heartbeat(self) -> None:
        """Renew the lease every ttl/3 s on a thread, until `stop_heartbeat` or until another job
        holds it; called again (every save does), it starts a heartbeat that has ended."""
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat, name="dtrain-lease", daemon=True)
            self._thread.start()

    def stop_heartbeat(self) -> None:
        if self._thread is not None:
            self._stop.set()
            if self._thread is not threading.current_thread():
                self._thread.join()
            self._thread = None

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.acquire(renew=True)
            except LeaseConflictError as e:  # taken over after we missed renewals: the next save fails
                log.error("lost the checkpoint lease on %s: %s", self.root, e)
                return
            except Exception as e:  # storage trouble (an outage past the retries): try again at the next beat
                log.warning("could not renew the checkpoint lease %s: %s", self.url, e)

    # ---- storage: local (flock + rename) or S3 (conditional requests) --------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if not storage.is_local(self.root):
            yield
            return
        import fcntl

        fd = os.open(storage.local_path(self.root), os.O_RDONLY)  # a lock on the directory: no lock file
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _s3(self) -> tuple[Any, str, str] | None:
        if storage.is_local(self.url):
            return None
        fs, path = storage.filesystem(self.url, self.so)
        if "s3" not in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
            return None
        bucket, key, _ = fs.split_path(path)
        return fs, bucket, key

    def _read(self) -> tuple[Holder | None, str | None]:
        s3 = self._s3()
        if s3 is None:
            try:
                return _parse(storage.read_bytes(self.url, storage_options=self.so), self.url), None
            except FileNotFoundError:
                return None, None
        fs, bucket, key = s3
        try:
            out = with_retries(lambda: fs.call_s3("get_object", Bucket=bucket, Key=key), self.url, "read lease")
        except FileNotFoundError:
            return None, None
        except Exception as e:
            raise CheckpointError(f"{self.url}: cannot read the lease: {type(e).__name__}: {e}") from e
        return _parse(_read_body(fs, out["Body"]), self.url), str(out["ETag"])

    def _write(self, data: bytes, etag: str | None) -> None:
        s3 = self._s3()
        if s3 is None:
            storage.write_atomic(self.url, data, self.so)
            return
        fs, bucket, key = s3
        cond = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        try:
            with_retries(lambda: fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **cond),
                         self.url, "write lease")
        except Exception as e:
            if not _precondition_failed(e):
                raise CheckpointError(f"{self.url}: cannot write the lease: {type(e).__name__}: {e}") from e
            again, _ = self._read()
            if again is not None and again.token == self.token:
                return  # a retry after a lost answer: our write went through
            raise LeaseConflictError(f"checkpoint root {self.root}: another job changed the lease while this one "
                                  f"took it ({type(e).__name__}: {e}); holder now: "
                                  f"{again.describe() if again else 'none'}") from e

    def _delete(self, etag: str | None) -> None:
        s3 = self._s3()
        if s3 is None:
            storage.remove(self.url, self.so)
            return
        fs, bucket, key = s3
        cond = {"IfMatch": etag} if etag else {}
        with_retries(lambda: fs.call_s3("delete_object", Bucket=bucket, Key=key, **cond), self.url, "release lease")


def _precondition_failed(exc: BaseException) -> bool:
    """The conditional PUT lost a race (HTTP 412), here or in the error it was raised from."""
    e: BaseException | None = exc
    for _ in range(8):
        if e is None:
            return False
        if isinstance(e, FileExistsError) or "PreconditionFailed" in str(e) or "(412)" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _read_body(fs: Any, body: Any) -> bytes:
    """The bytes of an aiobotocore streaming body, read on s3fs's event loop."""
    from fsspec.asyn import sync

    async def read() -> bytes:
        async with body as stream:
            return bytes(await stream.read())
    return sync(fs.loop, read)


def read_holder(root: str, storage_options: storage.StorageOptions = None) -> Holder | None:
    """Who holds the lease on `root` now (None if nobody), for tools and messages."""
    try:
        data = storage.read_bytes(storage.join(root, LEASE_FILE), storage_options=storage_options)
    except FileNotFoundError:
        return None
    return _parse(data, storage.join(root, LEASE_FILE))
