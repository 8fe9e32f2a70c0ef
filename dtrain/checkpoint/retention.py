"""Find the checkpoints under a root and decide which ones retention may delete.

A directory `step-000001200/` is committed when its manifest.json is valid; without one it is
incomplete (still being written, or abandoned by a crash) and invisible to resume.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from dtrain.checkpoint import storage
from dtrain.checkpoint.format import DAMAGED, MANIFEST, Manifest, parse_manifest
from dtrain.errors import CheckpointError

log = logging.getLogger(__name__)
_DIR = re.compile(r"step-(\d{9,})")
_LOOKALIKE = re.compile(r"step-\d+")
NO_MANIFEST = "no manifest.json (incomplete)"


def step_dir(root: str, step: int) -> str:
    if step < 0:
        raise CheckpointError(f"checkpoint step must be >= 0, got {step}")
    return storage.join(root, f"step-{step:09d}")


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint directory as found on storage."""

    url: str
    step: int
    committed: bool
    created: float | None = None
    metrics: dict[str, float | None] = field(default_factory=dict)
    size_bytes: int | None = None
    world_size: int | None = None
    strategy: str | None = None
    reason: str | None = None
    problem: str | None = None  # why it is not committed (no manifest, invalid manifest)

    def metric(self, name: str | None) -> float | None:
        v = self.metrics.get(name) if name else None
        return v if v is not None and math.isfinite(v) else None


def step_of(url: str) -> int | None:
    """The step a checkpoint directory's name says, None unless `step_dir` writes that name
    (step-NNNNNNNNN, zero-padded to 9 digits). The one definition for resume, retention, ls and
    verify: `step-12` or `step-0000000012` is no dtrain checkpoint, so all of them leave it alone."""
    name = url.rstrip("/").rsplit("/", 1)[-1]
    m = _DIR.fullmatch(name)
    return int(m.group(1)) if m and name == f"step-{int(m.group(1)):09d}" else None


def is_step_dir(url: str) -> bool:
    """Whether the URL's last part is a checkpoint directory's name (step-NNNNNNNNN)."""
    return step_of(url) is not None


def list_root(root: str, storage_options: storage.StorageOptions = None) -> list[tuple[str, bool]]:
    """(name, is_directory) of each entry directly under `root` (empty when there is nothing): one
    listing, one LIST round trip on an object store, that `step_dirs`, `scan` and `lookalikes` can
    share. A root that is a file (an exported .safetensors, a manifest.json) is an error naming it,
    not a bare '[Errno 20] Not a directory'."""
    try:
        return storage.list_dir(root, storage_options)
    except NotADirectoryError:
        raise CheckpointError(not_a_directory(root)) from None


def step_dirs(root: str, storage_options: storage.StorageOptions = None,
              entries: list[tuple[str, bool]] | None = None) -> list[tuple[int, str]]:
    """(step, url) of every checkpoint directory (`step_of`) under `root`, oldest first; nothing
    else is read. `entries`: the root's `list_root`, when the caller has it already."""
    found = []
    for name, is_dir in list_root(root, storage_options) if entries is None else entries:
        step = step_of(name)
        if step is not None and is_dir:
            found.append((step, storage.join(root, name)))
    return sorted(found)


def not_a_directory(url: str) -> str:
    """What to say about a file given where a checkpoint directory or a root belongs."""
    hint = ""
    if url.endswith(".safetensors"):
        hint = ": an exported or other plain safetensors file loads with safetensors.torch.load_file"
    elif url.rstrip("/").rsplit("/", 1)[-1] in (MANIFEST, DAMAGED):
        hint = f": give the directory it is in, {storage.parent(url)}"
    return (f"{url} is a file, not a checkpoint directory (a step-NNNNNNNNN directory with {MANIFEST}) "
            f"or a root holding them{hint}")


def is_lookalike(url: str) -> bool:
    """Named step-<digits>, but not as dtrain names a checkpoint directory (`step_of` is None)."""
    name = url.rstrip("/").rsplit("/", 1)[-1]
    return _LOOKALIKE.fullmatch(name) is not None and step_of(name) is None


def lookalikes(root: str, storage_options: storage.StorageOptions = None,
               entries: list[tuple[str, bool]] | None = None) -> list[str]:
    """The `is_lookalike` directories under `root`: the tools say that they leave them alone, which
    would otherwise go unseen. `entries`: the root's `list_root`, so the tools list a root once."""
    return [storage.join(root, name) for name, is_dir in (list_root(root, storage_options) if entries is None
                                                            else entries) if is_dir and is_lookalike(name)]


def scan(root: str, storage_options: storage.StorageOptions = None,
         entries: list[tuple[str, bool]] | None = None) -> list[CheckpointInfo]:
    """Every `step-*` directory under `root`, oldest first, committed or not (`entries`: the root's
    `list_root`, when the caller has it already).

    The manager scans after every save, so a manifest seen before is not read again: a file's
    identity (size and modification stamp, storage.identity) is checked instead, one stat or HEAD
    per checkpoint (reading them cost 60 ms a save for 40 kept checkpoints of 4096 tensors here,
    and one GET each on S3); on an object store those run a few at a time."""
    dirs = step_dirs(root, storage_options, entries)
    if storage.is_local(root) or len(dirs) < 2:
        infos = [_scan_one(url, step, storage_options) for step, url in dirs]
    else:
        with ThreadPoolExecutor(_REMOTE_SCANS, thread_name_prefix="dtrain-scan") as pool:
            infos = list(pool.map(lambda d: _scan_one(d[1], d[0], storage_options), dirs))
    return sorted(infos, key=lambda i: i.step)


def _scan_one(url: str, step: int, storage_options: storage.StorageOptions) -> CheckpointInfo:
    url_manifest = storage.join(url, MANIFEST)
    ident = storage.identity(url_manifest, storage_options)
    known = ident is not None and storage.UNKNOWN not in ident  # else nothing to match it with
    info = _BY_IDENTITY.get((url, ident)) if known else None
    if info is None:
        data = None if ident is None else _manifest_bytes(url, storage_options)
        if data is None or isinstance(data, str):
            info = CheckpointInfo(url, step, False, problem=data or NO_MANIFEST)
        else:
            info = _info(url, step, data)
        if isinstance(data, bytes) and known:
            if len(_BY_IDENTITY) >= 1024:
                _BY_IDENTITY.clear()
            _BY_IDENTITY[(url, ident)] = info
    return replace(info, metrics=dict(info.metrics))  # a copy: callers may change its metrics


def resolve(url: str, storage_options: storage.StorageOptions = None) -> str:
    """A checkpoint directory as given, or the newest committed one under a root."""
    if storage.exists(storage.join(url, MANIFEST), storage_options):
        return url
    committed = [i for i in scan(url, storage_options) if i.committed]
    if not committed:
        storage.check_bucket(url, storage_options)  # in a bucket that is not there: say that
        raise CheckpointError(f"{url} is neither a committed checkpoint nor a root holding one")
    return committed[-1].url


def read_info(url: str, step: int, storage_options: storage.StorageOptions = None
              ) -> tuple[CheckpointInfo, Manifest | None]:
    """One checkpoint directory's info (a copy) and its parsed manifest, None when it has no valid
    manifest (the info's `problem` says why): a resume parses the manifest it loads once."""
    data = _manifest_bytes(url, storage_options)
    if data is None or isinstance(data, str):
        return CheckpointInfo(url, step, False, problem=data or NO_MANIFEST), None
    info, man = _parse_info(_key(url, data), step, data)
    return replace(info, metrics=dict(info.metrics)), man


def _manifest_bytes(url: str, storage_options: storage.StorageOptions) -> bytes | str | None:
    """The manifest's bytes; None when there is none; why, when it is there but can never be read
    (a directory, no permission): one such checkpoint must not stop every command on the root.
    Other errors (EIO, a network failure) may pass, so they are raised."""
    path = storage.join(url, MANIFEST)
    try:
        return storage.read_bytes(path, storage_options=storage_options)
    except FileNotFoundError:
        return None
    except (IsADirectoryError, NotADirectoryError, PermissionError) as e:
        return f"{path} cannot be read ({e.strerror or type(e).__name__}); fix its permissions or remove it"


_SEEN: dict[tuple[str, bytes], CheckpointInfo] = {}  # (url, digest of manifest bytes) -> what they said
_BY_IDENTITY: dict[tuple[str, Any], CheckpointInfo] = {}  # (url, storage.identity of its manifest) -> the same
_REMOTE_SCANS = 8  # manifests checked at once on an object store


def _info(url: str, step: int, data: bytes) -> CheckpointInfo:
    """What a manifest says about its checkpoint; a manifest already validated in this process (the
    same bytes) is not parsed again: the manager scans its root after every save, and parsing every
    kept checkpoint's manifest each time cost 0.14-0.4 s per 16k-tensor manifest."""
    key = _key(url, data)  # hashed once: a miss parses and stores under the same key
    return _SEEN.get(key) or _parse_info(key, step, data)[0]


def _parse_info(key: tuple[str, bytes], step: int, data: bytes) -> tuple[CheckpointInfo, Manifest | None]:
    """The info and parsed manifest of the checkpoint at `key[0]` (`key`: `_key` of its manifest
    bytes `data`); None, with the info's `problem`, when the manifest is invalid. The info is
    remembered, so later scans do not parse it again."""
    url = key[0]
    try:
        man = parse_manifest(data, storage.join(url, MANIFEST))
    except CheckpointError as e:
        return CheckpointInfo(url, step, False, problem=str(e)), None
    if man.step != step:
        return CheckpointInfo(url, step, False, problem=f"manifest says step {man.step}"), None
    return _store(key, man), man


def remember(url: str, data: bytes, man: Manifest) -> CheckpointInfo:
    """Record a validated manifest (`data` parses to `man`) of the checkpoint at `url`; the commit
    calls this, so the scan that follows it does not parse the new manifest again."""
    return _store(_key(url, data), man)


def _key(url: str, data: bytes) -> tuple[str, bytes]:
    return url, hashlib.blake2b(data, digest_size=16).digest()


def _store(key: tuple[str, bytes], man: Manifest) -> CheckpointInfo:
    info = CheckpointInfo(key[0], man.step, True, man.created, dict(man.metrics), man.total_bytes,
                          man.world_size, man.strategy, man.reason)
    if len(_SEEN) >= 1024:
        _SEEN.clear()
    _SEEN[key] = info
    return info


def best_of(infos: list[CheckpointInfo], monitor: str | None, mode: str) -> CheckpointInfo | None:
    """The committed checkpoint with the best monitored metric; on ties the oldest, the one that
    reached it first (as early stopping, which counts only a strict improvement as new best)."""
    scored = [i for i in infos if i.committed and i.metric(monitor) is not None]
    if not scored:
        return None
    sign = 1.0 if mode == "min" else -1.0
    return min(scored, key=lambda i: (sign * i.metric(monitor), i.step))  # type: ignore[operator]


def unranked(infos: list[CheckpointInfo], monitor: str) -> str | None:
    """Why the committed checkpoints cannot be ranked by `monitor` (none records a finite value of
    it; a typo, say), naming the metrics they do record; None when they can, or when none is committed."""
    committed = [i for i in infos if i.committed]
    if not committed or any(i.metric(monitor) is not None for i in committed):
        return None
    recorded = sorted({k for i in committed for k in i.metrics if i.metric(k) is not None})
    what = (f"every committed checkpoint records no finite value of {monitor!r} (NaN/inf, or none)"
            if any(monitor in i.metrics for i in committed) else f"no committed checkpoint records {monitor!r}")
    return f"{what}; the metrics they record: {', '.join(recorded) if recorded else 'none'}"


def to_delete(infos: list[CheckpointInfo], *, keep_last_n: int | None, keep_best_k: int | None,
              keep_every_n_steps: int | None, monitor: str | None, mode: str) -> list[CheckpointInfo]:
    """Checkpoints retention removes. Never the newest committed, never the best, never anything
    newer than the newest committed (it may be being written), never a directory whose manifest is
    present but unreadable (it may be a newer dtrain's)."""
    committed = [i for i in infos if i.committed]
    if not committed:
        return []
    newest = committed[-1]
    keep = {newest.step}
    best = best_of(committed, monitor, mode)
    if best is not None:
        keep.add(best.step)
    limited = keep_last_n is not None or keep_best_k is not None or keep_every_n_steps is not None
    if not limited:
        keep.update(i.step for i in committed)
    if keep_last_n is not None:
        keep.update(i.step for i in committed[-keep_last_n:] if keep_last_n > 0)
    if keep_best_k is not None and keep_best_k > 0:
        sign = 1.0 if mode == "min" else -1.0
        scored = sorted((i for i in committed if i.metric(monitor) is not None),
                        key=lambda i: (sign * i.metric(monitor), i.step))  # type: ignore[operator]
        keep.update(i.step for i in scored[:keep_best_k])
    if keep_every_n_steps:
        keep.update(i.step for i in committed if i.step % keep_every_n_steps == 0)
    doomed = [i for i in committed if i.step not in keep]
    doomed += [i for i in infos if not i.committed and i.problem == NO_MANIFEST and i.step < newest.step]
    return sorted(doomed, key=lambda i: i.step)


def apply(infos: list[CheckpointInfo], doomed: list[CheckpointInfo],
          storage_options: storage.StorageOptions = None) -> list[CheckpointInfo]:
    """Delete `doomed`: the manifest first, so a half-deleted checkpoint is never seen as committed."""
    removed = []
    for info in doomed:
        try:
            storage.remove(storage.join(info.url, MANIFEST), storage_options)
            storage.remove(info.url, storage_options)
            removed.append(info)
            log.info("retention removed %s (%s)", info.url, "committed" if info.committed else "incomplete")
        except (OSError, CheckpointError) as e:
            log.warning("retention could not remove %s: %s", info.url, e)
    return removed
