"""Shared fixtures: a real worker process holding SmolLM2 and a real proxy in front of it."""

from __future__ import annotations

import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from quickdraft.cli import _die_with_parent

ROOT = pathlib.Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Proxies the tests start serve no HTTP unless a test asks (port 8000 may be in use).
os.environ.setdefault("QUICKDRAFT_HTTP_PORT", "0")
# Records of the proxies and runs the tests start go to a database of this test session, not ~/.cache.
os.environ.setdefault("QUICKDRAFT_DATABASE_URL", f"sqlite:///{tempfile.mkdtemp(prefix='qd-records-')}/records.db")
POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trace_files(n: int) -> list[pathlib.Path]:
    from quickdraft.bench.traces import default_traces_dir

    traces = default_traces_dir()
    files = sorted(traces.glob("*.traj.json"))
    assert files, f"no trajectories under {traces}"
    return files[:n]


def trimmed_trace(directory: pathlib.Path, chars: int = 600) -> pathlib.Path:
    """The first dev trajectory with every message cut to ``chars`` characters: the same calls, turns
    and copying between them, with prompts a tenth as long (on a 2-core CPU without AVX-512 the real
    model prefills about 150 tokens a second, and full prompts made a live replay take minutes)."""
    import json

    from quickdraft.bench.traces import trajectory_messages

    source = trace_files(1)[0]
    messages = [{"role": m["role"], "content": m["content"][:chars]} for m in trajectory_messages(source)]
    target = directory / f"trimmed-{source.name}"
    target.write_text(json.dumps({"messages": messages}))
    return target


def start(args: list[str], log: pathlib.Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with log.open("a") as handle:  # (the child has its own copy of the descriptor)
        return subprocess.Popen([sys.executable, "-m", "quickdraft", *args], stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_die_with_parent,
                                env={**os.environ, **(env or {})})


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def worker_address(tmp_path_factory) -> Iterator[str]:
    from quickdraft.cli import wait_serving

    port = free_port()
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    proc = start(["worker", "--model", "smollm2-135m", "--port", str(port), "--threads", "1"], log)
    address = f"127.0.0.1:{port}"
    try:
        wait_serving(address, timeout=300, proc=proc)
    except Exception:
        stop(proc)
        raise RuntimeError(f"worker did not start:\n{log.read_text()[-4000:]}") from None
    yield address
    stop(proc)


SHARED_REDIS = "redis://127.0.0.1:6379/0"


def _own_prefix() -> Iterator[str]:
    """A key prefix of its own on the shared Redis; its keys are removed afterwards."""
    import uuid

    name = f"qdtest-{uuid.uuid4().hex[:8]}"
    yield name
    client = redis.Redis.from_url(SHARED_REDIS)
    for key in client.scan_iter(match=f"{name}:*"):
        client.delete(key)


redis_prefix = pytest.fixture(scope="session", name="redis_prefix")(_own_prefix)  # the shared proxy's
prefix = pytest.fixture(name="prefix")(_own_prefix)                                # one test's


HTTP_PORT = free_port()


@pytest.fixture(scope="session")
def proxy_address(worker_address, redis_prefix, tmp_path_factory) -> Iterator[str]:
    """The proxy keeps its drafting state in the real Redis, as in production, and serves HTTP too."""
    from quickdraft.cli import wait_serving

    port = free_port()
    log = tmp_path_factory.mktemp("proxy") / "proxy.log"
    proc = start(["serve", "--worker", worker_address, "--grpc-port", str(port), "--redis-url", SHARED_REDIS,
                  "--http-port", str(HTTP_PORT)], log, env={"QUICKDRAFT_REDIS_PREFIX": redis_prefix})
    address = f"127.0.0.1:{port}"
    try:
        wait_serving(address, timeout=120, proc=proc)
    except Exception:
        stop(proc)
        raise RuntimeError(f"proxy did not start:\n{log.read_text()[-4000:]}") from None
    yield address
    stop(proc)


@pytest.fixture(scope="session")
def http_base(proxy_address) -> str:
    """Base URL of the session proxy's OpenAI-compatible endpoint."""
    return f"http://127.0.0.1:{HTTP_PORT}/v1"


@pytest.fixture(scope="session")
def client(proxy_address):
    from quickdraft.client import QuickDraftClient

    with QuickDraftClient(proxy_address) as c:
        yield c


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server of the test's own on a free port (the shared one is never stopped)."""
    port = free_port()
    binary = shutil.which("redis-server")
    assert binary, "redis-server is needed"
    cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
           "--dir", str(tmp_path)]

    def launch():
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        client = redis.Redis(port=port)
        for _ in range(100):
            try:
                client.ping()
                return proc
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    server = {"proc": launch()}

    def stop():
        server["proc"].terminate()
        server["proc"].wait(timeout=10)

    def restart():
        server["proc"] = launch()

    yield f"redis://127.0.0.1:{port}/0", stop, restart
    if server["proc"].poll() is None:
        stop()


def _cluster_port() -> int:
    """A free port whose cluster-bus port (port + 10000) is free as well."""
    for _ in range(200):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory) -> Iterator[str]:
    """A 3-primary Redis Cluster of the test's own on free ports; yields a URL naming one node."""
    binary = shutil.which("redis-server")
    assert binary and shutil.which("redis-cli"), "redis-server and redis-cli are needed"
    ports = [_cluster_port() for _ in range(3)]
    procs = []
    for port in ports:
        node_dir = tmp_path_factory.mktemp(f"cluster-{port}")
        procs.append(subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
             "--cluster-config-file", str(node_dir / "nodes.conf"), "--save", "", "--appendonly", "no",
             "--dir", str(node_dir)], stdout=subprocess.DEVNULL))
    try:
        for port in ports:
            _wait_ping(redis.Redis(port=port))
        subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
                        "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 30
        while not all(redis.Redis(port=p).cluster("info").get("cluster_state") == "ok" for p in ports):
            assert time.monotonic() < deadline, "the test cluster did not reach cluster_state:ok"
            time.sleep(0.2)
        yield f"redis://127.0.0.1:{ports[0]}/0"
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=10)


def _wait_ping(client: redis.Redis) -> None:
    for _ in range(100):
        try:
            client.ping()
            return
        except redis.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> Iterator[str]:
    """An empty database of the test's own: a SQLite file, or a new database on the real PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/records.db"
        return
    import sqlalchemy

    name = f"qdtest_{uuid.uuid4().hex[:10]}"
    admin = sqlalchemy.create_engine(f"{POSTGRES}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{POSTGRES}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
