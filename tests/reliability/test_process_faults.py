"""SIGKILL of a random rank at random points of saves and loads, many times in one seeded run of a
2-rank DDP job, with a resume each time: the job ends on the weights of an uninterrupted run, every
committed checkpoint verifies after every kill, and no committed checkpoint is lost."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability.chaos import run_chaos

pytestmark = pytest.mark.multiprocess


@pytest.mark.timeout(240)
def test_random_kills_across_save_and_load_lose_nothing(tmp_path: Path) -> None:
    result = run_chaos(tmp_path, seed=2, attempts=10, steps=60, save_every=2)
    report = "\n".join(result.log)
    assert result.faults_fired >= 8, report  # the seed's faults really land
    assert len(result.faults_by_phase) >= 6, result.faults_by_phase  # across many phases
    assert "overlap=True fired=True" in report, report  # kills land in the trainer's overlapped saves too
    assert result.committed_lost == 0, report
    assert result.corrupt_accepted == 0, report
    assert result.wrong_resumes == 0, report
    assert result.recovered == result.faults_fired, report  # every kill was followed by a correct resume
    assert result.weights_equal, report  # bit for bit the uninterrupted run
