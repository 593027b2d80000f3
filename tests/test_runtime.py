"""replay.runtime.return_freed_memory: freed training memory goes back to the OS (glibc)."""

import os
import platform
import subprocess
import sys

import pytest

# Free one 4 MiB block (glibc then lifts its mmap threshold above 4 MiB), allocate 60 more from the
# heap, free all but the newest (so the heap top cannot be trimmed), and report the RSS still held.
PROBE = """
import ctypes, ctypes.util, sys
from replay.runtime import return_freed_memory, trim_freed_memory
applied = return_freed_memory() if sys.argv[1] == "on" else None
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 4 << 20
def rss_kib():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS:")).split()[1])
libc.free(libc.malloc(size))
blocks = [libc.malloc(size) for _ in range(60)]
for b in blocks:
    ctypes.memset(b, 1, size)
before = rss_kib()
for b in blocks[:-1]:
    libc.free(b)
trim_freed_memory()  # what the learner does after each optimizer step
print(applied, (before - rss_kib()) // 1024)
"""


def released_mib(mode: str, **env) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env={k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"} | env)
    applied, mib = out.stdout.split()
    return applied, int(mib)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_blocks_return_to_the_os_only_when_applied():
    for mode in ("trim", "mmap"):  # ~236 MiB freed: returned at once (mmap) or at the step's end (trim)
        applied, released = released_mib("on", REPLAY_MALLOC_TUNING=mode)
        assert applied == mode and released >= 200, (mode, released)
    applied, kept = released_mib("on")  # the default: glibc's own behaviour, no page-fault cost
    assert applied == "None" and kept < 50, kept
    applied, kept = released_mib("off")
    assert applied == "None" and kept < 50, kept  # glibc's default keeps the freed heap
    applied, kept = released_mib("on", REPLAY_MALLOC_TUNING="0")
    assert applied == "None" and kept < 50, kept


HUGE_PAGE_PROBE = """
import sys, torch
from replay.runtime import return_freed_memory
return_freed_memory()  # after importing torch (stages/learn.py calls it before): still in time
x = torch.ones(16 << 20)  # 64 MiB, allocated after the call
print(sum(int(l.split()[1]) for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages")) // 1024)
"""


def _thp_setting() -> str:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return "absent"
    return text[text.index("[") + 1:text.index("]")]


@pytest.mark.skipif(_thp_setting() != "madvise", reason="needs transparent huge pages in madvise mode")
def test_learn_memory_modes_put_torch_blocks_on_huge_pages_unless_told_not_to():
    """The memory-saving modes put torch's large blocks on huge pages (a third of the page faults,
    a lower peak: docs/BENCHMARKS.md §7); the default and a user's THP_MEM_ALLOC_ENABLE=0 do not."""
    def huge_mib(**env) -> int:
        base = {k: v for k, v in os.environ.items() if k not in ("THP_MEM_ALLOC_ENABLE", "REPLAY_MALLOC_TUNING")}
        out = subprocess.run([sys.executable, "-c", HUGE_PAGE_PROBE], capture_output=True, text=True,
                             check=True, env=base | env)
        return int(out.stdout.split()[-1])

    assert huge_mib(REPLAY_MALLOC_TUNING="trim") >= 32
    assert huge_mib(REPLAY_MALLOC_TUNING="mmap") >= 32
    assert huge_mib() == 0  # the default (0): torch's own
    assert huge_mib(REPLAY_MALLOC_TUNING="trim", THP_MEM_ALLOC_ENABLE="0") == 0


def test_stage_commands_make_openmp_threads_wait_passively(tmp_path):
    """Spinning OpenMP threads starve a busy neighbour's core (generate 0.7 vs 8.0 tok/s in
    bench/threads_bench.py): a stage command sets OMP_WAIT_POLICY=PASSIVE before torch loads,
    and a value the user exported wins. libgomp itself reports what it read (OMP_DISPLAY_ENV)."""
    probe = ("import sys, typer\nfrom replay.cli.app import command\n"
             "@command('probe', long_running=True)\n"
             "def probe():\n    import torch\n    torch.ones(10000).sum()\n"
             "from replay.cli import app\nsys.argv = ['replay', 'probe']\napp()\n")
    # libgomp shows an unset policy as PASSIVE too; its spin count tells them apart (300000 unset, 0 passive)
    for exported, expected in ((None, "GOMP_SPINCOUNT = '0'"), ("ACTIVE", "OMP_WAIT_POLICY = 'ACTIVE'")):
        env = dict(os.environ, OMP_DISPLAY_ENV="verbose")
        env.pop("OMP_WAIT_POLICY", None)
        if exported:
            env["OMP_WAIT_POLICY"] = exported
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        assert expected in done.stdout + done.stderr, done.stderr[-2000:]


def test_usable_cpus_follows_the_affinity_mask_not_the_host():
    code = ("import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})\n"
            "from replay.runtime import usable_cpus; print(usable_cpus())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1"
    from replay.runtime import usable_cpus

    assert usable_cpus() == len(os.sched_getaffinity(0))
