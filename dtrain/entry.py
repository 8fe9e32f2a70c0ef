"""The `dtrain` command and `python -m dtrain`: keep stop signals first, then import the CLI.

`dtrain train` keeps a stop signal from its first line (dtrain/early_signals.py): the CLI's imports
take tens of ms (seconds on a busy node or a network file system), and a SIGTERM or SIGUSR1 meanwhile
killed the process instead of ending in the emergency checkpoint and exit 75. Other commands
(`dtrain ckpt`, `dtrain plot`) keep the default actions: a stop ends them at once.
"""

import sys


def main() -> int:
    if sys.argv[1:2] == ["train"]:
        from dtrain.early_signals import keep_stop_signals

        keep_stop_signals()
    from dtrain.cli import main as cli_main

    return cli_main()
