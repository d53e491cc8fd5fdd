"""Proxy processes sharing drafting state through Redis: replicas, restarts, outages, tenants.

Each test starts real `quickdraft serve` processes in front of the session's real
SmolLM2 worker. "Drafts for" is measured the way it matters: the verification
steps a request needs. A response the proxy has learned is drafted whole, so the
same greedy answer takes a fraction of the steps it took cold.
"""

from __future__ import annotations

import json
import time
import uuid

import grpc
import redis
from conftest import SHARED_REDIS, free_port, start, stop
from grpc_health.v1 import health_pb2, health_pb2_grpc

from quickdraft.cli import wait_serving
from quickdraft.client import Completion, QuickDraftClient

KEYS = {"key-a": "tenant-a", "key-b": "tenant-b"}
FIRST = [{"role": "user", "content": "Name three uses of a hash map in everyday programming, briefly."}]
SECOND = [{"role": "user", "content": "Why do people write unit tests? Answer in a short paragraph."}]
MAX_TOKENS = 48


class Proxy:
    def __init__(self, worker: str, url: str, prefix: str, log) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.proc = start(
            ["serve", "--worker", worker, "--grpc-port", str(self.port), "--redis-url", url], log,
            # Fixed draft sizes (no load-based sizing), so step counts measure only what was learned.
            env={"QUICKDRAFT_REDIS_PREFIX": prefix, "QUICKDRAFT_API_KEYS": json.dumps(KEYS),
                 "QUICKDRAFT_ADAPTIVE_SPECULATION": "false"},
        )
        try:
            wait_serving(self.address, timeout=120, proc=self.proc)
        except Exception:
            stop(self.proc)
            raise RuntimeError(f"proxy did not start:\n{log.read_text()[-4000:]}") from None

    def ask(self, messages, key: str = "key-a") -> Completion:
        with QuickDraftClient(self.address, api_key=key) as c:
            return c.generate(messages, max_tokens=MAX_TOKENS, session_id=f"s-{uuid.uuid4().hex[:8]}", timeout=120)

    def shared_state(self) -> int:
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            return stub.Check(health_pb2.HealthCheckRequest(service="quickdraft.v1.SharedState"), timeout=5).status

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def steps(c: Completion) -> int:
    return c.usage.verification_steps


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def logged_responses(url: str, prefix: str, tenant: str) -> int:
    client = redis.Redis.from_url(url)
    return sum(client.xlen(k) for k in client.scan_iter(match=f"{prefix}:{{{tenant}|*}}:log"))


# A replica finds another replica's new scope within its rescan interval (2 s) and
# then receives new entries at once; this leaves room for both on a busy machine.
PROPAGATION_S = 4.0


def test_replicas_share_learning_survive_a_kill_and_keep_tenants_apart(worker_address, prefix, tmp_path):
    one = Proxy(worker_address, SHARED_REDIS, prefix, tmp_path / "one.log")
    two = Proxy(worker_address, SHARED_REDIS, prefix, tmp_path / "two.log")
    restarted = None
    try:
        cold = one.ask(FIRST)
        assert len(cold.token_ids) == MAX_TOKENS
        wait_for(lambda: logged_responses(SHARED_REDIS, prefix, "tenant-a") >= 1, 10, "the response in Redis")
        time.sleep(PROPAGATION_S)

        # What replica one learned drafts for replica two: same answer, a fraction of the steps.
        shared = two.ask(FIRST)
        assert shared.token_ids == cold.token_ids
        assert steps(shared) * 3 <= steps(cold), (steps(shared), steps(cold))

        # Another tenant on the same replica gets nothing of tenant-a's: it drafts exactly as cold.
        other = two.ask(FIRST, key="key-b")
        assert other.token_ids == cold.token_ids
        assert steps(other) == steps(cold), (steps(other), steps(cold))

        # Killed without a chance to clean up, then restarted: as warm as before the kill.
        before_kill = one.ask(FIRST)
        one.kill()
        restarted = Proxy(worker_address, SHARED_REDIS, prefix, tmp_path / "restarted.log")
        after = restarted.ask(FIRST)
        assert after.token_ids == cold.token_ids
        assert steps(after) <= steps(before_kill), (steps(after), steps(before_kill))
        print(f"steps: cold {steps(cold)}, other replica {steps(shared)}, other tenant {steps(other)}, "
              f"before kill {steps(before_kill)}, after restart {steps(after)}")
    finally:
        for p in (one, two, restarted):
            if p is not None:
                stop(p.proc)


def test_redis_outage_keeps_serving_and_recovers(worker_address, own_redis, tmp_path):
    url, stop_redis, restart_redis = own_redis
    proxy = Proxy(worker_address, url, "qd", tmp_path / "proxy.log")
    newcomer = None
    try:
        first = proxy.ask(FIRST)
        wait_for(lambda: logged_responses(url, "qd", "tenant-a") >= 1, 10, "the response in Redis")

        stop_redis()
        wait_for(lambda: proxy.shared_state() == health_pb2.HealthCheckResponse.NOT_SERVING, 15,
                 "SharedState health to report the outage")
        # Requests keep succeeding from memory while Redis is down, and what they teach is kept.
        second = proxy.ask(SECOND)
        assert len(second.token_ids) == MAX_TOKENS
        again = proxy.ask(FIRST)
        assert again.token_ids == first.token_ids and steps(again) * 3 <= steps(first)

        restart_redis()  # comes back empty: nothing on disk
        wait_for(lambda: proxy.shared_state() == health_pb2.HealthCheckResponse.SERVING, 20,
                 "SharedState health to recover")
        # Re-seeded from the replica's memory, including what was learned during the outage.
        wait_for(lambda: logged_responses(url, "qd", "tenant-a") >= 3, 20, "the log to be re-seeded")

        newcomer = Proxy(worker_address, url, "qd", tmp_path / "newcomer.log")
        for messages, cold in ((FIRST, first), (SECOND, second)):
            warm = newcomer.ask(messages)
            assert warm.token_ids == cold.token_ids
            assert steps(warm) * 3 <= steps(cold), (steps(warm), steps(cold))
    finally:
        stop(proxy.proc)
        if newcomer is not None:
            stop(newcomer.proc)
