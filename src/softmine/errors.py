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
