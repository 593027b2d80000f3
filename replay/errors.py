"""The exception types the CLI turns into a clean one-line error (no traceback, exit 1)."""


class ReplayError(Exception):
    """A problem the user can fix: bad input, a missing store, a refused statement."""


class StoreError(ReplayError):
    """A store that is missing, of another schema version, or given data it cannot hold."""
