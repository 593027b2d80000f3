"""The command line's help reads whole: no command description cut short in `replay --help`."""

import os
import subprocess
import sys


def test_top_level_help_cuts_no_description():
    env = dict(os.environ, COLUMNS="80")
    out = subprocess.run([sys.executable, "-m", "replay", "--help"], capture_output=True, text=True, env=env,
                         timeout=120).stdout
    commands = out.split("Commands:", 1)[1].strip().splitlines()
    assert len(commands) >= 12
    for line in commands:
        assert not line.rstrip().endswith(("...", "…")), line
        assert line.rstrip().endswith("."), line  # one whole sentence per command
