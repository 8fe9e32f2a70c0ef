"""`python -m dtrain ...`: what torchrun and launch/torchrun.sh run on every worker."""

import sys

if sys.argv[1:2] == ["train"]:
    # First of all: the imports below take tens of ms (seconds on a busy node), and a stop signal
    # meanwhile killed the worker instead of ending in the emergency checkpoint and exit 75.
    from dtrain.early_signals import keep_stop_signals

    keep_stop_signals()

from dtrain.cli import main  # noqa: E402

sys.exit(main())
