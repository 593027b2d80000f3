"""replay: offline, replay-based RLVR that rescues negative groups."""

__version__ = "0.1.0"
