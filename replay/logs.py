"""How loud a stage is: replay's own progress (replay.progress) and the heavy libraries' logs.

vLLM logs ~90 INFO lines per engine start and transformers draws a "Loading weights" bar; a user
of `replay generate` wants neither, so both stay at WARNING unless `--verbose`. The settings go
through environment variables because vLLM reads them at import time, in every process it
spawns; libraries already imported get their loggers set directly. A value the user exported
wins over these defaults.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

from .progress import QUIET_ENV

VERBOSE_ENV = "REPLAY_VERBOSE"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def library_log_environment(environ: dict | None = None) -> None:
    """Defaults for vLLM and transformers logging, WARNING unless REPLAY_VERBOSE=1."""
    env = os.environ if environ is None else environ
    loud = env.get(VERBOSE_ENV, "") not in ("", "0")
    env.setdefault("VLLM_LOGGING_LEVEL", "INFO" if loud else "WARNING")
    env.setdefault("TRANSFORMERS_VERBOSITY", "info" if loud else "warning")
    if not loud:
        env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" bar


def apply_to_loaded_libraries() -> None:
    """For vLLM / transformers imported before the environment was set (e.g. tests in one process)."""
    level = logging.INFO if verbose() else logging.WARNING
    if "vllm" in sys.modules:
        name = os.environ.get("VLLM_LOGGING_LEVEL", "").upper()
        logging.getLogger("vllm").setLevel(name if name in logging.getLevelNamesMapping() else level)
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(level)
        (hf_logging.enable_progress_bar if verbose() else hf_logging.disable_progress_bar)()


@contextlib.contextmanager
def output_settings(quiet: bool = False, verbose: bool = False) -> Iterator[None]:
    """--quiet / --verbose for the duration of one command (restored after: tests run many in one process)."""
    saved = {k: os.environ.get(k) for k in (QUIET_ENV, VERBOSE_ENV, "VLLM_LOGGING_LEVEL",
                                             "TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")}
    if quiet:
        os.environ[QUIET_ENV] = "1"
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    library_log_environment()
    apply_to_loaded_libraries()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
