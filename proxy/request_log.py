"""Writes a SQL record of every request the proxy answers, off the serving path.

Requests are queued in memory and written in batches from a worker thread, so a
slow or unreachable database never delays a response; while it is unreachable
records wait in a bounded queue (the oldest are dropped past ``queue_limit`` and
counted in ``quickdraft_records_dropped_total``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque

from quickdraft.proto import quickdraft_pb2 as pb
from quickdraft.records import RecordStore, RequestRecord

log = logging.getLogger(__name__)


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

    def finished(self, tenant: str, session_id: str, usage: pb.Usage, finish_reason: str) -> None:
        self._put(RequestRecord(
            tenant=tenant, session_id=session_id, route=usage.route, drafter=usage.drafter, status="OK",
            finish_reason=finish_reason, prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens, verification_steps=usage.verification_steps,
            drafted_tokens=usage.drafted_tokens, accepted_draft_tokens=usage.accepted_draft_tokens,
            reused_prompt_tokens=usage.reused_prompt_tokens, prefilled_tokens=usage.prefilled_tokens,
            worker_failovers=usage.worker_failovers, ttft_ms=usage.time_to_first_token_ms,
            total_ms=usage.total_ms,
        ))

    def failed(self, tenant: str, session_id: str, route: str, drafter: str, status: str, total_ms: float) -> None:
        self._put(RequestRecord(tenant=tenant, session_id=session_id, route=route, drafter=drafter, status=status,
                                total_ms=total_ms))

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
            batch = list(self.queue)[:500]
            self.store.add_requests(batch)
            for _ in batch:
                self.queue.popleft()
            self.written += len(batch)
