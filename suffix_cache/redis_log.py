"""Shared, durable drafting state in Redis: an append-only log of responses per scope.

Representation. Every scope (tenant, tokenizer) has one Redis Stream,
``{prefix}:{<tenant>|<tokenizer>}:log``; each entry is one response a replica
learned: its token ids packed as little-endian int32 (``t``), the replica that
produced it (``o``) and that replica's sequence number (``s``). The braces are
a hash tag, so every key of a scope lives in one Redis Cluster slot. The drafters'
in-memory structures (suffix index, n-gram tables) are derived state: a replica
replays the log into them at start and tails it while running, so what any
replica learns drafts for every other within the tail's poll interval, and a
restarted replica starts warm. The hot path never touches Redis: a response is
applied in memory at once and queued; a writer task appends queued responses in
pipelined batches, one command per response.

Learned state the log cannot rebuild (how often a drafter's drafts were accepted:
it comes from drafts against what the target emitted, not from responses alone) is
kept beside it as a snapshot, a hash ``{prefix}:{<tenant>|<tokenizer>}:state`` with
one field per drafter: every replica writes its own every ``state_every_s`` and on
close (the last writer wins), and a starting replica reads it after replaying the
log, so a restarted or added replica also starts with calibrated drafts. A replica
keeps its latest snapshot (about 300 KB per scope after a hundred agent runs:
16-bit floats, compressed) until Redis holds it, and writes it again after Redis
restarts empty, idle tenants' included.

Bounds. Each replica keeps the responses it holds (its own and replayed ones) up
to ``max_tokens`` per scope, oldest evicted first; the stream is trimmed to the
oldest response still held (``XTRIM MINID``) and to ``max_age_s``. Every replica
applies the same rule to the same entries, so the in-memory indexes and Redis
follow one bound without coordinating.

Cluster. The same URL may name a standalone server or any node of a Redis
Cluster; which one it is is asked of the server (``INFO cluster``) on first
contact. In a cluster the client follows slot redirections, writes go through
cluster pipelines (split per node), and the tail reads each slot's streams with
its own non-blocking ``XREAD`` (a multi-key read may not cross slots), polling
every ``cluster_poll_ms`` instead of blocking.

Failures. With Redis unreachable the replica keeps serving from memory, queues
what it learns (bounded), reports itself unhealthy, and retries; when Redis is
back the queue is flushed and the tail resumes. A Redis that comes back empty
(the development machines keep nothing on disk) is noticed by its new run id and
re-seeded from the replicas' memory: one replica takes a short lock and re-appends
the responses it holds that the stream lacks; entries a replica already applied
are recognised by (origin, sequence) and not applied twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import quote, unquote

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from quickdraft.suffix_cache.base import Scope

log = logging.getLogger(__name__)

UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)
_TIMEOUTS = {"socket_timeout": 5, "socket_connect_timeout": 2}


@dataclass(frozen=True, slots=True)
class LogSettings:
    url: str
    prefix: str = "qd"
    max_tokens: int = 4_000_000     # response tokens kept per scope (memory and Redis)
    max_age_s: float = 30 * 86400
    queue_limit: int = 100_000      # responses queued while Redis is unreachable
    block_ms: int = 1000            # longest wait of one XREAD; new entries end it at once
    rescan_s: float = 2.0           # how often other replicas' new scopes are looked for
    cluster_poll_ms: int = 100      # Redis Cluster: interval of the tail's non-blocking reads
    state_every_s: float = 30.0     # how often the drafters' learned state is snapshotted


@dataclass(slots=True)
class _Held:
    origin: str
    seq: int
    tokens: bytes
    stream_id: bytes | None = None  # None until the entry is in Redis


@dataclass(slots=True)
class _ScopeLog:
    key: str
    held: deque[_Held] = field(default_factory=deque)
    held_tokens: int = 0
    last_id: bytes = b"0-0"         # tail position
    applied: set[tuple[str, int]] = field(default_factory=set)
    # This replica's latest snapshot of the drafters' learned state (drafter name -> bytes), kept
    # until Redis holds it: a failed write is retried, and a Redis that restarted empty gets it back
    # even from a tenant that has been idle since (its drafters export only what changed).
    state: dict[str, bytes] = field(default_factory=dict)
    state_saved: bool = True


def pack(tokens: Sequence[int]) -> bytes:
    return array("i", tokens).tobytes()


def unpack(data: bytes) -> list[int]:
    out = array("i")
    out.frombytes(data)
    return out.tolist()


class ResponseLog:
    """One replica's view of the shared response logs."""

    def __init__(self, settings: LogSettings, apply: Callable[[Scope, list[int]], None],
                 replica_id: str | None = None,
                 export_state: Callable[[Scope], dict[str, bytes]] | None = None,
                 import_state: Callable[[Scope, dict[str, bytes]], None] | None = None) -> None:
        self.settings = settings
        self.apply = apply
        self.export_state = export_state
        self.import_state = import_state
        self.replica_id = replica_id or uuid.uuid4().hex[:12]
        self.redis: aioredis.Redis | RedisCluster = aioredis.from_url(settings.url, **_TIMEOUTS)
        self.cluster: bool | None = None  # unknown until the server first answers
        self._connecting = asyncio.Lock()
        self._scopes: dict[Scope, _ScopeLog] = {}
        self._queue: deque[tuple[Scope, _Held]] = deque()
        self._writing = 0  # the queue's first entries, being written now
        self._flushing = False  # a write, or the trim after it, is under way
        self._seq = 0
        self._tasks: list[asyncio.Task] = []
        self._wake = asyncio.Event()
        self.healthy = False
        self._server_run_id: str | None = None
        self._exporting: asyncio.Future | None = None  # the drafters' state export running in a thread
        self.dropped = 0           # responses lost from the queue (limit reached while Redis was down)
        self.malformed = 0         # stream entries skipped: not a response any replica writes
        self.reseeds = 0
        self.applied_remote = 0
        self.states_restored = 0

    # -- keys ----------------------------------------------------------------
    def key_for(self, scope: Scope) -> str:
        return f"{self.settings.prefix}:{{{quote(scope.tenant, safe='')}|{quote(scope.tokenizer, safe='')}}}:log"

    def state_key_for(self, scope: Scope) -> str:
        return self.key_for(scope).removesuffix(":log") + ":state"

    def scope_of(self, key: str) -> Scope | None:
        head = f"{self.settings.prefix}:{{"
        if not (key.startswith(head) and key.endswith("}:log")):
            return None
        tenant, _, tokenizer = key[len(head):-len("}:log")].partition("|")
        return Scope(unquote(tenant), unquote(tokenizer))

    def _scope(self, scope: Scope) -> _ScopeLog:
        state = self._scopes.get(scope)
        if state is None:
            state = self._scopes[scope] = _ScopeLog(self.key_for(scope))
        return state

    # -- life cycle ------------------------------------------------------------
    async def start(self) -> None:
        """Replay every scope's log into memory (if Redis answers), then tail and write in the background."""
        try:
            await self._check_server()
            await self._discover()
            await self._read_new(block_ms=None)
            await self._load_states()
            self.healthy = True
        except UNREACHABLE as exc:
            log.warning("Redis at %s is unreachable (%s): starting cold, will catch up", self.settings.url, exc)
        self._tasks = [asyncio.create_task(self._writer()), asyncio.create_task(self._tail())]
        if self.export_state is not None:
            self._tasks.append(asyncio.create_task(self._snapshots()))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # A blocking XREAD being cancelled can take a while to unwind inside the client; don't wait on it.
            await asyncio.wait(self._tasks, timeout=2)
        if self._exporting is not None and not self._exporting.done():
            # The drafters count a snapshot as exported once they hand it over: it must reach Redis.
            await asyncio.wait({self._exporting}, timeout=5)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._flush(), timeout=5)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._save_states(), timeout=5)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.redis.aclose(), timeout=2)

    async def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued response is in Redis (for tests and orderly shutdown)."""
        deadline = time.monotonic() + timeout
        # Until the trim after the last write is done too: a caller that then reads the streams
        # must find them within their bounds.
        while (self._queue or self._flushing) and time.monotonic() < deadline:
            self._wake.set()
            await asyncio.sleep(0.02)
        return not self._queue and not self._flushing

    # -- learning ----------------------------------------------------------------
    def publish(self, scope: Scope, tokens: Sequence[int]) -> None:
        """A response this replica learned (already applied in memory by the caller)."""
        if not tokens:
            return
        self._seq += 1
        held = _Held(self.replica_id, self._seq, pack(tokens))
        state = self._scope(scope)
        state.applied.add((held.origin, held.seq))
        self._hold(state, held)
        if len(self._queue) - self._writing >= self.settings.queue_limit:
            del self._queue[self._writing]  # the oldest that is not being written
            self.dropped += 1
        self._queue.append((scope, held))
        self._wake.set()

    def _hold(self, state: _ScopeLog, held: _Held) -> None:
        state.held.append(held)
        state.held_tokens += len(held.tokens) // 4
        while state.held_tokens > self.settings.max_tokens and len(state.held) > 1:
            old = state.held.popleft()
            state.held_tokens -= len(old.tokens) // 4
            state.applied.discard((old.origin, old.seq))

    # -- learned state ------------------------------------------------------------
    async def _save_states(self) -> None:
        if self.export_state is None or not self._scopes:
            return
        # Exporting copies and compresses the drafters' tables (about a megabyte each): off the
        # event loop, so a snapshot never stalls the requests it serves.
        scopes = list(self._scopes)
        exporting = asyncio.ensure_future(
            asyncio.to_thread(lambda: [(scope, self.export_state(scope)) for scope in scopes]))
        # Kept by a callback, not by this coroutine: cancelled meanwhile (a stopping proxy), the
        # snapshot still lands in `state` for close() to write.
        exporting.add_done_callback(self._take_exported)
        self._exporting = exporting
        await asyncio.shield(exporting)
        await asyncio.sleep(0)  # (the callback runs first; this only makes the order plain)
        pending = [(scope, held) for scope, held in self._scopes.items() if held.state and not held.state_saved]
        if not pending:
            return
        pipe = self.redis.pipeline(transaction=False)
        written = []
        for scope, held in pending:
            key = self.state_key_for(scope)
            written.append(dict(held.state))
            pipe.hset(key, mapping=written[-1])
            pipe.expire(key, int(self.settings.max_age_s))
        await pipe.execute()
        for (_, held), blobs in zip(pending, written, strict=True):
            # A snapshot taken while this one was being written (a save after a reconnect runs
            # beside the periodic one) is newer than what Redis now holds: it stays unsaved.
            held.state_saved = held.state == blobs

    def _take_exported(self, exporting: asyncio.Future) -> None:
        if exporting.cancelled() or exporting.exception() is not None:
            return  # (the exception reaches the awaiting coroutine, if it still waits)
        for scope, blobs in exporting.result():
            if blobs:
                held = self._scopes[scope]
                held.state.update(blobs)
                held.state_saved = False

    async def _load_states(self) -> None:
        if self.import_state is None:
            return
        for scope in list(self._scopes):
            try:
                raw = await self.redis.hgetall(self.state_key_for(scope))
            except (RedisError, RedisClusterException) as exc:  # e.g. a foreign key of another type
                log.warning("cannot read the learned state of tenant %r: %s", scope.tenant, exc)
                continue
            if raw:
                blobs = {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}
                self.import_state(scope, blobs)
                self._scopes[scope].state.update(blobs)  # to put back should Redis lose it
                self.states_restored += 1
        if self.states_restored:
            log.info("restored the drafters' learned state of %d scope(s) from Redis", self.states_restored)

    async def _snapshots(self) -> None:
        while True:
            await asyncio.sleep(self.settings.state_every_s)
            try:
                if self.healthy:
                    await self._save_states()
            except (*UNREACHABLE, RedisError, RedisClusterException) as exc:
                log.warning("Redis state snapshot failed (%s); next try in %.0f s", exc, self.settings.state_every_s)
            except Exception:  # a drafter's export failed: keep snapshotting the others
                log.exception("snapshotting the drafters' learned state failed; next try in %.0f s",
                              self.settings.state_every_s)

    # -- background tasks --------------------------------------------------------
    async def _writer(self) -> None:
        backoff = 0.1
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                if self.cluster is None:
                    await self._connect()
                await self._flush()
                backoff = 0.1
            except (*UNREACHABLE, RedisError, RedisClusterException) as exc:
                if self.healthy:
                    log.warning("Redis write failed (%s); %d responses queued", exc, len(self._queue))
                self.healthy = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                self._wake.set()

    async def _flush(self) -> None:
        self._flushing = True
        try:
            await self._write_queue()
        finally:
            self._flushing = False

    async def _write_queue(self) -> None:
        while self._queue:
            batch = list(itertools.islice(self._queue, 256))
            pipe = self.redis.pipeline(transaction=False)
            for scope, held in batch:
                pipe.xadd(self.key_for(scope), {"o": held.origin, "s": held.seq, "t": held.tokens})
            # While the batch is written, a full queue drops the oldest response behind it (publish),
            # never one of the batch; what leaves the queue afterwards is exactly what was written.
            self._writing = len(batch)
            try:
                ids = await pipe.execute()
            finally:
                self._writing = 0
            for (_, held), stream_id in zip(batch, ids, strict=True):
                held.stream_id = stream_id
            written = {id(held) for _, held in batch}
            while self._queue and id(self._queue[0][1]) in written:
                self._queue.popleft()
            await self._trim({scope for scope, _ in batch})

    async def _trim(self, scopes: set[Scope]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for scope in scopes:
            state = self._scope(scope)
            oldest = next((h.stream_id for h in state.held if h.stream_id is not None), None)
            if oldest is not None:
                pipe.xtrim(state.key, minid=oldest, approximate=False)
            age_floor = int((time.time() - self.settings.max_age_s) * 1000)
            pipe.xtrim(state.key, minid=f"{age_floor}-0", approximate=False)
        await pipe.execute()

    async def _tail(self) -> None:
        last_scan = 0.0
        while True:
            try:
                if not self.healthy:
                    await self._check_server()
                    log.info("Redis at %s is reachable again", self.settings.url)
                    self.healthy = True
                    self._wake.set()
                if time.monotonic() - last_scan > self.settings.rescan_s:
                    await self._discover()
                    last_scan = time.monotonic()
                await self._read_new(block_ms=self.settings.block_ms)
            except asyncio.CancelledError:
                raise
            except UNREACHABLE:
                self.healthy = False
                await asyncio.sleep(0.5)
            except (RedisError, RedisClusterException) as exc:  # a server-side error: report and keep going
                log.warning("Redis tail error: %s", exc)
                await asyncio.sleep(0.5)
            except Exception:  # anything else must not end the tail: replicas would stop sharing for good
                log.exception("Redis tail error")
                await asyncio.sleep(0.5)

    async def _discover(self) -> None:
        """Find scopes that other replicas created."""
        pattern = f"{self.settings.prefix}:{{*}}:log"
        async for raw in self.redis.scan_iter(match=pattern, count=1000):
            key = raw.decode() if isinstance(raw, bytes) else raw
            scope = self.scope_of(key)
            if scope is not None:
                self._scope(scope)

    async def _connect(self) -> None:
        """Switch to a cluster client if the server at the URL is a Redis Cluster node."""
        async with self._connecting:
            if self.cluster is None:
                await self._detect()

    async def _detect(self) -> None:
        info = await self.redis.info("cluster")
        self.cluster = bool(info.get("cluster_enabled"))
        if self.cluster:
            with contextlib.suppress(Exception):
                await self.redis.aclose()
            self.redis = RedisCluster.from_url(self.settings.url, **_TIMEOUTS)
            await self.redis.initialize()
            log.info("Redis at %s is a cluster of %d primaries", self.settings.url,
                     len(self.redis.get_primaries()))

    async def _server_id(self) -> str:
        """Changes when the server (in a cluster: any primary) restarts."""
        if self.cluster:
            infos = await self.redis.info("server", target_nodes=RedisCluster.PRIMARIES)
            return ",".join(sorted(str(i.get("run_id")) for i in infos.values()))
        return str((await self.redis.info("server")).get("run_id"))

    async def _check_server(self) -> None:
        """After a Redis restart, put back what it lost (it may keep nothing on disk)."""
        if self.cluster is None:
            await self._connect()
        run_id = await self._server_id()
        if self._server_run_id is not None and run_id != self._server_run_id:
            # (A copy: a request that ends meanwhile may add a scope, which publish has queued anyway.)
            for scope, state in list(self._scopes.items()):
                await self._reseed(scope, state)
                state.state_saved = False
            await self._save_states()
        # Only now: if the server fails again half-way, the next check re-seeds what it missed.
        self._server_run_id = run_id

    async def _reseed(self, scope: Scope, state: _ScopeLog) -> None:
        """Re-append the responses this replica holds that the stream lost (one replica at a time)."""
        lock = f"{state.key}:reseed"
        if not await self.redis.set(lock, self.replica_id, nx=True, ex=30) and \
                await self.redis.get(lock) != self.replica_id.encode():
            state.last_id = b"0-0"  # another replica is re-seeding: read the stream again from its start
            return
        present = set()
        for _, fields in await self.redis.xrange(state.key):
            present.add((fields[b"o"].decode(), int(fields[b"s"])))
        queued = {id(h) for _, h in self._queue}
        missing = [h for h in state.held if (h.origin, h.seq) not in present and id(h) not in queued]
        if missing:
            log.warning("Redis lost %d responses of tenant %r (restarted empty?): re-seeding them",
                        len(missing), scope.tenant)
            pipe = self.redis.pipeline(transaction=False)
            for held in missing:
                pipe.xadd(state.key, {"o": held.origin, "s": held.seq, "t": held.tokens})
            for held, stream_id in zip(missing, await pipe.execute(), strict=True):
                held.stream_id = stream_id
            self.reseeds += 1
        state.last_id = b"0-0"

    async def _read_new(self, block_ms: int | None) -> None:
        """Apply new entries of every scope's stream; ``block_ms`` None drains everything (replay)."""
        if not self._scopes:
            if block_ms:
                await asyncio.sleep(block_ms / 1000)
            return
        by_key = {state.key: (scope, state) for scope, state in self._scopes.items()}
        if not self.cluster:
            streams = {state.key: state.last_id for state in self._scopes.values()}
            while True:
                reply = await self.redis.xread(streams, count=1000, block=block_ms)
                if not self._apply_reply(reply, streams, by_key) or block_ms is not None:
                    return  # one blocking read per tail iteration; replay drains everything
        groups: dict[int, dict[str, bytes]] = {}
        for state in self._scopes.values():
            groups.setdefault(key_slot(state.key.encode()), {})[state.key] = state.last_id
        deadline = time.monotonic() + (block_ms or 0) / 1000
        while True:
            replies = await asyncio.gather(*(self.redis.xread(g, count=1000) for g in groups.values()))
            got = [self._apply_reply(reply, g, by_key) for reply, g in zip(replies, groups.values(), strict=True)]
            if any(got):
                if block_ms is not None:
                    return
                continue
            if block_ms is None or time.monotonic() >= deadline:
                return
            await asyncio.sleep(self.settings.cluster_poll_ms / 1000)

    def _apply_reply(self, reply, streams: dict[str, bytes], by_key: dict[str, tuple[Scope, _ScopeLog]]) -> int:
        """Apply one XREAD reply; advances ``streams`` and the scopes' tail positions. Returns entries seen."""
        if not reply:
            return 0
        seen = 0
        for raw_key, entries in reply:
            key = raw_key.decode() if isinstance(raw_key, bytes) else raw_key
            scope, state = by_key[key]
            for stream_id, fields in entries:
                seen += 1
                state.last_id = stream_id
                streams[key] = stream_id
                try:
                    origin, seq, tokens = fields[b"o"].decode(), int(fields[b"s"]), unpack(fields[b"t"])
                    if tokens and min(tokens) < 0:
                        raise ValueError("negative token id")
                except (KeyError, ValueError, UnicodeDecodeError) as exc:
                    self._skip(key, stream_id, exc)
                    continue
                if (origin, seq) in state.applied:
                    for held in state.held:  # our own entry (or a re-seeded copy): note where it is
                        if held.origin == origin and held.seq == seq and held.stream_id is None:
                            held.stream_id = stream_id
                    continue
                try:
                    self.apply(scope, tokens)
                except Exception as exc:  # noqa: BLE001 (e.g. an id beyond the drafters' limits)
                    self._skip(key, stream_id, exc)
                    continue
                state.applied.add((origin, seq))
                self._hold(state, _Held(origin, seq, fields[b"t"], stream_id))
                self.applied_remote += 1
        return seen

    def _skip(self, key: str, stream_id: bytes, reason: Exception) -> None:
        # Written by something else than a replica (or a newer version): skipped, not fatal, so one
        # bad entry can neither stop the tail nor keep a proxy from starting.
        self.malformed += 1
        if self.malformed <= 10 or self.malformed % 1000 == 0:
            log.warning("skipping entry %s of %s (%d skipped so far): %s", stream_id, key, self.malformed, reason)
