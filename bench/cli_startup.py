"""CLI start-up: wall and CPU seconds of the read commands, for one or more checkouts side by side.

    python bench/cli_startup.py [--store DIR] [--runs 9] [--checkout /work/main --checkout .]

Each command runs as a fresh process (`python -m replay ...`, PYTHONPATH = the checkout), the
checkouts interleaved run by run so that they share the machine's load; best and median of
`--runs`. CPU is user + system of the process (from wait4), which a busy neighbour inflates less
than wall time. Without --store an empty store is created in a temp dir.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = {
    "replay --help": ["--help"],
    "replay sql --help": ["sql", "--help"],
    "replay sql 'SELECT 1' -f csv": ["sql", "SELECT 1", "--format", "csv", "--store", "{store}"],
    "replay sql (table) negative groups": ["sql", "SELECT count(*) FROM negative_groups", "--store", "{store}"],
    "replay inspect rounds": ["inspect", "rounds", "--store", "{store}"],
    "replay status": ["status", "--store", "{store}"],
}


def run_once(checkout: Path, args: list[str]) -> tuple[float, float]:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "replay", *args], env=env, cwd=checkout,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"{args} failed in {checkout}: {proc.stderr.read().decode()[-500:]}")
    return wall, usage.ru_utime + usage.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", type=Path, default=None)
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--checkout", type=Path, action="append", default=None,
                    help="a replay checkout to time (repeatable; default: this one)")
    args = ap.parse_args()
    checkouts = [c.resolve() for c in (args.checkout or [Path(__file__).resolve().parents[1]])]
    with tempfile.TemporaryDirectory(prefix="cli-startup-") as tmp:
        store = args.store
        if store is None:
            store = Path(tmp) / "store"
            subprocess.run([sys.executable, "-c", f"from replay.store import Store; Store.create({str(store)!r})"],
                           env={**os.environ, "PYTHONPATH": str(checkouts[-1])}, check=True)
        times = {(c, name): [] for c in checkouts for name in COMMANDS}
        for _ in range(args.runs):
            for name, cmd in COMMANDS.items():
                for checkout in checkouts:
                    times[(checkout, name)].append(run_once(checkout, [a.format(store=store) for a in cmd]))
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end, {args.runs} runs, store {store}")
    head = "".join(f" | {c.name}: best / median wall s (median CPU s)" for c in checkouts)
    print(f"| command{head} |\n|---{'|---:' * len(checkouts)}|")
    for name in COMMANDS:
        cells = ""
        for c in checkouts:
            walls, cpus = [t[0] for t in times[(c, name)]], [t[1] for t in times[(c, name)]]
            cells += f" | {min(walls):.3f} / {statistics.median(walls):.3f} ({statistics.median(cpus):.3f})"
        print(f"| `{name}`{cells} |")


if __name__ == "__main__":
    main()
