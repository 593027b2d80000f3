"""The `replay` command line: thin Typer commands that parse flags, call a stage or a reader, print.

Heavy modules (torch, transformers, vLLM) are imported inside the commands that need them, so
`replay --help`, `replay sql` and `replay score` start fast and torch-free. Nothing in the
package imports the CLI (tests/test_layering.py).
"""

from . import stage_commands, read_commands  # noqa: F401,I001  (they register their commands on app, in help order)
from .app import app


def main() -> None:
    app()


__all__ = ["app", "main"]
