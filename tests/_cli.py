"""Running the CLI in-process from tests."""

from typer.testing import CliRunner

from replay.cli import app

runner = CliRunner()


def invoke(*args):
    """The CLI's result for these arguments (any type; str() each)."""
    return runner.invoke(app, [str(a) for a in args])


def invoke_ok(*args) -> str:
    """The CLI's output for these arguments; the test fails if the command does."""
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result.output
