"""One root for every error the project raises on purpose.

Third-party exceptions are translated at the boundary (``raise ... from exc``) so the CLI can print one line
saying what was wrong and where, while the original cause stays attached for debugging.
"""


class NettwinError(Exception):
    """Root of the project's errors. The CLI prints ``str(err)`` and exits non-zero."""


class ConfigError(NettwinError):
    """Settings are invalid or inconsistent (bad value, unreadable config file)."""


class InputError(NettwinError):
    """A user-supplied file or argument cannot be used (missing, unreadable, wrong format)."""


class ServiceError(NettwinError):
    """Kafka or InfluxDB is unreachable or refused a request."""


class Stopped(NettwinError):
    """A long computation gave up part way because its process is stopping (SIGTERM): nothing it would have
    produced was published."""
