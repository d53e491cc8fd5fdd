"""Writes a SQL record of every request the proxy answers, off the serving path.

Requests are queued in memory and written in batches from a worker thread, so a
slow or unreachable database never delays a response; while it is unreachable
records wait in a bounded queue (the oldest are dropped past ``queue_limit`` and
counted in ``quickdraft_records_dropped``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque

from quickdraft.proto import quickdraft_pb2 as pb
from quickdraft.records import RecordStore, RequestRecord

log = logging.getLogger(__name__)


def finished_record(tenant: str, chunk: pb.GenerateChunk) -> RequestRecord:
    """The record of a request that finished, from its last chunk (the one with ``usage``)."""
    u = chunk.usage
    return RequestRecord(
        tenant=tenant, session_id=chunk.session_id, route=u.route, drafter=u.drafter, status="OK",
        finish_reason=chunk.finish_reason, prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
        verification_steps=u.verification_steps, drafted_tokens=u.drafted_tokens,
        accepted_draft_tokens=u.accepted_draft_tokens, reused_prompt_tokens=u.reused_prompt_tokens,
        prefilled_tokens=u.prefilled_tokens, worker_failovers=u.worker_failovers,
        ttft_ms=u.time_to_first_token_ms, total_ms=u.total_ms,
    )


class RequestLog:
    def __init__(self, url: str, queue_limit: int = 50_000, interval_s: float = 0.5) -> None:
        self.url = url
        self.store: RecordStore | None = None
        self.queue: deque[RequestRecord] = deque()
        self.queue_limit = queue_limit
        self.interval_s = interval_s
        self.dropped = 0
        self.written = 0
        self.healthy = False
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.to_thread(self._write), timeout=5)
        if self.store is not None:
            self.store.close()

    def add(self, record: RequestRecord) -> None:
        self._put(record)

    def _put(self, record: RequestRecord) -> None:
        if len(self.queue) >= self.queue_limit:
            self.queue.popleft()
            self.dropped += 1
        self.queue.append(record)

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self._write)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database is down or refuses: keep serving, retry later
                if self.healthy or self.store is None:
                    log.warning("request records: cannot write to %s (%s); %d queued, retrying",
                                self.url, exc, len(self.queue))
                self.healthy = False
                await asyncio.sleep(5)
                continue
            await asyncio.sleep(self.interval_s)

    def _write(self) -> None:
        if self.store is None:
            store = RecordStore(self.url)
            store.migrate()
            self.store = store
            log.info("request records go to %s (schema %s)", self.url.split("@")[-1], store.revision())
        self.healthy = True
        while self.queue:
            batch = list(itertools.islice(self.queue, 500))
            self.store.add_requests(batch)
            for _ in batch:
                self.queue.popleft()
            self.written += len(batch)
