"""User-facing errors: one clear sentence that names the problem and the fix."""


class SoftmineError(Exception):
    """A problem with the user's config, data or environment (not a bug).

    The command-line tools print its message on one line and exit non-zero
    without a traceback (set ``SOFTMINE_DEBUG=1`` to see the traceback).
    """


class ConfigError(SoftmineError, ValueError):
    """An invalid configuration value."""


class DataError(SoftmineError):
    """A dataset that is missing, incomplete or unreadable."""


class TrainingError(SoftmineError):
    """Training cannot go on (a non-finite loss or gradient, say); the last good checkpoint is kept."""


class StorageError(SoftmineError):
    """A file could not be written (a full disk, a read-only or over-quota filesystem)."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class Interrupted(SoftmineError):
    """The run was stopped by SIGINT/SIGTERM after saving a checkpoint it can resume from."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
