from __future__ import annotations

import os
import signal

import pytest

from dtrain.errors import ConfigError
from dtrain.faults import FaultInjector
from dtrain.preemption import PreemptionHandler


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_signal_only_sets_the_flag(sig: signal.Signals) -> None:
    with PreemptionHandler() as handler:
        assert not handler.requested
        os.kill(os.getpid(), sig)
        assert handler.requested and handler.signal_name == sig.name


def test_second_sigint_exits_at_once() -> None:
    with PreemptionHandler() as handler:
        os.kill(os.getpid(), signal.SIGINT)
        assert handler.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_nothing_installed_at_import_and_uninstall_restores() -> None:
    before = signal.getsignal(signal.SIGTERM)
    handler = PreemptionHandler().install()
    assert signal.getsignal(signal.SIGTERM) != before
    handler.uninstall()
    assert signal.getsignal(signal.SIGTERM) == before


def test_fault_options_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="kill_rnak"):
        FaultInjector.from_config({"kill_rnak": 1}, rank=0)
    monkeypatch.setenv("DTRAIN_FAULTS", "{not json")
    with pytest.raises(ConfigError, match="DTRAIN_FAULTS"):
        FaultInjector.from_config({}, rank=0)
    monkeypatch.setenv("DTRAIN_FAULTS", '{"kill_rank": 1, "kill_step": 5, "only_attempt": 1}')
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert FaultInjector.from_config({}, rank=1).kill_step is None  # other attempt: off
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert FaultInjector.from_config({}, rank=1).kill_step == 5
