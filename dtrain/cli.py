"""The `dtrain` command: train, ckpt (ls / inspect / verify / export / prune), plot."""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
from collections.abc import Iterator

from dtrain import __version__, exitcodes
from dtrain.errors import ConfigError, DtrainError


@contextlib.contextmanager
def _imports_out_of_gc(own_process: bool) -> Iterator[None]:
    """torch and what it brings make about a million objects on import that live as long as the
    process; the cyclic GC walked them again and again while they loaded and once more at exit, about
    1 s of every `dtrain` process here. In a process of its own (not main() called by a program, whose
    objects are not ours to freeze), collection is off while they load and they are then frozen out of
    later collections (gc.freeze); garbage made after that is collected as before."""
    enabled = own_process and gc.isenabled()
    if enabled:
        gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.freeze()
            gc.enable()


def _train(args: argparse.Namespace) -> int:
    from dtrain.preemption import PreemptionHandler

    # Before torch is imported (seconds): from here on a stop signal is kept for the first step.
    with PreemptionHandler() as preemption:
        with _imports_out_of_gc(args.own_process):
            from dtrain.config import load_config
            from dtrain.run import run

        cfg = load_config(args.config, args.overrides)
        return run(cfg, preemption)


def _plot(args: argparse.Namespace) -> int:
    with _imports_out_of_gc(args.own_process):
        from dtrain.plot import plot_run

    out = plot_run(args.run_dir, args.out)
    print(out)
    return exitcodes.OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dtrain", description=__doc__)
    parser.add_argument("--version", action="version", version=f"dtrain {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model (run under torchrun/srun for several processes)")
    train.add_argument("--config", "-c", help="YAML config file (see configs/)")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.lr=3e-4")
    train.set_defaults(func=_train)

    ckpt = sub.add_parser("ckpt", help="list, inspect, verify, export and prune checkpoints", add_help=False)
    ckpt.add_argument("args", nargs=argparse.REMAINDER)
    ckpt.set_defaults(func=lambda a: _ckpt(a.args, a.own_process))

    plot = sub.add_parser("plot", help="draw train/val loss of a run, with the best and stop steps marked")
    plot.add_argument("run_dir")
    plot.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/loss.png)")
    plot.set_defaults(func=_plot)
    return parser


def _ckpt(argv: list[str], own_process: bool) -> int:
    with _imports_out_of_gc(own_process):
        from dtrain.checkpoint.cli import main as ckpt_main

    return ckpt_main(argv)


def main(argv: list[str] | None = None) -> int:
    """`dtrain ARGV`; without argv, the command of this process (sys.argv: the console script, `python -m dtrain`)."""
    own_process = argv is None
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["ckpt"]:  # its own parser, so `dtrain ckpt --help` and sub-command help work
        return _ckpt(argv[1:], own_process)
    args = build_parser().parse_args(argv)
    args.own_process = own_process
    try:
        return int(args.func(args))
    except ConfigError as e:
        print(f"dtrain: config error: {e}", file=sys.stderr)
        return exitcodes.CONFIG_ERROR
    except DtrainError as e:
        print(f"dtrain: error: {e}", file=sys.stderr)
        return exitcodes.FAILURE


if __name__ == "__main__":
    sys.exit(main())
