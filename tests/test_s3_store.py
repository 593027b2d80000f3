"""A store on object storage (`--store s3://bucket/prefix`), against a real S3 API server on loopback
(moto's ThreadedMotoServer, started here): URIs, conditional writes, the round lease, SQL confinement,
a writer killed mid-upload, shards, doctor, and whole rounds that match a local store's rows."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("boto3")
pytest.importorskip("moto.server")

from replay.read.doctor import diagnose  # noqa: E402
from replay.errors import ReplayError  # noqa: E402
from replay.storage import StorageError, resolve  # noqa: E402
from replay.storage.s3 import client  # noqa: E402
from replay.storage.s3_duckdb import StoreFileSystem  # noqa: E402
from replay.storage.s3_lease import LeaseHeld, S3Lease  # noqa: E402
from replay.store import Store  # noqa: E402
from tests._cli import invoke, invoke_ok  # noqa: E402
from tests._s3 import new_bucket, s3_server  # noqa: E402
from tests._store_rows import prompt_row, rollout_row, verdict_row  # noqa: E402
from tests._tiny_model import save_tiny_model  # noqa: E402
from tests.test_round import CONFIG, snapshot, tick  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def server():
    with s3_server() as url:
        yield url


def keys_under(bucket, prefix=""):
    return sorted(o["Key"] for o in client().list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []))


def small_store(uri):
    """A hand-built store: 3 prompts x 2 samples, one negative group, one mixed, one positive."""
    store = Store.create(uri, base_model="test-model")
    prompts = [prompt_row(f"q{i}") for i in range(3)]
    store.write("prompts", prompts)
    for p, correct in zip(prompts, ([False, False], [True, False], [True, True])):
        pid = p["prompt_id"]
        store.write("rollouts", [rollout_row(0, pid, i) for i in range(2)], round=0)
        store.write("verdicts", [verdict_row(0, pid, i, c) for i, c in enumerate(correct)], round=0)
    return store


# -- store URIs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("uri", ["s3:/runs/r1", "foo://bucket/x", "http://host/x", "gs://bucket/x", "s3://Bad_Bucket/x"])
def test_a_store_uri_replay_does_not_serve_is_refused(tmp_path, uri, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("round", "--store", uri, "--rounds", "1")
    assert result.exit_code == 1, result.output
    assert "s3://bucket/prefix" in result.output and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []  # nothing written to a local directory named like the URI
    with pytest.raises(StorageError):
        Store.open(uri)


def test_local_paths_and_file_uris_stay_local(tmp_path):
    assert resolve(str(tmp_path / "a:b")) == tmp_path / "a:b"  # a colon inside a name is not a scheme
    assert resolve(f"file://{tmp_path}/s") == tmp_path / "s"
    assert str(resolve("s3://bkt/a//b/")) == "s3://bkt/a/b"


def test_store_json_is_created_once_under_a_race():
    bucket = new_bucket()
    uri, n = f"s3://{bucket}/race", 8
    barrier, stores, errors = threading.Barrier(n), [None] * n, []

    def create(i):
        try:
            barrier.wait()
            stores[i] = Store.create(uri, base_model=f"model-{i}")
        except Exception as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    stored = json.loads(client().get_object(Bucket=bucket, Key="race/store.json")["Body"].read())
    assert all(s.meta == stored for s in stores)  # every creator got the one winner's metadata
    assert keys_under(bucket) == ["race/store.json"]


def test_store_json_is_created_once_locally_too(tmp_path):
    n = 8
    barrier, stores = threading.Barrier(n), [None] * n

    def create(i):
        barrier.wait()
        stores[i] = Store.create(tmp_path / "s", base_model=f"model-{i}")

    threads = [threading.Thread(target=create, args=(i,)) for i in range(n)]
    for t in (*threads,):
        t.start()
    for t in threads:
        t.join()
    stored = json.loads((tmp_path / "s" / "store.json").read_text())
    assert all(s.meta == stored for s in stores)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["store.json"]


def test_conditional_writes_are_honoured_by_the_server():
    """What the guarantees rest on: the server refuses If-None-Match:* on an existing key and a
    stale If-Match (moto 5.2 does, as S3 does since 2024)."""
    from botocore.exceptions import ClientError

    bucket = new_bucket()
    client().put_object(Bucket=bucket, Key="k", Body=b"1", IfNoneMatch="*")
    with pytest.raises(ClientError, match="PreconditionFailed"):
        client().put_object(Bucket=bucket, Key="k", Body=b"2", IfNoneMatch="*")
    with pytest.raises(ClientError, match="PreconditionFailed"):
        client().put_object(Bucket=bucket, Key="k", Body=b"3", IfMatch='"0123"')
    assert client().get_object(Bucket=bucket, Key="k")["Body"].read() == b"1"


# -- the layout and reads ------------------------------------------------------------------------------
def test_layout_is_the_local_one_and_sql_answers_the_same(tmp_path):
    bucket = new_bucket()
    local = small_store(tmp_path / "store")
    # a manifest, for stage_runs (--partial: rows written by hand have no generate manifest)
    invoke_ok("score", "--store", local.root, "--round", 0, "--workers", 1, "--partial")
    for path in sorted(p for p in local.root.rglob("*") if p.is_file()):  # a plain copy of the files
        client().put_object(Bucket=bucket, Key="copy/" + path.relative_to(local.root).as_posix(), Body=path.read_bytes())
    remote = f"s3://{bucket}/copy"
    assert Store.open(remote).files("rollouts") == [resolve(f"{remote}/{p.relative_to(local.root).as_posix()}")
                                                    for p in local.files("rollouts")]
    for view in ("prompts", "rollouts", "verdicts", "samples", "groups", "negative_groups", "rounds",
                 "confident_mistakes", "stage_runs"):
        sql = f"SELECT * EXCLUDE (path) FROM {view} ORDER BY ALL" if view == "stage_runs" else \
            f"SELECT * FROM {view} ORDER BY ALL"
        outputs = [invoke("sql", sql, "--store", root, "--format", "json") for root in (local.root, remote)]
        assert outputs[0].exit_code == 0 and outputs[0].output == outputs[1].output, view
    negative = invoke("sql", "SELECT count(*) AS n FROM negative_groups", "--store", remote, "--format", "csv")
    assert negative.output.split() == ['"n"', "1"]


def test_sql_on_an_s3_store_reads_its_prefix_and_nothing_else(tmp_path):
    bucket, other = new_bucket(), new_bucket()
    store = small_store(f"s3://{bucket}/run1")
    small_store(f"s3://{bucket}/run10")  # a sibling whose name starts with the store's
    small_store(f"s3://{other}/run1")
    secret = tmp_path / "secret.csv"
    secret.write_text("a\n1\n")
    part = store.files("rollouts")[0].name
    escapes = [f"SELECT * FROM read_parquet('s3://{bucket}/run10/rollouts/round=0/*.parquet')",
               f"SELECT * FROM read_parquet('s3://{other}/run1/rollouts/round=0/*.parquet')",
               f"SELECT * FROM read_parquet('s3://{bucket}/run1/../run10/rollouts/round=0/{part}')",
               f"SELECT * FROM glob('s3://{bucket}/*')",
               f"SELECT * FROM read_text('s3://{other}/run1/store.json')",
               f"SELECT * FROM read_csv('{secret}')",
               "SELECT * FROM read_text('/etc/hostname')"]
    for sql in escapes:
        with pytest.raises(ReplayError, match="Permission|disabled|outside"):
            store.read_only_query(sql)
    assert store.read_only_query(f"SELECT count(*) AS n FROM read_parquet('s3://{bucket}/run1/rollouts/*/*.parquet')"
                                 ).to_pylist() == [{"n": 6}]
    # and writes go nowhere: refused as statements, and by the connection itself if one got through
    for sql in (f"COPY (SELECT 1) TO 's3://{bucket}/run1/x.parquet'", "ATTACH 'x.db'", "SET threads = 1",
                "INSTALL httpfs", "LOAD httpfs"):
        with pytest.raises(ReplayError):
            store.read_only_query(sql)
    con = store.read_only_connection()
    for sql in (f"COPY (SELECT 1 AS a) TO 's3://{bucket}/run1/x.parquet'", f"COPY (SELECT 1 AS a) TO '{tmp_path}/x.csv'",
                "SET enable_external_access = true", "SET allowed_directories = ['/']"):
        with pytest.raises(Exception):
            con.execute(sql)
    con.close()
    assert not [k for k in keys_under(bucket, "run1/") if "x.parquet" in k] and not (tmp_path / "x.csv").exists()


def test_the_sql_file_system_is_confined_on_its_own():
    """Below DuckDB's settings: the registered file system itself serves only the store's prefix."""
    bucket = new_bucket()
    store = small_store(f"s3://{bucket}/run1")
    small_store(f"s3://{bucket}/run10")
    fs = StoreFileSystem(store.storage)
    assert len(fs.glob(f"s3://{bucket}/run1/rollouts/round=0/part-*.parquet")) == 3
    for path in (f"s3://{bucket}/run10/store.json", f"s3://{bucket}/run1/../run10/store.json", f"s3://{bucket}/"):
        with pytest.raises(PermissionError):
            fs.open(path, "rb")
    with pytest.raises(PermissionError):
        fs.open(f"s3://{bucket}/run1/new.parquet", "wb")
    with pytest.raises(PermissionError):
        fs.rm(f"s3://{bucket}/run1/store.json")


# -- atomic parts ---------------------------------------------------------------------------------------
class StallingProxy:
    """A TCP relay to the S3 server that stops passing a connection's bytes upward once it has relayed
    `limit` of them (mid-way through a large PUT), then reports it; `close()` cuts every connection."""

    def __init__(self, upstream: str, limit: int):
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream, self.limit, self.stalled, self.sockets = (host, int(port)), limit, threading.Event(), []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            up = socket.create_connection(self.upstream)
            self.sockets += [down, up]
            threading.Thread(target=self._pump, args=(down, up, self.limit), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, down, None), daemon=True).start()

    def _pump(self, src, dst, limit):
        relayed = 0
        try:
            while data := src.recv(65536):
                relayed += len(data)
                if limit is not None and relayed > limit:
                    self.stalled.set()
                    return  # the rest of the request never reaches the server
                dst.sendall(data)
        except OSError:
            pass

    def close(self):
        self.listener.close()
        for s in self.sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


BIG_WRITER = textwrap.dedent("""
    import base64, os, sys
    from replay.store import Store
    from tests._store_rows import rollout_row
    store = Store.open(sys.argv[1])
    text = base64.b64encode(os.urandom(6 * 2 ** 20)).decode()  # incompressible: a ~8 MB part
    store.write("rollouts", [dict(rollout_row(0, "p", 0), completion_text=text)], round=0)
    print("written")
""")


def test_a_writer_killed_mid_upload_leaves_no_part(server):
    bucket = new_bucket()
    uri = f"s3://{bucket}/run"
    small_store(uri)
    before = keys_under(bucket)
    proxy = StallingProxy(server, limit=2 * 2 ** 20)
    env = dict(os.environ, AWS_ENDPOINT_URL=proxy.url, PYTHONPATH=os.pathsep.join(sys.path))
    writer = subprocess.Popen([sys.executable, "-c", BIG_WRITER, uri], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        assert proxy.stalled.wait(120), writer.communicate(timeout=5)[0]
        writer.send_signal(signal.SIGKILL)
        writer.wait(30)
    finally:
        proxy.close()
    time.sleep(1)  # let the server finish with the cut connection
    assert writer.returncode == -signal.SIGKILL
    assert keys_under(bucket) == before
    assert client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    store = Store.open(uri)
    assert store.query("SELECT count(*) AS n FROM rollouts").to_pylist() == [{"n": 6}]
    assert not diagnose(uri).errors


# -- doctor ---------------------------------------------------------------------------------------------
def test_doctor_on_a_remote_store_names_a_truncated_object():
    bucket = new_bucket()
    store = small_store(f"s3://{bucket}/run")
    ok = invoke("doctor", "--store", store.root)
    assert ok.exit_code == 0 and f"ok: s3://{bucket}/run: 7 Parquet files" in ok.output, ok.output
    victim = store.files("verdicts")[1]
    payload = victim.read_bytes()
    client().put_object(Bucket=bucket, Key=victim.key, Body=payload[: len(payload) // 2])
    bad = invoke("doctor", "--store", store.root)
    assert bad.exit_code == 1, bad.output
    assert f"error: {victim}: unreadable Parquet file (truncated or corrupt)" in bad.output
    assert [str(p.path) for p in diagnose(store.root).errors] == [str(victim)]
    # a multipart upload another tool left unfinished: invisible to readers, reported as a warning
    key = "run/rollouts/round=0/part-from-elsewhere.parquet"
    upload = client().create_multipart_upload(Bucket=bucket, Key=key)
    client().upload_part(Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=b"x" * 100)
    warnings = [p for p in diagnose(store.root).problems if p.severity == "warning"]
    assert [str(p.path) for p in warnings] == [f"s3://{bucket}/{key}"]
    assert "incomplete multipart upload" in warnings[0].message
    assert len(store.files("rollouts")) == 3  # the parts uploaded so far are not objects


# -- the round lease -----------------------------------------------------------------------------------
def test_one_of_many_racing_takers_gets_the_lease():
    storage = Store.create(f"s3://{new_bucket()}/run").storage
    n = 8
    barrier, results = threading.Barrier(n), [None] * n

    def take(i):
        barrier.wait()
        results[i] = S3Lease(storage, storage.root / ".round.lock", ttl=30, holder=f"taker {i}").try_acquire()

    threads = [threading.Thread(target=take, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, r in enumerate(results) if r is None]
    assert len(winners) == 1
    assert all(f"taker {winners[0]}" in r for r in results if r is not None)


LEASE_HOLDER = textwrap.dedent("""
    import sys, time
    from replay.storage import resolve
    root = resolve(sys.argv[1])
    root.storage.lease(".round.lock", float(sys.argv[2]), holder="the killed tick").acquire()
    print("held", flush=True)
    time.sleep(600)
""")


def test_a_killed_holders_lease_expires_and_exactly_one_takes_it_over():
    uri = f"s3://{new_bucket()}/run"
    storage = Store.create(uri).storage
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    holder = subprocess.Popen([sys.executable, "-c", LEASE_HOLDER, uri, "3"], env=env, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    time.sleep(4)  # past the ttl: a live holder has renewed it
    with pytest.raises(LeaseHeld, match="the killed tick"):
        storage.lease(".round.lock", 3).acquire()
    holder.kill()
    holder.wait()
    time.sleep(5)  # no renewal now: stale after 3 s by the server's clock
    n = 6
    barrier, results = threading.Barrier(n), [None] * n

    def take(i):
        barrier.wait()
        results[i] = S3Lease(storage, storage.root / ".round.lock", ttl=30, holder=f"taker {i}").try_acquire()

    threads = [threading.Thread(target=take, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r is None for r in results) == 1, results


def test_a_released_lease_is_free_again():
    storage = Store.create(f"s3://{new_bucket()}/run").storage
    with storage.lease(".round.lock", 30).acquire():
        with pytest.raises(LeaseHeld):
            storage.lease(".round.lock", 30).acquire()
    with storage.lease(".round.lock", 30).acquire():
        pass
    assert not (storage.root / ".round.lock").exists()


def test_a_tick_whose_lease_was_taken_over_says_so(monkeypatch):
    from stages import round as round_stage

    monkeypatch.setattr(round_stage, "LEASE_SECONDS", 1.5)
    root = Store.create(f"s3://{new_bucket()}/run").root
    with pytest.raises(ReplayError, match="taken over while this tick ran"):
        with round_stage.store_lock(root):
            # another tick that judged the lease stale replaces it: our next renewal's If-Match fails
            client().put_object(Bucket=root.storage.bucket, Key=f"{root.key}/.round.lock", Body=b'{"holder": "b"}')
            time.sleep(1.5)
    assert json.loads((root / ".round.lock").read_text()) == {"holder": "b"}  # theirs, not deleted by us


def test_a_round_tick_that_finds_the_lease_held_does_nothing(tmp_path):
    uri = f"s3://{new_bucket()}/run"
    storage = resolve(uri).storage
    config = tmp_path / "run.toml"
    config.write_text('[generate]\nmodel = "no-such-model"\n')  # never loaded: the tick stops at the lease
    with storage.lease(".round.lock", 60, holder="a tick on another machine").acquire():
        result = invoke("round", "--store", uri, "--config", config)
    assert result.exit_code == 0, result.output
    assert "another round is running" in result.output and "a tick on another machine" in result.output
    assert not resolve(uri).exists()  # not even store.json


# -- whole rounds, shards, adapters -------------------------------------------------------------------
@pytest.fixture(scope="module")
def config(tmp_path_factory):
    model = save_tiny_model(tmp_path_factory.mktemp("tiny"))
    path = tmp_path_factory.mktemp("cfg") / "run.toml"
    path.write_text(CONFIG.format(model=model))
    return path


def test_two_ticks_on_an_s3_store_run_rounds_once_with_the_rows_of_a_local_store(tmp_path, config):
    local = tmp_path / "local"
    assert tick(local, config, "--until", "1").returncode == 0
    uri = f"s3://{new_bucket()}/run1"
    env_cache = tmp_path / "cache"
    os.environ["REPLAY_CACHE"] = str(env_cache)
    try:
        first, second = (tick(uri, config, "--until", "1", background=True) for _ in range(2))
        outputs = [p.communicate(timeout=600)[0] for p in (first, second)]
    finally:
        os.environ.pop("REPLAY_CACHE")
    assert [p.returncode for p in (first, second)] == [0, 0], outputs
    assert sum("another round is running" in out for out in outputs) == 1, outputs
    want, got = snapshot(local), snapshot(uri)
    assert got == want  # same rollouts, verdicts, advantages: round 1 sampled with round 0's S3 adapter
    rows = Store.open(uri).query("SELECT DISTINCT round, policy_round, policy_adapter FROM rollouts ORDER BY 1")
    assert rows.to_pylist()[1] == {"round": 1, "policy_round": 0, "policy_adapter": f"{uri}/adapters/round=0"}
    assert len(list((env_cache / "adapters").iterdir())) == 1  # the round-0 adapter, fetched once, by content
    assert not diagnose(uri).problems
    bucket = uri[5:].split("/")[0]
    assert not [k for k in keys_under(bucket) if ".round.lock" in k or ".tmp" in k]
    status = invoke("status", "--store", uri)
    assert status.exit_code == 0 and "complete" in status.output, status.output
    weights = resolve(f"{uri}/adapters/round=1/adapter_model.safetensors")  # doctor reads adapters remotely
    client().put_object(Bucket=bucket, Key=weights.key, Body=weights.read_bytes()[:100])
    assert [(str(p.path), "truncated" in p.message) for p in diagnose(uri).errors] == [(str(weights), True)]


GENERATE = ["generate", "--round", 0, "--num-prompts", 6, "-G", 2, "--max-new-tokens", 4, "--engine",
            "transformers", "--levels", "1", "--seed", 5, "--batch-size", 1]


def test_two_generate_shards_at_once_on_s3_equal_one_local_run(tmp_path):
    from tests.test_shards import ROLLOUT_COLUMNS, run_workers

    model = save_tiny_model(tmp_path / "tiny")
    local, uri = tmp_path / "local", f"s3://{new_bucket()}/sharded"
    assert invoke(*GENERATE, "--model", model, "--store", local).exit_code == 0
    run_workers([[[*GENERATE, "--model", model, "--store", uri, "--shard", f"{i}/2"]] for i in range(2)],
                preload=("stages.generate", "replay.engines.hf_engine"))
    sql = f"SELECT {ROLLOUT_COLUMNS} FROM rollouts ORDER BY prompt_id, sample_idx"
    assert Store.open(uri).query(sql).to_pylist() == Store.open(local).query(sql).to_pylist()
    stages = {Path(k).name for k in keys_under(uri[5:].split("/")[0], "sharded/manifests/")}
    assert stages == {"generate.shard-0-of-2.json", "generate.shard-1-of-2.json"}


UPLOAD_KILLED = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from replay.storage import resolve
    from replay.storage.s3 import S3Storage
    put, calls = S3Storage.put, [0]
    def put_then_die(self, path, payload):
        put(self, path, payload)
        calls[0] += 1
        if calls[0] == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)
    S3Storage.put = put_then_die
    root = resolve(sys.argv[1])
    root.storage.upload_dir(Path(sys.argv[2]), root, "adapter_config.json")
""")


def test_an_adapter_is_published_by_its_marker_last(tmp_path, monkeypatch):
    from replay import adapters

    monkeypatch.setenv("REPLAY_CACHE", str(tmp_path / "cache"))
    local = tmp_path / "adapter"
    local.mkdir()
    for name, payload in (("adapter_config.json", b"{}"), ("adapter_model.safetensors", b"w" * 100),
                          ("manifest.json", b"{}")):
        (local / name).write_bytes(payload)
    uri = f"s3://{new_bucket()}/run/adapters/round=0"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    for nth in (1, 2):  # killed after the weights, after the manifest: never the marker before them
        killed = subprocess.run([sys.executable, "-c", UPLOAD_KILLED, uri, local, str(nth)], env=env)
        assert killed.returncode == -signal.SIGKILL
        assert not adapters.exists(resolve(uri))
    done = subprocess.run([sys.executable, "-c", UPLOAD_KILLED, uri, local, "0"], env=env)
    assert done.returncode == 0 and adapters.exists(resolve(uri))
    copy = Path(adapters.local_copy(uri))
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in local.iterdir())
    assert adapters.local_copy(uri) == str(copy)  # once per process
    (local / "adapter_model.safetensors").write_bytes(b"v" * 100)  # new content: a new copy
    subprocess.run([sys.executable, "-c", UPLOAD_KILLED, uri, local, "0"], env=env, check=True)
    adapters._LOCAL_COPIES.clear()  # as a new process would
    assert Path(adapters.local_copy(uri)) != copy
    assert (Path(adapters.local_copy(uri)) / "adapter_model.safetensors").read_bytes() == b"v" * 100


def test_a_stage_already_writing_an_s3_round_makes_a_second_copy_exit(tmp_path):
    from replay.locks import LEASE_SECONDS, lock_name

    uri = f"s3://{new_bucket()}/locked"
    root = small_store(uri).root
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"problem": "w1", "answer": "1", "completion": "x"}) + "\n")
    before = keys_under(root.storage.bucket, root.storage.prefix + "/rollouts")
    with root.storage.lease(lock_name(0, "rollouts", (0, 1)), LEASE_SECONDS, holder="generate, pid 1 on elsewhere"):
        result = invoke("import", rows, "--store", uri, "--round", 0)
    assert result.exit_code == 1 and "another process is writing that round (generate, pid 1 on elsewhere" \
        in result.output
    assert keys_under(root.storage.bucket, root.storage.prefix + "/rollouts") == before
    assert invoke("import", rows, "--store", uri, "--round", 0).exit_code == 0  # released: free again
