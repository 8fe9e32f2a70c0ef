"""`dtrain ckpt`: list, inspect, verify, export and prune checkpoints from the shell.

A thin layer over dtrain.checkpoint.tools: it parses arguments, picks the checkpoint a URL means
(a checkpoint directory, or the newest / best committed one under a root), and prints tables or
JSON. Errors dtrain raises on purpose become one `dtrain ckpt: error: ...` line and exit code 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from typing import Any

from dtrain.checkpoint import retention, storage, tools
from dtrain.checkpoint.clifmt import (
    LAYOUT_PIECES,
    Size,
    format_metrics,
    human_bytes,
    parse_size_arg,
    parse_storage_option,
    storage_options_of,
    table,
    tensor_layout,
    utc,
)
from dtrain.checkpoint.format import DAMAGED, MANIFEST
from dtrain.checkpoint.plan import MODEL
from dtrain.checkpoint.reader import read_manifest, read_state
from dtrain.checkpoint.retention import CheckpointInfo
from dtrain.checkpoint.stfile import DTYPES
from dtrain.errors import CheckpointError, DtrainError

PROG = "dtrain ckpt"


# ---- messages -----------------------------------------------------------------------------------
_FOREIGN = ("not a dtrain checkpoint directory name (dtrain writes step-NNNNNNNNN, the step zero-padded to 9 "
            "digits): resume, retention, ls, verify and prune of the root leave it alone")


def _note(text: str) -> None:
    print(f"{PROG}: note: {text}", file=sys.stderr)


def _note_lookalikes(root: str, entries: list[tuple[str, bool]]) -> None:
    for url in retention.lookalikes(root, entries=entries):
        _note(f"{url}: {_FOREIGN}")


def _list_root(url: str, so: dict[str, Any]) -> list[tuple[str, bool]]:
    """The root's entries, listed once for the scan, the lookalike notes and the is-it-a-checkpoint
    check (on an object store each listing is a LIST round trip); an error if nothing is there."""
    entries = retention.list_root(url, so)
    if not entries and not storage.exists(url, so):
        storage.check_bucket(url, so)  # a missing bucket is named
        raise CheckpointError(f"{url} does not exist (no checkpoints there)")
    return entries


def _holds_manifest(entries: list[tuple[str, bool]]) -> bool:
    return any(name == MANIFEST for name, _ in entries)


# ---- choosing a checkpoint ----------------------------------------------------------------------
def _monitor(args: argparse.Namespace, infos: list[CheckpointInfo], so: dict[str, Any]) -> tuple[str, str, str]:
    """(metric, mode, where they came from): --monitor, else the run's early_stopping config saved in
    the newest committed checkpoint, else val/loss. Without --mode, the mode is the saved config's when
    it monitors the same metric (val/acc is maximised), else min."""
    if getattr(args, "monitor", None) and args.mode:
        return args.monitor, args.mode, "--monitor"
    saved = _saved_early_stopping(infos, so)
    if getattr(args, "monitor", None):
        if saved is not None and saved[0] == args.monitor:
            return args.monitor, saved[1], "--monitor, mode from the run's early_stopping config"
        return args.monitor, "min", "--monitor, mode min by default: give --mode max if higher is better"
    if saved is not None:
        return saved[0], args.mode or saved[1], "the run's early_stopping config"
    return "val/loss", args.mode or "min", "the default"


def _saved_early_stopping(infos: list[CheckpointInfo], so: dict[str, Any]) -> tuple[str, str] | None:
    """(monitor, mode) of the early_stopping config saved in the newest committed checkpoint."""
    committed = [i for i in infos if i.committed]
    if not committed:
        return None
    try:
        state = read_state(committed[-1].url, read_manifest(committed[-1].url, so), so)
        es = ((state.get("extra") or {}).get("config") or {}).get("early_stopping") or {}
        if isinstance(es.get("monitor"), str) and es.get("mode") in ("min", "max"):
            return es["monitor"], es["mode"]
    except (CheckpointError, OSError, AttributeError):
        pass
    return None


def _pick(args: argparse.Namespace, so: dict[str, Any]) -> str:
    """The checkpoint directory the URL means for inspect/export (newest, or best with --best)."""
    url = args.url
    if storage.exists(storage.join(url, MANIFEST), so):
        if getattr(args, "best", False):
            _note(f"--best ignored: {url} is a checkpoint directory, not a root")
        return url
    if not getattr(args, "best", False):
        return tools.resolve(url, so)
    infos = retention.scan(url, so)
    monitor, mode, source = _monitor(args, infos, so)
    _require_monitor(infos, monitor, source, url)
    best = retention.best_of(infos, monitor, mode)
    if best is None:  # nothing committed
        return tools.resolve(url, so)
    _note(f"best checkpoint by {monitor} ({mode}, from {source}): step {best.step}, "
          f"{monitor}={best.metric(monitor):.6g}")
    return best.url


def _require_monitor(infos: list[CheckpointInfo], monitor: str, source: str, url: str) -> None:
    """--best by a metric no checkpoint records would silently pick the newest: refuse, naming the
    metrics there are (prune's own rule is tools.plan_prune's)."""
    problem = retention.unranked(infos, monitor)
    if problem is not None:
        raise CheckpointError(f"{url}: {problem}; --best needs one of them as --monitor (this one came from "
                              f"{source})")


# ---- sub-commands -------------------------------------------------------------------------------
def cmd_ls(args: argparse.Namespace, so: dict[str, Any]) -> int:
    entries = _list_root(args.url, so)
    infos = retention.scan(args.url, so, entries)
    if _holds_manifest(entries) or (not infos and retention.is_step_dir(args.url)):
        raise CheckpointError(f"{args.url} is a checkpoint directory, not a root: use `{PROG} inspect {args.url}` "
                              f"on it, or `{PROG} ls {storage.parent(args.url)}`")
    monitor, mode, _ = _monitor(args, infos, so)
    best = retention.best_of(infos, monitor, mode)
    _note_lookalikes(args.url, entries)
    if not infos:
        inner = storage.join(args.url, "checkpoints")
        if retention.step_dirs(inner, so):
            _note(f"no checkpoints under {args.url}; did you mean {inner}?")
    if args.json:
        print(json.dumps([{**dataclasses.asdict(i), "status": _status(i, so), "best": best is not None and i.url == best.url,
                            "time_utc": None if utc(i.created) == "-" else utc(i.created) + "Z"} for i in infos], indent=1))
        return 0
    if not infos:
        print(f"no checkpoints under {args.url}")
        return 0
    rows = []
    for i in infos:
        status = _status(i, so)
        status += (f", best {monitor}" if best is not None and i.url == best.url else "") if i.committed else (
            f": {_problem(i, status)}")
        rows.append([str(i.step), utc(i.created), human_bytes(i.size_bytes),
                     f"{i.world_size} {i.strategy}" if i.committed else "-", i.reason or "-",
                     format_metrics(i.metrics) if i.committed else "-", status])
    print(table(["STEP", "TIME (UTC)", "SIZE", "RANKS", "REASON", "METRICS", "STATUS"], rows))
    return 0


def _status(i: CheckpointInfo, so: dict[str, Any]) -> str:
    """committed; incomplete (no manifest: being written, or abandoned); set aside (damaged: a resume
    renamed its manifest); invalid (a manifest this dtrain cannot use: damaged, unreadable, another
    step's, a newer schema)."""
    if i.committed:
        return "committed"
    if i.problem != retention.NO_MANIFEST:
        return "invalid"
    return "set aside" if tools.is_set_aside(i.url, so) else "incomplete"


def _problem(i: CheckpointInfo, status: str) -> str:
    """What `ls` and `verify` say about a checkpoint that is not committed."""
    if status == "set aside":
        return f"damaged, its manifest renamed {DAMAGED} by a resume; `{PROG} verify {i.url}` says why"
    return (i.problem or "?").removesuffix(" (incomplete)")


def cmd_inspect(args: argparse.Namespace, so: dict[str, Any]) -> int:
    url = _pick(args, so)
    man, tensors = tools.inspect(url, so)
    if args.json:
        print(json.dumps({"url": url, **json.loads(man.to_json())}, indent=1))
        return 0
    for name, value in (("checkpoint", url), ("step", man.step), ("created", utc(man.created) + " UTC"),
                        ("world size", man.world_size), ("strategy", man.strategy), ("reason", man.reason),
                        ("metrics", format_metrics(man.metrics)),
                        ("versions", ", ".join(f"{k} {v}" for k, v in sorted(man.versions.items())))):
        print(f"{name:<11} {value}")
    print(f"\nfiles ({len(man.files)}, {human_bytes(man.total_bytes)}):")
    print(table(["FILE", "SIZE", "CHECKSUM"], [[f.path, human_bytes(f.size), f.checksum] for f in man.files]))
    print(f"\ntensors ({len(tensors)}):")
    first: dict[tuple[tuple[str, tuple[int, int]], ...], str] = {}  # stored bytes -> the first key on them
    rows, many = [], 0  # many: tensors whose layout names only the first and last piece
    for t in tensors:
        where = tuple((c.file, c.data_offsets) for c in t.chunks)
        tied = first.setdefault(where, t.key) if where else t.key
        layout = tensor_layout(t) if tied == t.key else f"the bytes of {tied} (tied)"
        many += tied == t.key and len(t.chunks) > LAYOUT_PIECES
        rows.append([t.key, t.dtype, str(list(t.shape)), human_bytes(t.nbytes), layout])
    print(table(["TENSOR", "DTYPE", "SHAPE", "SIZE", "LAYOUT (file[box])"], rows))
    if many:
        _note(f"{many} tensor(s) in more than {LAYOUT_PIECES} pieces show the first and last only; "
              f"`{PROG} inspect {url} --json` lists every piece")
    return 0


def cmd_verify(args: argparse.Namespace, so: dict[str, Any]) -> int:
    entries = _list_root(args.url, so)  # not "manifest.json does not exist ... it may be incomplete"
    if _holds_manifest(entries):
        targets = [args.url]
        if retention.is_lookalike(args.url):  # a copy or another tool's: its files are checked all the same
            _note(f"{args.url}: {_FOREIGN}; its files are checked against its manifest all the same")
    else:
        infos = retention.scan(args.url, so, entries)
        foreign = retention.lookalikes(args.url, entries=entries)
        targets = [i.url for i in infos if i.committed or i.problem != retention.NO_MANIFEST]
        for i in infos:
            if i.problem == retention.NO_MANIFEST:
                print(f"SKIP {i.url}: {_problem(i, _status(i, so))}")
        for url in foreign:
            print(f"SKIP {url}: {_FOREIGN}")
        if not infos and not foreign:
            targets = [args.url]  # verify() says why this is not a checkpoint
        elif not targets:
            print(f"no committed checkpoint under {args.url}: nothing verified")
            return 1
    bad = 0
    for url in targets:
        problems = tools.verify(url, so, check_finite=args.check_finite)
        bad += bool(problems)
        print(f"{'FAILED' if problems else 'OK'} {url}" + (f": {len(problems)} problem(s)" if problems else ""))
        for p in problems:
            print(f"  {p}")
    if len(targets) > 1:
        print(f"{len(targets) - bad} of {len(targets)} checkpoint(s) sound")
    return 1 if bad else 0


def cmd_export(args: argparse.Namespace, so: dict[str, Any]) -> int:
    src = _pick(args, so)
    man, tensors = tools.inspect(src, so)
    model = [t for t in tensors if t.key.startswith(MODEL)]
    if not model:
        raise CheckpointError(f"{src} holds no model tensors; nothing to export")
    total = sum(_export_bytes(t, args.dtype) for t in model)
    limit: Size | None = args.max_shard_size
    if limit and total > limit.nbytes and args.out.endswith(".safetensors"):
        raise CheckpointError(f"the model is {human_bytes(total)}, over --max-shard-size {limit}: give a "
                              f"directory as --out for the shards and model.safetensors.index.json, not {args.out}")
    if limit and total > limit.nbytes:
        for t in model:
            size = _export_bytes(t, args.dtype)
            if size > limit.nbytes:
                _note(f"tensor {t.key.removeprefix(MODEL)!r} is {human_bytes(size)}, over --max-shard-size "
                      f"{limit}: it gets a shard of its own, over the limit")
    earlier = [] if args.out.endswith(".safetensors") else tools.export_files(args.out, so)  # a file: replaced
    files = tools.export(src, args.out, dtype=args.dtype, max_shard_bytes=limit.nbytes if limit else None,
                         storage_options=so)
    print(f"exported {len(model)} tensors ({human_bytes(total)}) of step {man.step} from {src}:")
    for f in files:
        print(f"  {f}")
    stale = [f for f in earlier if f not in files]
    if stale:
        _note(f"removed {len(stale)} file(s) of an earlier export from {args.out}: "
              f"{', '.join(f.rstrip('/').rsplit('/', 1)[-1] for f in stale)}")
    return 0


def _out_path(text: str) -> str:
    """--out: an empty one would quietly mean ./model.safetensors."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty: give a .safetensors file or a directory")
    return text


def _export_bytes(t: tools.TensorInfo, dtype: str | None) -> int:
    """A tensor's size in the exported file (--dtype casts floating-point tensors only)."""
    return math.prod(t.shape) * tools.EXPORT_DTYPES[dtype].itemsize if dtype and DTYPES[t.dtype].is_floating_point else t.nbytes


def cmd_prune(args: argparse.Namespace, so: dict[str, Any]) -> int:
    rules = {"--keep-last": args.keep_last, "--keep-best": args.keep_best, "--keep-every": args.keep_every}
    if all(v is None for v in rules.values()) or any(v is not None and v < 1 for v in rules.values()):
        raise _Usage(f"prune needs at least one of {', '.join(rules)}, each a positive integer")
    entries = _list_root(args.url, so)
    infos = retention.scan(args.url, so, entries)
    _note_lookalikes(args.url, entries)
    monitor, mode, source = _monitor(args, infos, so)
    # a default monitor that nothing records protects nothing and is no mistake; a named one, or one
    # --keep-best ranks by, is checked (by plan_prune, the one place for that rule)
    ranked = args.keep_best is not None or args.monitor or retention.unranked(infos, monitor) is None
    doomed = tools.plan_prune(infos, args.url, keep_last_n=args.keep_last, keep_best_k=args.keep_best,
                              keep_every_n_steps=args.keep_every, monitor=monitor if ranked else None, mode=mode,
                              source=source)
    if args.keep_best is not None:
        _note(f"--keep-best ranks by {monitor} ({mode}, from {source})")
    removed = doomed if args.dry_run else retention.apply(infos, doomed, so)
    verb = "would remove" if args.dry_run else "removed"
    for i in removed:
        print(f"{verb} {i.url} ({'committed' if i.committed else 'incomplete'})")
    failed = [i for i in doomed if i not in removed]
    print(f"{verb} {len(removed)}, kept {len(infos) - len(doomed)} of {len(infos)} checkpoint(s) under {args.url}")
    if failed:
        raise CheckpointError(f"could not remove {[i.url for i in failed]} (see the warnings above)")
    return 0


# ---- parser -------------------------------------------------------------------------------------
class _Usage(Exception):
    """A usage error found after parsing (exit 2, like argparse's own)."""


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--storage-option", action="append", default=[], type=parse_storage_option,
                        metavar="KEY=VALUE", help="fsspec/s3fs option, repeatable (e.g. endpoint_url=http://...; a dotted key nests, "
                        "as in the config: client_kwargs.region_name=eu-west-1); "
                        "AWS_* environment variables work too")
    pick = argparse.ArgumentParser(add_help=False)
    pick.add_argument("--monitor", help="the metric that ranks checkpoints: which one ls marks best, --best "
                      "picks, --keep-best keeps (default: the run's early_stopping.monitor saved in the "
                      "checkpoint, else val/loss)")
    pick.add_argument("--mode", choices=("min", "max"), help="whether lower or higher --monitor is better (default: the mode of the run's saved early_stopping config "
                      "when it monitors the same metric, else min)")
    parser = argparse.ArgumentParser(prog=PROG, description="List, inspect, verify, export and prune dtrain "
                                     "checkpoints. URL is a local path or any fsspec URL (s3://...).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("ls", parents=[common, pick], help="table of the checkpoints under a root")
    p.add_argument("url", metavar="ROOT")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("inspect", parents=[common], help="tensors, shapes, dtypes and shard layout")
    p.add_argument("url", metavar="URL", help="a checkpoint directory, or a root (its newest committed one)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify", parents=[common], help="check every file's size and checksum (exit 1 on any problem)")
    p.add_argument("url", metavar="URL", help="a checkpoint directory, or a root (every checkpoint in it)")
    p.add_argument("--check-finite", action="store_true", help="also fail on NaN or inf in any tensor")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("export", parents=[common, pick], help="consolidated model weights as plain safetensors")
    p.add_argument("url", metavar="URL", help="a checkpoint directory, or a root (its newest committed one)")
    p.add_argument("--out", required=True, type=_out_path, help="a .safetensors file, or a directory "
                   "(model.safetensors, or shards + model.safetensors.index.json past --max-shard-size; files of "
                   "an earlier export there, model.safetensors, model-NNNNN-of-NNNNN.safetensors and the index, "
                   "are replaced or removed; other files stay). Local files are written under temporary names and "
                   "renamed at the end: a failed export leaves the old output as it was (on an object store, "
                   "without the old index)")
    p.add_argument("--dtype", choices=list(tools.EXPORT_DTYPES), help="cast floating-point tensors to this dtype "
                   "(integer and bool tensors keep theirs); default: as saved")
    p.add_argument("--max-shard-size", type=parse_size_arg, metavar="SIZE", help="split into shards of at most "
                   "SIZE (e.g. 2GB, 500MiB; at least 1 byte); a tensor bigger than SIZE gets a shard of its "
                   "own, over the limit (a note says so); default: one file")
    p.add_argument("--best", action="store_true", help="with a root: the best committed checkpoint by --monitor")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("prune", parents=[common, pick], help="delete checkpoints by retention rules "
                       "(never the newest committed or the best)")
    p.add_argument("url", metavar="ROOT")
    p.add_argument("--keep-last", type=int, metavar="N", help="keep the N newest committed")
    p.add_argument("--keep-best", type=int, metavar="K", help="keep the K best by --monitor")
    p.add_argument("--keep-every", type=int, metavar="STEPS", help="keep every multiple of STEPS")
    p.add_argument("--dry-run", action="store_true", help="print what would be removed; remove nothing")
    p.set_defaults(func=cmd_prune, parser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one `dtrain ckpt` command; returns the exit code (0 ok, 1 error or damage, 2 bad usage)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on bad arguments, 0 after --help
        return int(e.code or 0)
    try:
        so = storage_options_of(args.storage_option)
    except argparse.ArgumentTypeError as e:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    try:
        return int(args.func(args, so))
    except _Usage as e:
        getattr(args, "parser", parser).print_usage(sys.stderr)  # the sub-command's usage
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `dtrain ckpt inspect ... | head`: stop quietly, as shell tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as e:
        if not isinstance(e, (DtrainError, OSError)) and not _storage_error(e):
            raise  # a bug: keep the traceback
        print(f"{PROG}: error: {type(e).__name__ + ': ' if _storage_error(e) else ''}{e}", file=sys.stderr)
        return 1


def _storage_error(e: BaseException) -> bool:
    """botocore's own errors (no credentials, endpoint unreachable) are not OSErrors."""
    return type(e).__module__.split(".")[0] in ("botocore", "aiobotocore", "s3fs")


if __name__ == "__main__":
    sys.exit(main())
