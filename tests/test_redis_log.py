"""The Redis-backed response log against real Redis servers."""

import asyncio
import time
import uuid
from array import array

import redis

from quickdraft.suffix_cache.base import Scope, SessionKey
from quickdraft.suffix_cache.redis_log import LogSettings, ResponseLog, unpack
from quickdraft.suffix_cache.suffix import SuffixDrafter

SHARED_REDIS = "redis://127.0.0.1:6379/0"
A = Scope("tenant-a", "tok-1")
B = Scope("tenant-b", "tok-1")


class Replica:
    """A drafter whose scope-wide learning is backed by a ResponseLog, as in the proxy."""

    def __init__(self, url: str, prefix: str, **kw) -> None:
        self.drafter = SuffixDrafter()
        self.log = ResponseLog(LogSettings(url, prefix=prefix, block_ms=50, rescan_s=0.2, **kw),
                               apply=self.drafter.learn_response, export_state=self.export,
                               import_state=self.restore)
        self.restored: list[tuple[Scope, bool]] = []

    def export(self, scope: Scope) -> dict[str, bytes]:
        blob = self.drafter.export_state(scope)
        return {"suffix": blob} if blob else {}

    def restore(self, scope: Scope, blobs: dict[str, bytes]) -> None:
        self.restored.append((scope, self.drafter.import_state(scope, blobs["suffix"])))

    def decode(self, scope: Scope, context: list[int], answer: list[int]) -> None:
        """Draft and accept as the speculation loop does: the calibration learns from each step."""
        key = SessionKey(scope, f"run-{uuid.uuid4().hex}")
        self.drafter.begin_call(key, context)
        done = 0
        while done < len(answer):
            tree = self.drafter.propose(key, 8)
            n = len(tree.longest_accepted(answer[done:]))
            self.drafter.accept(key, answer[done:done + n + 1])
            done += n + 1
        self.drafter.end_call(key)
        self.log.publish(scope, answer)
        self.drafter.drop_session(key)

    def learn(self, scope: Scope, tokens: list[int]) -> None:
        self.drafter.learn_response(scope, tokens)
        self.log.publish(scope, tokens)

    def drafts(self, scope: Scope, context: list[int]) -> list[int]:
        key = SessionKey(scope, f"probe-{uuid.uuid4().hex}")
        self.drafter.begin_call(key, context)
        tree = self.drafter.propose(key, 8)
        self.drafter.drop_session(key)
        return tree.token_ids


async def eventually(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return predicate()


ANSWER = [900, 901, 902, 903, 904, 905]


async def test_what_one_replica_learns_drafts_for_another(prefix):
    one, two = Replica(SHARED_REDIS, prefix), Replica(SHARED_REDIS, prefix)
    await one.log.start()
    await two.log.start()
    try:
        one.learn(A, ANSWER)
        assert await eventually(lambda: two.drafts(A, [1, 900, 901])[:4] == [902, 903, 904, 905], timeout=3)
    finally:
        await one.log.close()
        await two.log.close()


async def test_a_restarted_replica_starts_warm(prefix):
    first = Replica(SHARED_REDIS, prefix)
    await first.log.start()
    for i in range(20):
        first.learn(A, [1000 + i, 2000 + i, 3000 + i, 4000 + i])
    assert await first.log.flush()
    await first.log.close()
    restarted = Replica(SHARED_REDIS, prefix)
    await restarted.log.start()  # replays the log before serving
    try:
        assert all(restarted.drafts(A, [5, 1000 + i, 2000 + i])[:2] == [3000 + i, 4000 + i] for i in range(20))
    finally:
        await restarted.log.close()


async def test_a_restarted_replica_keeps_what_its_drafts_taught_it(prefix):
    """The calibration (learned from drafts against emitted tokens) is snapshotted beside the log."""
    first = Replica(SHARED_REDIS, prefix, state_every_s=0.1)
    await first.log.start()
    try:
        for i in range(30):
            first.decode(A, [7, 8, 9], [500 + i % 5, 600, 601, 602, 603, 700 + i])
        learned = first.drafter.calibration(A)
        assert learned.observed > 0
        state_key = first.log.state_key_for(A)
        # The periodic snapshot, while the replica runs (not only at close).
        assert await eventually(lambda: redis.Redis.from_url(SHARED_REDIS).exists(state_key) == 1, timeout=3)
        assert await first.log.flush()
    finally:
        await first.log.close()  # writes a last snapshot
    restarted = Replica(SHARED_REDIS, prefix)
    await restarted.log.start()
    try:
        assert restarted.restored == [(A, True)]
        cal = restarted.drafter.calibration(A)
        assert cal.observed == learned.observed
        assert cal.dump() == learned.dump()
        assert restarted.drafter.calibration(B).observed == 0  # nothing of tenant A's for tenant B
    finally:
        await restarted.log.close()


async def test_a_stored_state_of_another_layout_is_ignored(prefix):
    first = Replica(SHARED_REDIS, prefix)
    await first.log.start()
    first.learn(A, ANSWER)
    assert await first.log.flush()
    await first.log.close()
    redis.Redis.from_url(SHARED_REDIS).hset(first.log.state_key_for(A), "suffix", b"not a calibration")
    restarted = Replica(SHARED_REDIS, prefix)
    await restarted.log.start()
    try:
        assert restarted.restored == [(A, False)]
        assert restarted.drafter.calibration(A).observed == 0
        assert restarted.drafts(A, [1, 900, 901])[:2] == [902, 903]  # the log itself still replayed
    finally:
        await restarted.log.close()


async def test_tenants_never_draft_from_each_other(prefix):
    one, two = Replica(SHARED_REDIS, prefix), Replica(SHARED_REDIS, prefix)
    await one.log.start()
    await two.log.start()
    try:
        one.learn(A, ANSWER)
        assert await eventually(lambda: two.drafts(A, [1, 900, 901]) != [])
        assert two.drafts(B, [1, 900, 901]) == [] and one.drafts(B, [1, 900, 901]) == []
        keys = {k.decode() for k in redis.Redis.from_url(SHARED_REDIS).scan_iter(match=f"{prefix}:*")}
        assert keys == {one.log.key_for(A)}
    finally:
        await one.log.close()
        await two.log.close()


async def test_eviction_keeps_redis_and_memory_under_the_bound(prefix):
    replica = Replica(SHARED_REDIS, prefix, max_tokens=60)
    replica.drafter.params.global_max_tokens = 60
    await replica.log.start()
    try:
        for i in range(50):
            replica.learn(A, [5000 + i] * 10)
        assert await replica.log.flush()
        client = redis.Redis.from_url(SHARED_REDIS)
        assert client.xlen(replica.log.key_for(A)) <= 6  # 6 responses of 10 tokens
        assert replica.drafter.responses(A).live_tokens <= 60 + 6  # + one boundary marker per response
        assert replica.drafts(A, [1, 5049]) and not replica.drafts(A, [1, 5000])  # oldest gone
    finally:
        await replica.log.close()


async def test_redis_stopped_and_restarted_during_a_run(own_redis):
    url, stop, restart = own_redis
    replica = Replica(url, "qd")
    await replica.log.start()
    try:
        replica.learn(A, [100, 101, 102, 103])
        assert await replica.log.flush()
        stop()
        # Redis is gone: the replica keeps learning and drafting from memory, and says it is degraded.
        replica.learn(A, [200, 201, 202, 203])
        assert await eventually(lambda: not replica.log.healthy)
        assert replica.drafts(A, [1, 200, 201])[:2] == [202, 203]
        restart()  # comes back empty (nothing on disk)
        assert await eventually(lambda: replica.log.healthy, timeout=10)
        assert await replica.log.flush()
        # Both what was learned before the outage (re-seeded) and during it reach a new replica.
        newcomer = Replica(url, "qd")

        async def both_known():
            await newcomer.log.start()
            return newcomer.drafts(A, [1, 100, 101])[:2] == [102, 103] and \
                newcomer.drafts(A, [1, 200, 201])[:2] == [202, 203]

        assert await eventually(lambda: replica.log.reseeds >= 1, timeout=10)
        assert await both_known()
        await newcomer.log.close()
    finally:
        await replica.log.close()


async def test_redis_restarted_empty_gets_an_idle_tenants_learned_state_back(own_redis):
    """The drafters export only what changed since their last export; the snapshot they last
    gave is kept until Redis holds it, so an outage or an empty restart loses nothing."""
    url, stop, restart = own_redis
    replica = Replica(url, "qd", state_every_s=0.1)
    await replica.log.start()
    try:
        client = redis.Redis.from_url(url)
        state_key = replica.log.state_key_for(A)
        for i in range(10):
            replica.decode(A, [7, 8, 9], [500 + i % 5, 600, 601, 602, 603, 700 + i])
        assert await eventually(lambda: client.exists(state_key) == 1, timeout=3)
        stop()
        # Learned while Redis is down: the failed snapshot is retried, not dropped.
        for i in range(10):
            replica.decode(A, [7, 8, 9], [800 + i % 5, 600, 601, 602, 603, 900 + i])
        assert await eventually(lambda: not replica.log.healthy)
        await asyncio.sleep(0.3)  # snapshot attempts fail meanwhile
        learned = replica.drafter.calibration(A).dump()
        restart()  # empty; the tenant stays idle from here on
        client = redis.Redis.from_url(url)
        assert await eventually(lambda: client.exists(state_key) == 1, timeout=10)
    finally:
        await replica.log.close()
    newcomer = Replica(url, "qd")
    await newcomer.log.start()
    try:
        assert newcomer.restored == [(A, True)]
        assert newcomer.drafter.calibration(A).dump() == learned
    finally:
        await newcomer.log.close()


async def test_entries_no_replica_wrote_are_skipped_not_fatal(prefix):
    """A foreign or damaged entry in a tenant's log neither keeps a proxy from starting nor stops
    the tail: it is counted and skipped, and what follows it is learned."""
    first = Replica(SHARED_REDIS, prefix)
    client = redis.Redis.from_url(SHARED_REDIS)
    key = first.log.key_for(A)
    client.xadd(key, {"o": "x", "s": 1})                                          # no tokens
    client.xadd(key, {"o": "x", "s": 2, "t": b"\x01\x02\x03"})                     # not whole ids
    client.xadd(key, {"o": "x", "s": 3, "t": array("i", [5, -7, 9]).tobytes()})     # a negative id
    client.xadd(key, {"o": "x", "s": "four", "t": array("i", [5]).tobytes()})       # not a sequence number
    client.xadd(key, {"o": "x", "s": 5, "t": array("i", [300, 301, 302, 303]).tobytes()})
    await first.log.start()
    try:
        assert first.log.healthy and first.log.malformed == 4
        assert first.drafts(A, [1, 300, 301])[:2] == [302, 303]
        client.xadd(key, {"t": b"??"})                                                # while it tails
        client.xadd(key, {"o": "x", "s": 6, "t": array("i", [400, 401, 402, 403]).tobytes()})
        assert await eventually(lambda: first.drafts(A, [1, 400, 401])[:2] == [402, 403], timeout=3)
        assert first.log.malformed == 5 and all(not t.done() for t in first.log._tasks)
    finally:
        await first.log.close()


async def test_a_full_queue_drops_only_responses_that_were_not_written(prefix):
    """Responses queued past the limit drop the oldest; a write under way must not take newer,
    unwritten ones out of the queue in their place."""
    replica = Replica(SHARED_REDIS, prefix, queue_limit=4)  # not started: the writes are driven here
    try:
        for i in range(4):
            replica.log.publish(A, [10 + i])
        writing = asyncio.create_task(replica.log._flush())
        await asyncio.sleep(0)  # the batch of four is taken, its write awaits the server
        assert replica.log._writing == 4
        for i in range(6):
            replica.log.publish(A, [20 + i])  # the 5th and 6th find the queue full behind the batch
        await writing  # (it goes on to write what is queued behind its batch)
        assert replica.log.dropped == 2 and not replica.log._queue
        client = redis.Redis.from_url(SHARED_REDIS)
        written = [unpack(f[b"t"]) for _, f in client.xrange(replica.log.key_for(A))]
        assert written == [[10], [11], [12], [13], [22], [23], [24], [25]]
    finally:
        await replica.log.close()


async def test_a_reseed_that_fails_half_way_is_done_again(own_redis, monkeypatch):
    url, stop, restart = own_redis
    replica = Replica(url, "qd")
    await replica.log.start()
    try:
        replica.learn(A, [100, 101, 102, 103])
        replica.learn(B, [200, 201, 202, 203])
        assert await replica.log.flush()
        original, calls = ResponseLog._reseed, []

        async def fails_once(self, scope, state):
            calls.append(scope)
            if len(calls) == 1:
                raise redis.ConnectionError("lost again while re-seeding")
            await original(self, scope, state)

        monkeypatch.setattr(ResponseLog, "_reseed", fails_once)
        stop()
        assert await eventually(lambda: not replica.log.healthy)
        restart()  # empty; the first re-seed attempt fails
        assert await eventually(lambda: replica.log.healthy and replica.log.reseeds == 2, timeout=10)
        client = redis.Redis.from_url(url)
        assert client.xlen(replica.log.key_for(A)) == 1 and client.xlen(replica.log.key_for(B)) == 1
    finally:
        await replica.log.close()


async def test_a_snapshot_under_way_when_the_proxy_stops_still_reaches_redis(prefix):
    replica = Replica(SHARED_REDIS, prefix, state_every_s=0.1)
    exporting = asyncio.Event()
    export = replica.export

    def slow_export(scope):
        exporting.set()
        time.sleep(0.5)  # a large table being compressed when the proxy is told to stop
        return export(scope)

    replica.log.export_state = slow_export
    for i in range(10):
        replica.decode(A, [7, 8, 9], [500 + i % 5, 600, 601, 602, 603, 700 + i])
    learned = replica.drafter.calibration(A).dump()
    await replica.log.start()
    try:
        await asyncio.wait_for(exporting.wait(), 3)
    finally:
        await replica.log.close()
    restarted = Replica(SHARED_REDIS, prefix)
    await restarted.log.start()
    try:
        assert restarted.restored == [(A, True)]
        assert restarted.drafter.calibration(A).dump() == learned
    finally:
        await restarted.log.close()
