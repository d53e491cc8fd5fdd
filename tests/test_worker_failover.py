"""Several workers per model: registration, failover mid-request, eviction and rebuild.

Real worker processes with SmolLM2; the outputs are compared with the same
requests served by the session's ordinary worker and proxy (greedy, one CPU
thread everywhere, so the numbers are the same).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator

from conftest import free_port, start, stop

from quickdraft.cli import wait_serving
from quickdraft.client import QuickDraftClient

QUESTION = [{"role": "user", "content": "Write a short story about a lighthouse keeper who finds a message."}]


def long_prompt(topic: str) -> list[dict[str, str]]:
    lines = "\n".join(f"line {i}: {topic}_value_{i} = compute({i}) + offset_{i % 7}" for i in range(35))
    return [{"role": "user", "content": f"Here is a file about {topic}:\n{lines}\nWhat does line 3 compute?"}]


def launch_worker(tmp_path, name: str, *extra: str, env: dict[str, str] | None = None):
    port = free_port()
    log = tmp_path / f"{name}.log"
    proc = start(["worker", "--model", "smollm2-135m", "--port", str(port), "--threads", "1", *extra], log, env=env)
    return proc, f"127.0.0.1:{port}", log


def launch_proxy(tmp_path, *workers: str, env: dict[str, str] | None = None):
    port = free_port()
    log = tmp_path / "proxy.log"
    args = ["serve", "--grpc-port", str(port)]
    for w in workers:
        args += ["--worker", w]
    return start(args, log, env=env), f"127.0.0.1:{port}", log


def ready(proc, address, log) -> None:
    try:
        wait_serving(address, timeout=300, proc=proc)
    except Exception:
        stop(proc)
        raise RuntimeError(f"{address} did not start:\n{log.read_text()[-4000:]}") from None


@contextlib.contextmanager
def worker_with_proxy(tmp_path, *worker_args: str, proxy_env: dict[str, str] | None = None,
                      worker_env: dict[str, str] | None = None) -> Iterator[tuple[subprocess.Popen, str, list]]:
    """A worker (with these extra arguments) and a proxy in front of it; yields (worker, proxy address,
    the list of processes to stop, which a test may extend)."""
    worker, worker_addr, worker_log = launch_worker(tmp_path, "worker", *worker_args, env=worker_env)
    procs = [worker]
    try:
        ready(worker, worker_addr, worker_log)
        proxy, proxy_addr, proxy_log = launch_proxy(tmp_path, worker_addr, env=proxy_env)
        procs.append(proxy)
        ready(proxy, proxy_addr, proxy_log)
        yield worker, proxy_addr, procs
    finally:
        for p in procs:
            stop(p)


def test_registered_worker_takes_over_when_the_first_dies_mid_request(tmp_path, client):
    # The proxy admits registered workers by a shared token (settings from the environment on both).
    token = {"QUICKDRAFT_REGISTRATION_TOKEN": "failover-secret"}
    with worker_with_proxy(tmp_path, proxy_env=token) as (first, proxy_addr, procs):
        # A second worker joins the running proxy by itself.
        second, second_addr, second_log = launch_worker(tmp_path, "second", "--register", proxy_addr, env=token)
        procs.append(second)
        ready(second, second_addr, second_log)
        with QuickDraftClient(proxy_addr) as qd:
            deadline = time.monotonic() + 30
            while qd.list_models().models[0].workers < 2:
                assert time.monotonic() < deadline, "the registered worker never joined"
                time.sleep(0.2)

            reference = client.generate(QUESTION, max_tokens=96, session_id="failover-ref")
            stream = qd.stream(QUESTION, max_tokens=96, session_id="failover", timeout=300)
            chunks = [next(stream)]           # the request is under way on the first worker
            first.kill()
            chunks.extend(stream)
            tokens = [t for c in chunks for t in c.token_ids]
            usage = chunks[-1].usage
            assert tokens == list(reference.token_ids)
            assert usage.worker_failovers == 1
            # The session was rebuilt from the proxy's history on the second worker.
            assert usage.prefilled_tokens > usage.prompt_tokens + usage.verification_steps - 1
            # And the proxy keeps serving on the survivor.
            after = qd.generate(QUESTION, max_tokens=8, session_id="after-failover")
            assert after.token_ids == reference.token_ids[:8]


def test_a_hung_worker_is_passed_over_at_the_step_deadline(tmp_path, client):
    """A worker that stops answering without dying (here: SIGSTOP, as a stuck process or a frozen
    host looks) holds a request only for the step's deadline; the other worker finishes it."""
    first, first_addr, first_log = launch_worker(tmp_path, "first")
    second, second_addr, second_log = launch_worker(tmp_path, "second")
    procs = [first, second]
    try:
        ready(first, first_addr, first_log)
        ready(second, second_addr, second_log)
        proxy, proxy_addr, proxy_log = launch_proxy(tmp_path, first_addr, second_addr,
                                                    env={"QUICKDRAFT_VERIFY_TIMEOUT_S": "3"})
        procs.append(proxy)
        ready(proxy, proxy_addr, proxy_log)
        reference = client.generate(QUESTION, max_tokens=96, session_id="hung-ref")
        with QuickDraftClient(proxy_addr) as qd:
            stream = qd.stream(QUESTION, max_tokens=96, session_id="hung", timeout=300)
            chunks = [next(stream)]     # under way on the first worker (both idle: the first is picked)
            os.kill(first.pid, signal.SIGSTOP)
            started = time.monotonic()
            chunks.extend(stream)
            waited = time.monotonic() - started
        tokens = [t for c in chunks for t in c.token_ids]
        assert tokens == list(reference.token_ids)
        assert chunks[-1].usage.worker_failovers == 1
        assert 3 <= waited < 120
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(first.pid, signal.SIGCONT)
        for p in procs:
            stop(p)


def test_an_evicted_session_is_rebuilt_transparently(tmp_path, client):
    # 64 MB holds about 1,400 SmolLM2 positions in fp32: two ~800-token sessions cannot both stay.
    # Sessions count as idle at once here (by default a session used in the last 10 s is spared).
    with worker_with_proxy(tmp_path, "--kv-budget-mb", "64", worker_env={"QUICKDRAFT_KV_ACTIVE_S": "0"}) \
            as (_, proxy_addr, _procs):
        a, b = long_prompt("alpha"), long_prompt("beta")
        with QuickDraftClient(proxy_addr) as qd:
            a1 = qd.generate(a, max_tokens=24, session_id="a")
            qd.generate(b, max_tokens=24, session_id="b")      # evicts session a's KV
            a_next = a + [{"role": "assistant", "content": a1.text}, {"role": "user", "content": "And line 5?"}]
            a2 = qd.generate(a_next, max_tokens=24, session_id="a")
        assert a1.usage.prompt_tokens > 700
        # The worker no longer held the session: the proxy resent its history, nothing reused.
        assert a2.usage.reused_prompt_tokens == 0
        assert a2.usage.prefilled_tokens == a2.usage.prompt_tokens + a2.usage.verification_steps - 1
        # Same output as a worker that never evicted it.
        ref1 = client.generate(a, max_tokens=24, session_id="evict-ref")
        ref2 = client.generate(a_next, max_tokens=24, session_id="evict-ref")
        assert a1.token_ids == ref1.token_ids and a2.token_ids == ref2.token_ids
        assert ref2.usage.reused_prompt_tokens >= ref1.usage.prompt_tokens
