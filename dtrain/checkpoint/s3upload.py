"""A write-only S3 object that uploads multipart parts concurrently.

s3fs's own file object uploads its parts one after another; a checkpoint shard is big, so we keep
a few parts in flight instead (bounded: at most `in_flight` parts plus the one being filled live in
memory). Nothing is visible until `close()` completes the upload; `discard()` aborts it, so a failed
save never leaves a partial object behind. Small objects are one PUT.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

PART_BYTES = 16 << 20  # S3 needs >= 5 MiB for every part but the last
IN_FLIGHT = 4


class ConcurrentS3Writer:
    def __init__(self, fs: Any, path: str, part_bytes: int | None = None, in_flight: int = IN_FLIGHT) -> None:
        self.fs, self.path = fs, path
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
            out = self.fs.call_s3("create_multipart_upload", Bucket=self.bucket, Key=self.key)
            self._upload_id = out["UploadId"]
        data, self._buf = bytes(self._buf), bytearray()
        self._slots.acquire()  # bounds memory: wait while `in_flight` parts are uploading
        self._futures.append(self._pool.submit(self._upload, len(self._futures) + 1, data))

    def _upload(self, number: int, data: bytes) -> dict[str, Any]:
        try:
            out = self.fs.call_s3("upload_part", Bucket=self.bucket, Key=self.key, PartNumber=number,
                                  UploadId=self._upload_id, Body=data)
            return {"PartNumber": number, "ETag": out["ETag"]}
        finally:
            self._slots.release()

    def close(self) -> None:
        """Commit: one PUT for a small object, else the last part and CompleteMultipartUpload."""
        if self.closed:
            return
        try:
            if self._upload_id is None:
                self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=bytes(self._buf))
            else:
                if self._buf:
                    self._send_part()
                parts = [f.result() for f in self._futures]
                self.fs.call_s3("complete_multipart_upload", Bucket=self.bucket, Key=self.key,
                                UploadId=self._upload_id, MultipartUpload={"Parts": parts})
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
            self.fs.call_s3("abort_multipart_upload", Bucket=self.bucket, Key=self.key, UploadId=self._upload_id)
