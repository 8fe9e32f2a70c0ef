"""A few string-path functions over fsspec: the only place checkpoint code touches storage.

Local paths (and file://) go straight to the OS (localfs.py) so we control fsync and rename;
everything else (s3://, memory://, ...) goes through fsspec. A URL is always a plain string;
`join` builds children. S3 endpoint and credentials come from the standard AWS_* environment
(AWS_ENDPOINT_URL[_S3], AWS_ACCESS_KEY_ID, ...) unless `storage_options` says otherwise. Remote
calls are retried with bounded backoff on transient errors (s3upload.with_retries); local errors
(disk full, permission denied, read-only) are never retried. Buckets are never created: a missing
one is an error.
"""

from __future__ import annotations

import contextlib
import functools
import os
import posixpath
import shutil
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, TypeVar

import fsspec
from fsspec.core import url_to_fs

from dtrain.checkpoint import faultpoints, localfs
from dtrain.checkpoint.faultpoints import Hooked, fault_point
from dtrain.checkpoint.localfs import pread_into
from dtrain.checkpoint.s3upload import ConcurrentS3Writer, with_retries
from dtrain.errors import CheckpointError, MissingBucketError

StorageOptions = dict[str, Any] | None
T = TypeVar("T")


def _named_errors(fn: Callable[..., T]) -> Callable[..., T]:
    """Remote calls are retried while they fail transiently; then failures (no credentials,
    unreachable endpoint, denied) become a CheckpointError that names the URL. FileNotFoundError
    stays as is because callers use it to mean "absent"; local OSErrors name their path already."""
    @functools.wraps(fn)
    def wrapper(url: str, *args: Any, **kwargs: Any) -> T:
        if is_local(url):
            return fn(url, *args, **kwargs)
        try:
            return with_retries(lambda: fn(url, *args, **kwargs), url, fn.__name__)
        except (FileNotFoundError, CheckpointError):
            raise
        except PermissionError as e:  # s3fs's 403: AccessDenied, InvalidAccessKeyId, SignatureDoesNotMatch
            raise CheckpointError(f"{url}: access denied ({type(e).__name__}: {e}): {_DENIED}") from e
        except Exception as e:
            raise CheckpointError(f"{url}: {type(e).__name__}: {e} (check the endpoint, credentials and "
                                  f"storage_options)") from e
    return wrapper


_DENIED = ("the credentials are wrong, expired, or not allowed to use it: check them (the AWS_* environment, "
           "or storage_options)")


def is_local(url: str) -> bool:
    """True for a plain path or a file:// URL."""
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def parent(url: str) -> str:
    """The directory (or prefix) `url` is in: a local path's directory ("." for a bare name), else
    the URL without its last part."""
    if is_local(url):
        return os.path.dirname(os.path.normpath(local_path(url))) or "."
    return url.rstrip("/").rsplit("/", 1)[0]


def join(url: str, *parts: str) -> str:
    """`url/part/...` for any scheme (local paths keep the OS form)."""
    if is_local(url):
        return os.path.join(local_path(url), *parts)
    return posixpath.join(url.rstrip("/"), *parts)


def _options(url: str, storage_options: StorageOptions) -> dict[str, Any]:
    opts = dict(storage_options or {})
    if url.startswith(("s3://", "s3a://")):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint and "endpoint_url" not in opts:
            opts["endpoint_url"] = endpoint
        config = dict(opts.get("config_kwargs") or {})
        # one retry policy (ours, bounded); botocore's would multiply it (50 tries, 35 s when down)
        config.setdefault("retries", {"mode": "standard", "total_max_attempts": 1})
        opts["config_kwargs"] = config
    return opts


def filesystem(url: str, storage_options: StorageOptions = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and the scheme-less path for a remote URL."""
    try:
        fs, path = url_to_fs(url, **_options(url, storage_options))
    except (ImportError, ValueError) as e:
        raise CheckpointError(f"cannot open storage for {url!r}: {e}") from e
    if _is_s3(fs):
        fs.retries = 1  # s3fs's own retry loop would multiply ours (this instance is dtrain's: see _options)
    return fs, path


@_named_errors
def makedirs(url: str, storage_options: StorageOptions = None) -> None:
    """Create a directory (a no-op on object stores, which have none)."""
    if is_local(url):
        path = local_path(url)
        os.makedirs(path, exist_ok=True)
        localfs.fsync_dir(os.path.dirname(os.path.abspath(path)))
        return
    fs, path = filesystem(url, storage_options)
    if _is_s3(fs):  # s3fs would create a missing bucket: a typo in the URL must not make a new one
        _check_bucket(fs, path, url, "dtrain does not create buckets: create it, or fix the URL/endpoint")
        return
    fs.makedirs(path, exist_ok=True)


@_named_errors
def check_bucket(url: str, storage_options: StorageOptions = None) -> None:
    """MissingBucketError when `url` is in an S3 bucket that does not exist; a CheckpointError saying
    to check the credentials when access to it is denied; nothing for other stores. For a URL that
    holds nothing, so that its error names the missing bucket."""
    if is_local(url):
        return
    fs, path = filesystem(url, storage_options)
    if _is_s3(fs):
        _check_bucket(fs, path, url, "fix the URL or the endpoint")


def _check_bucket(fs: fsspec.AbstractFileSystem, path: str, url: str, hint: str) -> None:
    bucket = path.split("/", 1)[0]
    try:
        found = _bucket_exists(fs, bucket)
    except PermissionError as e:
        raise CheckpointError(f"{url}: access to bucket {bucket!r} denied ({e}): {_DENIED}") from e
    if not found:
        raise MissingBucketError(f"{url}: bucket {bucket!r} does not exist (or these credentials cannot see "
                                 f"it); {hint}")


@contextlib.contextmanager
def open_write(url: str, storage_options: StorageOptions = None, size: int | None = None) -> Iterator[BinaryIO]:
    """Open `url` for writing; on success the bytes are durable (fsync) or committed (S3 close);
    on an exception nothing is left behind: the local file is removed, the S3 upload aborted
    (an s3fs file would commit the partial object if closed, as a `with fs.open()` block does).
    S3 objects upload several multipart parts at once (s3upload.py). `size`, when known, lets a
    big local file bypass the page cache (directio.py)."""
    fault_point("file_open", url)
    if is_local(url):
        with localfs.open_write(local_path(url), url, size) as lf:
            yield lf
        return
    fs, path = filesystem(url, storage_options)
    rf = ConcurrentS3Writer(fs, path) if _is_s3(fs) else fs.open(path, "wb")
    try:
        yield Hooked(rf, url) if faultpoints.active() else rf  # type: ignore[misc]
    except BaseException:
        with contextlib.suppress(Exception):
            rf.discard()  # s3fs: abort the multipart upload; nothing becomes visible
            rf.closed = True  # or the file's __del__ would try to flush the discarded buffer
        if not _is_s3(fs):  # others (memory://) may have created the file on open
            with contextlib.suppress(Exception):
                fs.rm(path)
        raise
    try:
        rf.close()
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{url}: committing the upload failed: {type(e).__name__}: {e}") from e
    fault_point("file_closed", url)


def _bucket_exists(fs: fsspec.AbstractFileSystem, bucket: str) -> bool:
    """HEAD the bucket: 404 means absent; other errors (denied, endpoint down) are raised."""
    try:
        fs.call_s3("head_bucket", Bucket=bucket)
    except Exception as e:
        if isinstance(e, FileNotFoundError) or "404" in str(e) or "NoSuchBucket" in str(e):
            return False
        raise
    return True


def _is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "s3" in protocol


@_named_errors
def write_atomic(url: str, data: bytes, storage_options: StorageOptions = None) -> None:
    """Readers see either no file or all of `data`: local = temp name, fsync, rename, fsync of the
    directory; object stores = one PUT, which is atomic by itself."""
    if is_local(url):
        localfs.write_atomic(local_path(url), url, data)
        return
    fs, path = filesystem(url, storage_options)
    fault_point("atomic_before_rename", url)
    fs.pipe_file(path, data)
    fault_point("atomic_done", url)


@_named_errors
def read_bytes(url: str, start: int | None = None, end: int | None = None,
               storage_options: StorageOptions = None) -> bytes:
    """Bytes [start, end) of a file (the whole file by default). Raises FileNotFoundError."""
    fault_point("read", url)
    if is_local(url):
        with open(local_path(url), "rb") as f:
            if start:
                f.seek(start)
            return f.read() if end is None else f.read(end - (start or 0))
    fs, path = filesystem(url, storage_options)
    return fs.cat_file(path, start=start, end=end)


@_named_errors
def read_into(url: str, offset: int, out: memoryview, storage_options: StorageOptions = None) -> None:
    """Fill `out` with the file's bytes from `offset`; a short file is a CheckpointError."""
    if is_local(url):
        fd = open_local(url)
        try:
            pread_into(fd, url, offset, out)
        finally:
            os.close(fd)
        return
    n = len(out)
    data = read_bytes(url, offset, offset + n, storage_options)
    out[:len(data)] = data
    if len(data) != n:
        localfs.truncated(url, offset, n, len(data))


def open_local(url: str) -> int:
    """An OS file descriptor for positional reads of a local file (pread_into), so a reader can
    keep one per file and read pieces of it from several threads without reopening it."""
    return os.open(local_path(url), os.O_RDONLY)


@contextlib.contextmanager
def open_read(url: str, storage_options: StorageOptions = None) -> Iterator[BinaryIO]:
    """A sequential reader (used to stream whole files for verification)."""
    if is_local(url):
        with open(local_path(url), "rb") as f:
            yield f  # type: ignore[misc]
        return
    fs, path = filesystem(url, storage_options)
    with fs.open(path, "rb", block_size=8 << 20) as f:
        yield f


@_named_errors
def size(url: str, storage_options: StorageOptions = None) -> int:
    """File size in bytes; FileNotFoundError if absent."""
    if is_local(url):
        return os.stat(local_path(url)).st_size
    fs, path = filesystem(url, storage_options)
    fs.invalidate_cache(path)
    return int(fs.size(path))


UNKNOWN = "unknown"  # in an identity: the store reports no version, so it matches no earlier one


@_named_errors
def identity(url: str, storage_options: StorageOptions = None) -> tuple[Any, ...] | None:
    """What changes whenever the file at `url` is written anew, without reading it: (size,
    mtime_ns, inode) locally (an atomic replace is a new inode), (size, ETag) or (size, modified
    time) on object stores, (size, UNKNOWN) when the store reports neither. None if absent."""
    if is_local(url):
        try:
            st = os.stat(local_path(url))
        except FileNotFoundError:
            return None
        return st.st_size, st.st_mtime_ns, st.st_ino
    fs, path = filesystem(url, storage_options)
    fs.invalidate_cache(path)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return None
    version = next((info[k] for k in ("ETag", "etag", "LastModified", "mtime", "created") if info.get(k)), None)
    return (info.get("size"), str(version) if version is not None else UNKNOWN)


@_named_errors
def exists(url: str, storage_options: StorageOptions = None) -> bool:
    if is_local(url):
        return os.path.exists(local_path(url))
    fs, path = filesystem(url, storage_options)
    fs.invalidate_cache(path)
    return bool(fs.exists(path))


@_named_errors
def list_dir(url: str, storage_options: StorageOptions = None) -> list[tuple[str, bool]]:
    """(name, is_directory) for each entry directly under `url`; empty if `url` does not exist."""
    if is_local(url):
        try:
            with os.scandir(local_path(url)) as it:
                return sorted((e.name, e.is_dir()) for e in it)
        except FileNotFoundError:
            return []
    fs, path = filesystem(url, storage_options)
    fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    out = []
    for e in entries:
        name = posixpath.basename(str(e["name"]).rstrip("/"))
        if name:
            out.append((name, e.get("type") == "directory"))
    return sorted(out)


@_named_errors
def rename(url: str, new_url: str, storage_options: StorageOptions = None) -> None:
    """Move a file within one store (local: an atomic rename, made durable; object stores: copy,
    then delete)."""
    if is_local(url):
        os.replace(local_path(url), local_path(new_url))
        localfs.fsync_dir(os.path.dirname(os.path.abspath(local_path(new_url))))
        return
    fs, path = filesystem(url, storage_options)
    fs.mv(path, filesystem(new_url, storage_options)[1])
    fs.invalidate_cache(path)


@_named_errors
def remove(url: str, storage_options: StorageOptions = None) -> None:
    """Delete a file or a whole directory tree; absent is fine."""
    fault_point("remove", url)
    if is_local(url):
        path = local_path(url)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=False)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        return
    fs, path = filesystem(url, storage_options)
    fs.invalidate_cache(path)
    with contextlib.suppress(FileNotFoundError):
        if fs.isdir(path):
            fs.rm(path, recursive=True)
        else:
            fs.rm(path)
    fs.invalidate_cache(path)
