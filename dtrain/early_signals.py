"""Keep a stop signal that reaches `dtrain train` (or `python -m dtrain train`) while it is still starting.

Until PreemptionHandler is installed, after dtrain's own imports (tens of ms; seconds on a busy node
or a network file system), SIGTERM and SIGUSR1 killed the worker with their default action: the job
then exited with a signal code instead of 75, which launchers do not requeue. dtrain/entry.py (the
`dtrain` command and `python -m dtrain`) calls `keep_stop_signals()` before anything else, importing
only `signal` for it; `PreemptionHandler.install()` then takes over, turns a kept signal into its
flag (the first step boundary saves and exits 75) and restores the handlers from before the keeper.
"""

from __future__ import annotations

import signal

TYPE_CHECKING = False  # typing itself costs milliseconds here, before the signals are kept
if TYPE_CHECKING:
    from types import FrameType
    from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_originals: dict[int, Any] = {}  # the handlers the keeper replaced
_kept: list[int] = []


def _keep(signum: int, frame: FrameType | None) -> None:
    if signum == signal.SIGINT and _kept:  # Ctrl-C after a stop: out now, as PreemptionHandler does
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        raise KeyboardInterrupt
    _kept.append(signum)


def keep_stop_signals() -> None:
    """From now on SIGTERM, SIGUSR1 and a first SIGINT are only recorded, for PreemptionHandler."""
    for sig in STOP_SIGNALS:
        _originals.setdefault(sig, signal.signal(sig, _keep))


def replaced(sig: int, previous: Any) -> Any:
    """The handler to restore for `sig` where a handler replaced `previous`: the one from before
    the keeper when `previous` is the keeper (which is then done with that signal)."""
    return _originals.pop(sig, previous) if previous is _keep else previous


def take_kept() -> int | None:
    """The first stop signal kept so far (None if none), forgotten once taken."""
    first = _kept[0] if _kept else None
    _kept.clear()
    return first
