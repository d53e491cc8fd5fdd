"""The shared drafting state on a real 3-primary Redis Cluster (started by the test on free ports).

The same code and the same kind of URL as for a standalone server: the log finds
out that it talks to a cluster, spreads tenants over the slots by their hash tags,
and reads each slot on its own (a multi-key XREAD may not cross slots).
"""

from __future__ import annotations

import json
import time
import uuid

import pytest
from conftest import stop, trace_files
from redis.cluster import RedisCluster
from test_cli_and_replay import quickdraft
from test_redis_log import Replica, eventually
from test_shared_state import FIRST, PROPAGATION_S, Proxy, steps

from quickdraft.suffix_cache.base import Scope

TENANTS = [Scope(f"tenant-{i}", "tok-1") for i in range(12)]


def answer(i: int) -> list[int]:
    return [7000 + 10 * i + k for k in range(6)]


def nodes_holding(url: str, keys: list[str]) -> set[str]:
    client = RedisCluster.from_url(url)
    try:
        return {client.get_node_from_key(k).name for k in keys}
    finally:
        client.close()


async def test_replicas_share_learning_across_every_node_and_keep_tenants_apart(redis_cluster):
    prefix = f"qdc-{uuid.uuid4().hex[:8]}"
    one, two = Replica(redis_cluster, prefix), Replica(redis_cluster, prefix)
    await one.log.start()
    await two.log.start()
    restarted = None
    try:
        assert one.log.cluster and two.log.cluster
        # The tenants' streams are spread over all three primaries, so the tail must read several slots.
        assert len(nodes_holding(redis_cluster, [one.log.key_for(s) for s in TENANTS])) == 3
        for i, scope in enumerate(TENANTS):
            one.learn(scope, answer(i))
        for i, scope in enumerate(TENANTS):
            ctx = [1, *answer(i)[:2]]
            assert await eventually(lambda s=scope, c=ctx, a=answer(i): two.drafts(s, c)[:4] == a[2:], timeout=5), scope
            # Another tenant's context with the same tokens drafts nothing of this tenant's answer.
            other = TENANTS[(i + 1) % len(TENANTS)]
            assert not set(two.drafts(other, ctx)) & set(answer(i)[2:])
        assert await one.log.flush()
        await one.log.close()
        restarted = Replica(redis_cluster, prefix)
        await restarted.log.start()  # replays every slot's streams before serving
        assert all(restarted.drafts(s, [1, *answer(i)[:2]])[:4] == answer(i)[2:] for i, s in enumerate(TENANTS))
    finally:
        for r in (one, two, restarted):
            if r is not None:
                await r.log.close()
        _delete(redis_cluster, prefix)


async def test_eviction_bound_holds_on_a_cluster(redis_cluster):
    prefix = f"qdc-{uuid.uuid4().hex[:8]}"
    replica = Replica(redis_cluster, prefix, max_tokens=60)
    await replica.log.start()
    try:
        for i in range(50):
            replica.learn(TENANTS[0], [5000 + i] * 10)
        assert await replica.log.flush()
        client = RedisCluster.from_url(redis_cluster)
        assert client.xlen(replica.log.key_for(TENANTS[0])) <= 6
        client.close()
    finally:
        await replica.log.close()
        _delete(redis_cluster, prefix)


@pytest.mark.parametrize("drafter", ["suffix"])
def test_oracle_replay_on_a_cluster_matches_in_process_and_starts_warm(redis_cluster, tmp_path, drafter):
    prefix = f"qdc-{uuid.uuid4().hex[:8]}"
    files = list(map(str, trace_files(2)))
    figures = []
    try:
        for run in ("in-process", "first", "second"):
            out = tmp_path / f"{run}.json"
            extra = [] if run == "in-process" else ["--redis-url", redis_cluster]
            done = quickdraft("replay", *files, "--oracle", "--drafter", drafter, "--json", str(out), *extra,
                              env={"QUICKDRAFT_REDIS_PREFIX": prefix})
            assert done.returncode == 0, done.stderr
            figures.append(json.loads(out.read_text())["tokens_per_step"])
        in_process, first, second = figures
        assert first == pytest.approx(in_process, rel=0.01)
        assert second > 1.5 * first
    finally:
        _delete(redis_cluster, prefix)


@pytest.mark.model
def test_two_proxy_processes_share_learning_through_a_cluster(worker_address, redis_cluster, tmp_path):
    prefix = f"qdc-{uuid.uuid4().hex[:8]}"
    one = Proxy(worker_address, redis_cluster, prefix, tmp_path / "one.log")
    two = Proxy(worker_address, redis_cluster, prefix, tmp_path / "two.log")
    try:
        cold = one.ask(FIRST)
        time.sleep(PROPAGATION_S)
        shared = two.ask(FIRST)
        assert shared.token_ids == cold.token_ids
        assert steps(shared) * 3 <= steps(cold), (steps(shared), steps(cold))
        assert two.shared_state() == 1  # SERVING: the cluster is reachable
    finally:
        for p in (one, two):
            stop(p.proc)
        _delete(redis_cluster, prefix)


def _delete(url: str, prefix: str) -> None:
    client = RedisCluster.from_url(url)
    try:
        for key in client.scan_iter(match=f"{prefix}:*"):
            client.delete(key)
    finally:
        client.close()
