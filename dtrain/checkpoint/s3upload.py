"""S3 transport: a write-only object that uploads multipart parts concurrently, and the bounded
retry policy every remote storage call goes through.

s3fs's own file object uploads its parts one after another; a checkpoint shard is big, so we keep
a few parts in flight instead (bounded: at most `in_flight` parts plus the one being filled live in
memory). Nothing is visible until `close()` completes the upload; `discard()` aborts it, so a failed
save never leaves a partial object behind. Small objects are one PUT.

Retries: a transient failure (connection refused/reset/closed, timeout, HTTP 5xx except 501,
throttling) is retried `DTRAIN_STORAGE_ATTEMPTS` times in all (default 5) with exponential backoff
(0.5 s doubling, at most 8 s, jittered): a dead endpoint fails a call in about 10-20 s. Errors that
retrying cannot fix (403 denied, bad credentials, 404, 4xx) fail at once. botocore's own retries are
turned off by storage.py unless storage_options set them, so this is the one policy in force.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from dtrain.errors import CheckpointError

log = logging.getLogger(__name__)
T = TypeVar("T")
PART_BYTES = 16 << 20  # S3 needs >= 5 MiB for every part but the last
IN_FLIGHT = 4
ATTEMPTS = 5
BACKOFF_S = 0.5
BACKOFF_MAX_S = 8.0
_TRANSIENT_NAMES = {
    "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
    "HTTPClientError", "ResponseStreamingError", "IncompleteReadError", "ResponseParserError",
    "ClientPayloadError", "ServerDisconnectedError", "ClientConnectionError", "ClientOSError",
    "ServerTimeoutError", "FSTimeoutError",
}
_THROTTLING = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
               "RequestTimeout", "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable"}


def _attempts() -> int:
    try:
        return max(1, int(os.environ.get("DTRAIN_STORAGE_ATTEMPTS", ATTEMPTS)))
    except ValueError:
        return ATTEMPTS


def is_transient(exc: BaseException) -> bool:
    """True if retrying may help: the error, or one it was raised from, is a dropped connection,
    a timeout, a 5xx answer (not 501) or throttling. An S3 error code, where there is one, decides."""
    seen: set[int] = set()
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and id(e) not in seen and len(chain) < 10:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        response = getattr(e, "response", None)
        if isinstance(response, dict) and "Error" in response:
            code = str(response["Error"].get("Code", ""))
            status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            return code in _THROTTLING or status == 429 or (status >= 500 and status != 501)
    return any(type(e).__name__ in _TRANSIENT_NAMES or isinstance(e, (ConnectionError, TimeoutError))
               for e in chain)


def with_retries(call: Callable[[], T], url: str, what: str) -> T:
    """`call()`, retried with backoff while it fails transiently. After the last attempt the error
    is a CheckpointError naming `url`, the attempts and the time spent; other errors pass through."""
    attempts, start = _attempts(), time.monotonic()
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as e:
            if not is_transient(e):
                raise
            if attempt == attempts:
                raise CheckpointError(
                    f"{url}: {what} still failing after {attempts} attempts over "
                    f"{time.monotonic() - start:.1f} s: {type(e).__name__}: {e} (the storage endpoint is down, "
                    f"unreachable or overloaded; DTRAIN_STORAGE_ATTEMPTS sets the attempts)") from e
            delay = min(BACKOFF_MAX_S, BACKOFF_S * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            log.warning("%s: %s failed (%s: %s); retry %d of %d in %.1f s", url, what, type(e).__name__,
                        e, attempt, attempts - 1, delay)
            time.sleep(delay)  # backoff, not synchronisation
    raise AssertionError("unreachable")


class ConcurrentS3Writer:
    def __init__(self, fs: Any, path: str, part_bytes: int | None = None, in_flight: int = IN_FLIGHT) -> None:
        self.fs, self.path = fs, path
        self.url = f"s3://{path}"
        self.bucket, self.key, _ = fs.split_path(path)
        self.part_bytes = max(5 << 20, part_bytes or PART_BYTES)
        self._buf = bytearray()
        self._upload_id: str | None = None
        self._futures: list[Future[dict[str, Any]]] = []
        self._slots = threading.Semaphore(in_flight)
        self._pool = ThreadPoolExecutor(in_flight, thread_name_prefix="dtrain-s3")
        self.closed = False

    def write(self, data: bytes | memoryview) -> int:
        mv = memoryview(data).cast("B")
        n = len(mv)
        while len(mv):
            take = min(self.part_bytes - len(self._buf), len(mv))
            self._buf += mv[:take]
            mv = mv[take:]
            if len(self._buf) >= self.part_bytes:
                self._send_part()
        return n

    def _send_part(self) -> None:
        for f in self._futures:  # fail fast: an upload error surfaces on the next write
            if f.done() and f.exception() is not None:
                raise f.exception()  # type: ignore[misc]
        if self._upload_id is None:
            out = self._call("create_multipart_upload", Bucket=self.bucket, Key=self.key)
            self._upload_id = out["UploadId"]
        data, self._buf = bytes(self._buf), bytearray()
        self._slots.acquire()  # bounds memory: wait while `in_flight` parts are uploading
        self._futures.append(self._pool.submit(self._upload, len(self._futures) + 1, data))

    def _upload(self, number: int, data: bytes) -> dict[str, Any]:
        try:
            out = self._call("upload_part", Bucket=self.bucket, Key=self.key, PartNumber=number,
                             UploadId=self._upload_id, Body=data)
            return {"PartNumber": number, "ETag": out["ETag"]}
        finally:
            self._slots.release()

    def _call(self, op: str, **kwargs: Any) -> dict[str, Any]:
        return with_retries(lambda: self.fs.call_s3(op, **kwargs), self.url, op)

    def _complete(self, parts: list[dict[str, Any]]) -> None:
        """CompleteMultipartUpload; when a retry finds the upload gone, the lost answer of an earlier
        attempt had committed it: the object is there, which is success."""
        tries = [0]

        def complete() -> dict[str, Any]:
            tries[0] += 1
            try:
                return self.fs.call_s3("complete_multipart_upload", Bucket=self.bucket, Key=self.key,
                                       UploadId=self._upload_id, MultipartUpload={"Parts": parts})
            except Exception as e:
                if tries[0] > 1 and "NoSuchUpload" in f"{e} {e.__cause__}":
                    head = self.fs.call_s3("head_object", Bucket=self.bucket, Key=self.key)
                    return dict(head)
                raise

        with_retries(complete, self.url, "complete_multipart_upload")

    def close(self) -> None:
        """Commit: one PUT for a small object, else the last part and CompleteMultipartUpload."""
        if self.closed:
            return
        try:
            if self._upload_id is None:
                self._call("put_object", Bucket=self.bucket, Key=self.key, Body=bytes(self._buf))
            else:
                if self._buf:
                    self._send_part()
                parts = [f.result() for f in self._futures]
                self._complete(parts)
        except BaseException:
            self._pool.shutdown(wait=True, cancel_futures=True)
            if self._upload_id is not None:  # free the uploaded parts; nothing became visible
                try:
                    self.fs.call_s3("abort_multipart_upload", Bucket=self.bucket, Key=self.key,
                                    UploadId=self._upload_id)
                except Exception as e:
                    log.warning("%s: could not abort the multipart upload: %s", self.url, e)
            raise
        finally:
            self.closed = True
            self._pool.shutdown(wait=True)
            self.fs.invalidate_cache(self.path)

    def discard(self) -> None:
        """Abort: no object appears, and the uploaded parts are freed."""
        if self.closed:
            return
        self.closed = True
        for f in self._futures:
            f.cancel()
        self._pool.shutdown(wait=True)
        self._buf = bytearray()
        if self._upload_id is not None:
            self._call("abort_multipart_upload", Bucket=self.bucket, Key=self.key, UploadId=self._upload_id)
