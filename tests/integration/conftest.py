"""Fixtures for the integration tests: a real one-node Slurm cluster (started once per session)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.slurm_cluster import SlurmCluster, SlurmUnavailable, slurm_cluster


@pytest.fixture(scope="session")
def slurm() -> Iterator[SlurmCluster]:
    """munged + slurmctld + slurmd on this machine; installs slurm-wlm and munge with apt-get if missing."""
    try:
        with slurm_cluster() as cluster:
            yield cluster
    except SlurmUnavailable as e:
        pytest.skip(f"no Slurm cluster: {e}")
