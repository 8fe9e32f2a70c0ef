"""The exceptions dtrain raises for users: each names the file, key or value and what to do."""

from __future__ import annotations


class DtrainError(Exception):
    """Base class of every error dtrain raises on purpose."""


class ConfigError(DtrainError, ValueError):
    """A config file, key or value is wrong; raised before any process group starts."""


class CheckpointError(DtrainError):
    """A checkpoint cannot be written, found, verified or loaded."""


class MissingBucketError(CheckpointError):
    """An object store's bucket that does not exist (or that the credentials cannot see): a URL or
    endpoint to fix, not an outage that a restart outlasts."""


class CheckpointMismatchError(CheckpointError):
    """A sound checkpoint that does not fit what it is loaded into: tensor keys, shapes or dtypes,
    optimizer state or components differ (another model or optimizer config). `api_hint` is advice
    for Python callers (pass strict=False, ...), left out of `message`, which `dtrain train`'s own
    error builds on: its users cannot pass arguments to the load."""

    def __init__(self, message: str, api_hint: str = "") -> None:
        super().__init__(f"{message}; {api_hint}" if api_hint else message)
        self.message = message


class DistributedError(DtrainError):
    """The process group cannot be set up or a collective failed."""


class RunDirError(DtrainError):
    """The run directory (logs, metrics, config.yaml, summary.json, exit records) cannot be written."""
