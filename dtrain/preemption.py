"""Signal handlers that only set a flag; the step loop turns the flag into an agreed decision.

A handler never calls a collective or writes a file: it may run between any two bytecodes of the
main thread, including inside a collective. Never installed at import: `dtrain train` installs it
as it starts (before torch is imported), so that a stop during start-up is kept for the first step;
`python -m dtrain train` keeps one from its very start (dtrain/early_signals.py).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from dtrain import early_signals

log = logging.getLogger(__name__)

DEFAULT_SIGNALS = early_signals.STOP_SIGNALS  # SIGTERM, SIGUSR1, SIGINT


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A DataLoader `worker_init_fn`: workers ignore the stop signals. Slurm (`--signal` without
    `B:`, time limits, scancel) and Ctrl-C signal every process of the job or terminal, loader
    workers included; SIGTERM or SIGUSR1 ended a worker, and the loader then failed the training
    process before its emergency checkpoint. The training process decides, and ends its workers."""
    for sig in DEFAULT_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class PreemptionHandler:
    """`requested` turns True on SIGTERM, SIGUSR1 or a first SIGINT; a second SIGINT exits at once."""

    def __init__(self, signals: tuple[signal.Signals, ...] = DEFAULT_SIGNALS) -> None:
        self.signals = signals
        self.signal_name: str | None = None
        self._event = threading.Event()
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def request(self, reason: str = "manual") -> None:
        """Ask for a checkpoint-and-exit from code (tests, fault injection, a time budget)."""
        self.signal_name = self.signal_name or reason
        self._event.set()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self._event.is_set():
            # The user pressed Ctrl-C twice: they want out now, not after a checkpoint.
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        self._event.set()

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> PreemptionHandler:
        """Take over the signals; a no-op when already installed (`uninstall` restores the originals)."""
        if self.installed:
            return self
        if threading.current_thread() is not threading.main_thread():
            log.warning("signal handlers can only be installed from the main thread; preemption is off")
            return self
        for sig in self.signals:
            self._previous[sig] = early_signals.replaced(sig, signal.signal(sig, self._handle))
        kept = early_signals.take_kept()  # one that came while `python -m dtrain train` started
        if kept is not None and kept in self.signals:
            self._handle(kept, None)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    @contextlib.contextmanager
    def held(self) -> Iterator[PreemptionHandler]:
        """Installed for the block, then left as found: a handler someone installed earlier (`dtrain
        train`, before its imports) stays installed for them to remove."""
        owned = not self.installed
        self.install()
        try:
            yield self
        finally:
            if owned:
                self.uninstall()

    def __enter__(self) -> PreemptionHandler:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()


def keep_torchrun_from_restarting(handler: PreemptionHandler) -> None:
    """After an agreed preemption this process did not get a signal for (another node was
    preempted), SIGTERM our torchrun agent, once per node (local rank 0), so that it stops instead
    of restarting the workers in place: the restarted workers waited for the preempted node in the
    rendezvous (15 min by default) instead of exiting 75 to be requeued with it. An elastic job
    that may shrink (`--nnodes MIN:MAX` with fewer than the current nodes) keeps torchrun's restart:
    the remaining nodes re-form without the preempted one. Called after the checkpoint and the exit
    records are written; a no-op without torchrun or its restarts."""
    if handler.signal_name is not None or os.environ.get("LOCAL_RANK", "0") != "0":
        return
    agent = _restarting_agent()
    if agent is None or int(os.environ.get("GROUP_WORLD_SIZE", "1")) > min_nodes(agent[1], os.environ.get("PET_NNODES", "")):
        return
    log.info("preempted by a peer: asking torchrun (pid %d) to stop rather than restart this node's workers", agent[0])
    os.kill(agent[0], signal.SIGTERM)


def stop_torchrun_restarts(why: str, handler: PreemptionHandler | None = None) -> bool:
    """SIGTERM our torchrun agent after an error that a restart would only repeat (a config error,
    recorded first): torchrun restarted the workers --max-restarts times, each attempt building
    everything again to fail the same way. Whichever local rank finds the error stops it (one that
    rank 1 alone found, after the group formed, used to restart them all), but only one rank per
    torchrun, and none once torchrun forwarded a SIGTERM to this rank: a second SIGTERM makes
    torchrun exit without waiting for its workers. Returns whether it sent the signal; a no-op
    without torchrun or its restarts."""
    agent = _restarting_agent()
    if agent is None or (handler is not None and handler.signal_name == "SIGTERM") or not _first_to_stop(agent[0]):
        return False
    log.info("%s: asking torchrun (pid %d) not to restart the workers, which would fail the same way", why, agent[0])
    os.kill(agent[0], signal.SIGTERM)
    return True


_claim: socket.socket | None = None  # held until this process exits


def _first_to_stop(agent: int) -> bool:
    """Whether this is the first of the agent's workers to claim its stop: binding an abstract
    Unix socket named after the agent (pid and start time, so a reused pid is another name) is
    atomic, needs no file, and the kernel frees the name when this process exits. Where sockets are
    not allowed every rank claims it, as before."""
    global _claim
    if _claim is not None:
        return False
    try:
        started = Path(f"/proc/{agent}/stat").read_text().rsplit(")", 1)[1].split()[19]
        claim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except (OSError, IndexError):
        return True
    try:
        claim.bind(f"\0dtrain-stop-torchrun-{agent}-{started}")
    except OSError as e:
        claim.close()
        return e.errno != errno.EADDRINUSE
    _claim = claim
    return True


def _restarting_agent() -> tuple[int, list[bytes]] | None:
    """(pid, argv) of the torchrun agent that would restart this worker in place (its parent: every
    local rank's), when it has restarts to make; None otherwise."""
    if os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") in ("", "0"):
        return None
    agent = os.getppid()
    try:
        argv = Path(f"/proc/{agent}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if not any(a.endswith(b"torchrun") or a == b"torch.distributed.run" for a in argv):
        return None  # started through a wrapper (torchrun --no-python): not ours to stop
    return agent, argv


def min_nodes(agent_argv: list[bytes], pet_nnodes: str = "") -> int:
    """The fewest nodes torchrun may re-form with: MIN of its `--nnodes MIN:MAX` (or PET_NNODES,
    which torchrun reads when the option is absent); 1 for a standalone run."""
    value = pet_nnodes or "1"
    for i, arg in enumerate(agent_argv):
        if arg == b"--nnodes" and i + 1 < len(agent_argv):
            value = agent_argv[i + 1].decode(errors="replace")
        elif arg.startswith(b"--nnodes="):
            value = arg.split(b"=", 1)[1].decode(errors="replace")
    try:
        return int(value.split(":")[0])
    except ValueError:
        return 1
