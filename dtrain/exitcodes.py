"""Process exit codes: the contract with launchers (torchrun, Slurm trap, Kubernetes podFailurePolicy)."""

from __future__ import annotations

OK = 0
"""Finished max_steps, stopped early, or hit the time budget; nothing to do."""

FAILURE = 1
"""Something went wrong; read the log. Launchers may restart (torchrun --max-restarts)."""

CONFIG_ERROR = 2
"""Bad config or command line; restarting will not help."""

PREEMPTED = 75
"""A stop signal arrived, every rank agreed, and an emergency checkpoint is committed: requeue me
(75 is EX_TEMPFAIL from sysexits.h, 'try again later')."""
