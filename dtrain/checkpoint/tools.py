"""Checkpoint tools behind `dtrain ckpt`: list, inspect, verify, export, prune.

`verify` re-reads every byte and reports every problem instead of stopping at the first; `export`
assembles full model tensors (whatever layout saved them) into a plain safetensors file, or shards
plus model.safetensors.index.json, that `safetensors.torch.load_file` reads without dtrain.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import posixpath
import re
import uuid
from dataclasses import dataclass

import torch

from dtrain.checkpoint import retention, storage
from dtrain.checkpoint.checksum import crc32, crc32_combine, format_crc, parse_crc
from dtrain.checkpoint.fill import fill_tensor
from dtrain.checkpoint.format import DAMAGED, MANIFEST, Chunk, Manifest, NonFiniteTensorError
from dtrain.checkpoint.jsoncodec import loads
from dtrain.checkpoint.localfs import fsync_dir
from dtrain.checkpoint.plan import MODEL, Box
from dtrain.checkpoint.reader import ChunkReader, read_manifest
from dtrain.checkpoint.retention import CheckpointInfo, resolve, scan
from dtrain.checkpoint.stfile import DTYPES, dtype_name, read_header
from dtrain.checkpoint.writer import write_small_file, write_tensor_file
from dtrain.errors import CheckpointError

_PIECE = 16 << 20
_INDEX = "model.safetensors.index.json"
_EXPORT_NAME = re.compile(r"model-\d{5,}-of-\d{5,}\.safetensors|model\.safetensors(\.index\.json)?")
# --dtype names: ours and torch's (Hugging Face users type bfloat16)
EXPORT_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                  "float16": torch.float16, "half": torch.float16, "fp32": torch.float32,
                  "float32": torch.float32, "float": torch.float32}


@dataclass(frozen=True)
class TensorInfo:
    key: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    chunks: tuple[Chunk, ...]


def list_checkpoints(root: str, storage_options: storage.StorageOptions = None) -> list[CheckpointInfo]:
    return scan(root, storage_options)


def inspect(url: str, storage_options: storage.StorageOptions = None) -> tuple[Manifest, list[TensorInfo]]:
    """The manifest and every tensor's dtype, global shape, size and shard layout."""
    man = read_manifest(resolve(url, storage_options), storage_options)
    infos = [TensorInfo(k, t.dtype, t.shape, math.prod(t.shape) * DTYPES[t.dtype].itemsize, t.chunks)
             for k, t in sorted(man.tensors.items())]
    return man, infos


def is_set_aside(url: str, storage_options: storage.StorageOptions = None) -> bool:
    """A checkpoint directory whose manifest a resume renamed to `manifest.json.damaged`: it has no
    manifest, but its files stay for `verify`, which otherwise could only say "incomplete"."""
    return (not storage.exists(storage.join(url, MANIFEST), storage_options)
            and storage.exists(storage.join(url, DAMAGED), storage_options))


def verify(url: str, storage_options: storage.StorageOptions = None, check_finite: bool = False) -> list[str]:
    """Every problem found in a checkpoint directory (empty list = sound): manifest validity, each
    file's presence, size and CRC, each safetensors header, each chunk's CRC, state.json; with
    `check_finite`, also every NaN/inf in a floating-point tensor."""
    name, problems = MANIFEST, []
    if is_set_aside(url, storage_options):  # the files a resume found damaged: check them against it
        name = DAMAGED
        problems.append(f"{storage.join(url, DAMAGED)}: set aside as damaged by a resume (no longer committed); "
                        f"its files were checked against this manifest")
    try:
        man = read_manifest(url, storage_options, name)
    except CheckpointError as e:
        return [*problems, str(e)]
    except (IsADirectoryError, NotADirectoryError, PermissionError) as e:  # never readable: report, go on
        return [*problems, f"{storage.join(url, name)} cannot be read ({e.strerror or type(e).__name__})"]
    named = retention.step_of(url)  # another name (a copy, `step-12`) says nothing about the step
    if named is not None and named != man.step:  # resume would ignore it: it is not that step's
        problems.append(f"{storage.join(url, name)}: manifest says step {man.step}, the directory is step {named}")
    by_file: dict[str, list[tuple[str, Chunk]]] = {}
    for key, t in man.tensors.items():
        for c in t.chunks:
            by_file.setdefault(c.file, []).append((key, c))
    for entry in man.files:
        furl = storage.join(url, entry.path)
        try:
            size = storage.size(furl, storage_options)
        except FileNotFoundError:
            problems.append(f"{furl}: listed in the manifest but missing")
            continue
        if size != entry.size:
            problems.append(f"{furl}: size {size} bytes, manifest says {entry.size}")
            continue
        if entry.path.endswith(".safetensors"):
            problems += _verify_tensor_file(furl, entry.size, entry.checksum, by_file.get(entry.path, []),
                                            storage_options)
        else:  # state.json, rng-*.json
            problems += _verify_small_file(furl, entry.checksum, storage_options)
    if check_finite and not problems:
        problems += non_finite_tensors(url, storage_options)
    return problems


def non_finite_tensors(url: str, storage_options: storage.StorageOptions = None) -> list[str]:
    """One line per stored chunk of a floating-point tensor that holds NaN or inf, naming the
    tensor, its file and the box; reads (and checksums) every such chunk, one at a time."""
    man = read_manifest(url, storage_options)
    reader = ChunkReader(url, man, storage_options)
    found = []
    try:
        for key, t in sorted(man.tensors.items()):
            dt = DTYPES[t.dtype]
            if not (dt.is_floating_point or dt.is_complex):
                continue
            for c in t.chunks:
                data = torch.empty(c.lengths, dtype=dt)
                reader.read(key, c, data)
                bad = int((~torch.isfinite(data if data.element_size() > 1 else data.float())).sum())
                if bad:
                    found.append(f"{storage.join(url, c.file)}: tensor {key!r} has {bad} non-finite value(s) "
                                 f"(NaN/inf) in its box at {list(c.offsets)} of shape {list(c.lengths)}")
    finally:
        reader.close()
    return found


def refuse_non_finite(url: str, storage_options: storage.StorageOptions = None) -> None:
    """NonFiniteTensorError naming the tensors and files if any float tensor holds NaN/inf."""
    bad = non_finite_tensors(url, storage_options)
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise NonFiniteTensorError(f"{url}: refusing to load non-finite values (check_finite is on): "
                                   + "; ".join(bad[:3]) + more)


def _verify_small_file(furl: str, checksum: str, so: storage.StorageOptions) -> list[str]:
    data = storage.read_bytes(furl, storage_options=so)
    if crc32(data) != parse_crc(checksum):
        return [f"{furl}: checksum {format_crc(crc32(data))}, manifest says {checksum}"]
    try:
        if furl.endswith(".json"):
            loads(data, furl)
    except CheckpointError as e:
        return [str(e)]
    return []


def _verify_tensor_file(furl: str, size: int, checksum: str, chunks: list[tuple[str, Chunk]],
                        so: storage.StorageOptions) -> list[str]:
    problems = []
    with storage.open_read(furl, so) as f:
        def read_range(start: int, end: int) -> bytes:
            f.seek(start)
            return f.read(end - start)
        try:
            header = read_header(read_range, size, furl)
        except CheckpointError as e:
            return [str(e)]
        crc = crc32(read_range(0, header.data_start))
        spans = {(e.begin, e.end): e for e in header.entries.values()}
        at: dict[tuple[int, int], list[tuple[str, Chunk]]] = {}  # byte range -> chunks there (tied: several)
        for key, c in sorted(chunks, key=lambda kc: kc[1].data_offsets):
            at.setdefault(c.data_offsets, []).append((key, c))
            st = spans.get(c.data_offsets)
            if st is None or st.shape != c.lengths:
                problems.append(f"{furl}: tensor {key!r} bytes {list(c.data_offsets)} do not match the file header")
        pos = header.data_start
        for begin, end in sorted(spans):
            part = 0
            f.seek(begin)
            for off in range(begin, end, _PIECE):
                part = crc32(f.read(min(_PIECE, end - off)), part)
            crc = crc32_combine(crc, part, end - begin)
            pos = end
            for key, c in at.get((begin, end), []):
                if parse_crc(c.checksum) != part:
                    problems.append(f"{furl}: checksum mismatch in tensor {key!r} ({format_crc(part)}, "
                                    f"manifest says {c.checksum})")
        if pos != size:
            problems.append(f"{furl}: {size - pos} bytes after the last tensor")
    if crc != parse_crc(checksum):
        problems.append(f"{furl}: file checksum {format_crc(crc)}, manifest says {checksum}")
    return problems


def export(url: str, out: str, *, dtype: str | torch.dtype | None = None, max_shard_bytes: int | None = None,
           storage_options: storage.StorageOptions = None) -> list[str]:
    """Write the full model weights as `out` (one .safetensors file), or, past `max_shard_bytes`,
    as shards plus model.safetensors.index.json in the directory `out`. Returns the files written."""
    if not out.strip():
        raise CheckpointError("export needs an output path, got an empty one")
    src = resolve(url, storage_options)
    if _inside(out, src):
        raise CheckpointError(f"--out {out} is inside the checkpoint {src} that export reads: writing there would "
                              f"destroy it; give a path outside it")
    if out.endswith(".safetensors") and storage.is_local(out) and os.path.isdir(storage.local_path(out)):
        # found before any tensor is read: the final rename onto it would fail, naming a temporary file
        raise CheckpointError(f"--out {out} is a directory: a path ending in .safetensors names the file to "
                              f"write; to write model.safetensors (or shards) into that directory, add a "
                              f"trailing slash ({out}/)")
    man = read_manifest(src, storage_options)
    cast = EXPORT_DTYPES.get(dtype.lower(), None) if isinstance(dtype, str) else dtype
    if isinstance(dtype, str) and cast is None:
        raise CheckpointError(f"export dtype {dtype!r} is not one of {sorted(EXPORT_DTYPES)}")
    reader = ChunkReader(src, man, storage_options)
    plan = []
    for key, t in sorted(man.tensors.items()):
        if not key.startswith(MODEL):
            continue
        dt = DTYPES[t.dtype]
        to = cast if cast is not None and dt.is_floating_point else dt
        plan.append((Box(key[len(MODEL):], dtype_name(to), t.shape, (0,) * len(t.shape), t.shape),
                     _loader(reader, key, dt, to, t.shape)))
    try:
        return _write_export(plan, out, max_shard_bytes, storage_options)
    finally:
        reader.close()


def _write_export(plan: list, out: str, max_shard_bytes: int | None, storage_options: storage.StorageOptions
                  ) -> list[str]:
    total = sum(b.nbytes for b, _ in plan)
    if max_shard_bytes is None or total <= max_shard_bytes:
        into_dir = not out.endswith(".safetensors")
        target = storage.join(out, "model.safetensors") if into_dir else out
        files = [(target, plan)]
        index = None
    else:
        into_dir = True
        shards: list[list[tuple[Box, object]]] = [[]]
        for item in plan:
            if shards[-1] and sum(b.nbytes for b, _ in shards[-1]) + item[0].nbytes > max_shard_bytes:
                shards.append([])
            shards[-1].append(item)
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        weight_map = {b.key: name for name, shard in zip(names, shards, strict=True) for b, _ in shard}
        files = [(storage.join(out, name), shard) for name, shard in zip(names, shards, strict=True)]
        index = (storage.join(out, _INDEX), json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                       indent=2).encode("utf-8"))
    _make_parent(files[0][0], storage_options)
    if storage.is_local(out):
        written = _write_local(files, index)
    else:  # each PUT / multipart upload is atomic by itself; the index goes last
        old_index = storage.join(out, _INDEX)
        if into_dir and storage.exists(old_index, storage_options):
            # no rename here: an earlier index left over shards half overwritten would mix two
            # checkpoints' weights; without one, a failed export is seen as one
            storage.remove(old_index, storage_options)
        for url, items in files:
            write_tensor_file(url, url.rsplit("/", 1)[-1], items, storage_options, {"format": "pt"})
        if index is not None:
            storage.write_atomic(index[0], index[1], storage_options)
        written = [url for url, _ in files] + ([index[0]] if index else [])
    if into_dir:  # as save_pretrained does: an earlier export's other files would mix with this one
        for stale in export_files(out, storage_options):
            if stale not in written:
                storage.remove(stale, storage_options)
    return written


def _write_local(files: list, index: tuple[str, bytes] | None) -> list[str]:
    """Write each file under a temporary name beside it, then rename them into place, the index
    last: a failure leaves whatever was at the targets untouched and no temporaries behind."""
    temps: list[tuple[str, str]] = []  # (temporary, final)
    try:
        for url, items in files:
            temps.append((_temp_name(url), url))
            write_tensor_file(temps[-1][0], url, items, None, {"format": "pt"})
        if index is not None:
            temps.append((_temp_name(index[0]), index[0]))
            write_small_file(temps[-1][0], index[0], index[1])
        for tmp, final in temps:
            os.replace(storage.local_path(tmp), storage.local_path(final))
    except BaseException:
        for tmp, _ in temps:
            with contextlib.suppress(OSError):
                os.unlink(storage.local_path(tmp))
        raise
    fsync_dir(os.path.dirname(os.path.abspath(storage.local_path(temps[0][1]))))
    return [final for _, final in temps]


def _temp_name(url: str) -> str:
    path = storage.local_path(url)
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")


def export_files(directory: str, storage_options: storage.StorageOptions = None) -> list[str]:
    """The files in `directory` named as export names its output (model.safetensors, its index, and
    model-NNNNN-of-NNNNN.safetensors shards)."""
    try:
        entries = storage.list_dir(directory, storage_options)
    except NotADirectoryError:
        return []
    return [storage.join(directory, name) for name, is_dir in entries if not is_dir and _EXPORT_NAME.fullmatch(name)]


def _inside(out: str, src: str) -> bool:
    """Whether `out` is the checkpoint directory `src` or a path under it."""
    if storage.is_local(out) != storage.is_local(src):
        return False
    if storage.is_local(out):
        a, b = (os.path.realpath(storage.local_path(u)) for u in (out, src))
        return a == b or a.startswith(b.rstrip(os.sep) + os.sep)
    a, b = (_normal_url(u) for u in (out, src))
    return a == b or a.startswith(b + "/")


def _normal_url(url: str) -> str:
    scheme, _, path = url.partition("://")
    return f"{scheme.lower()}://{posixpath.normpath('/' + path).lstrip('/')}"


def _loader(reader: ChunkReader, key: str, dt: torch.dtype, to: torch.dtype, shape: tuple[int, ...]):  # noqa: ANN202
    def load() -> torch.Tensor:
        full = torch.empty(shape, dtype=dt)
        fill_tensor(reader, key, full)
        return full if to == dt else full.to(to)
    return load


def _make_parent(target: str, so: storage.StorageOptions) -> None:
    """Create the directory `target` goes in (on S3: check that its bucket exists)."""
    parent = storage.parent(target)
    if storage.is_local(target):
        _no_file_on_the_way(parent, target)
    storage.makedirs(parent, so)


def _no_file_on_the_way(directory: str, target: str) -> None:
    """makedirs over a regular file says only '[Errno 17] File exists': name the file instead."""
    path = os.path.abspath(directory)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointError(f"{path} is a file, not a directory: cannot write {target} under it; "
                              f"give another --out")


def prune(root: str, *, keep_last_n: int | None = None, keep_best_k: int | None = None,
          keep_every_n_steps: int | None = None, monitor: str | None = None, mode: str = "min",
          storage_options: storage.StorageOptions = None, dry_run: bool = False) -> list[CheckpointInfo]:
    """Apply retention rules once (the rules the manager applies after each save); returns the
    checkpoints removed (with `dry_run`, those it would remove, removing nothing). The newest
    committed and the best by `monitor` are kept. A `monitor` no committed checkpoint records (a typo)
    is refused, as `dtrain ckpt prune` refuses it: the best would go unprotected."""
    infos = scan(root, storage_options)
    doomed = plan_prune(infos, root, keep_last_n=keep_last_n, keep_best_k=keep_best_k,
                        keep_every_n_steps=keep_every_n_steps, monitor=monitor, mode=mode)
    return doomed if dry_run else retention.apply(infos, doomed, storage_options)


def plan_prune(infos: list[CheckpointInfo], root: str, *, keep_last_n: int | None, keep_best_k: int | None,
               keep_every_n_steps: int | None, monitor: str | None, mode: str,
               source: str | None = None) -> list[CheckpointInfo]:
    """What `prune` would delete from `infos` (the checkpoints under `root`); CheckpointError, before
    anything is deleted, for a ranking that could not find the best: keep_best_k without a monitor,
    a mode other than min/max, a monitor that no committed checkpoint records. `source`: where the
    monitor came from, for `dtrain ckpt prune` to name (--monitor, the run's early_stopping config)."""
    if mode not in ("min", "max"):
        raise CheckpointError(f"prune mode={mode!r} must be 'min' or 'max'")
    if keep_best_k is not None and not monitor:
        raise CheckpointError(f"prune keep_best_k={keep_best_k} needs monitor=<the metric to rank by>")
    problem = retention.unranked(infos, monitor) if monitor else None
    if problem is not None:
        came = f" (this one came from {source}): pass one of them as --monitor" if source else ": pass one of them"
        raise CheckpointError(f"{root}: {problem}; prune keeps the best by monitor={monitor!r}{came} (nothing "
                              f"was deleted)")
    return retention.to_delete(infos, keep_last_n=keep_last_n, keep_best_k=keep_best_k,
                               keep_every_n_steps=keep_every_n_steps, monitor=monitor, mode=mode)
