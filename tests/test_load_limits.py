"""Back-pressure under load: bounded queues, RESOURCE_EXHAUSTED with a retry hint, cancellation."""

from __future__ import annotations

import threading
import time

import grpc
from test_worker_failover import worker_with_proxy

from quickdraft.client import QuickDraftClient, build_request

STORY = [{"role": "user", "content": "Tell a long story about a ship, a storm and a lighthouse."}]


def test_a_full_proxy_says_resource_exhausted_and_a_cancelled_request_frees_its_slot(tmp_path):
    env = {"QUICKDRAFT_MAX_CONCURRENT_REQUESTS": "1"}
    with worker_with_proxy(tmp_path, proxy_env=env) as (_, proxy, _procs), QuickDraftClient(proxy) as qd:
        holder = qd.stub.GenerateStream(build_request(STORY, max_tokens=400, session_id="holder"), timeout=60)
        next(holder)  # the one slot is taken
        try:
            qd.generate(STORY, max_tokens=4, session_id="second")
            raise AssertionError("a second request was admitted past the limit")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "retry after" in exc.details()
            assert dict(exc.trailing_metadata()).get("retry-after-s")
        holder.cancel()  # the client goes away mid-generation
        deadline = time.monotonic() + 10
        while True:
            try:
                done = qd.generate(STORY, max_tokens=4, session_id="third")
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
                time.sleep(0.2)
        assert len(done.token_ids) == 4


def test_a_full_worker_queue_pushes_back_through_the_proxy(tmp_path):
    # One step at a time and one waiting: a flood of sessions must be refused, not queued forever.
    with worker_with_proxy(tmp_path, "--max-batch", "1", "--max-queue", "1") as (_, proxy, _procs):
        codes: list[grpc.StatusCode | None] = []

        def one(i: int) -> None:
            with QuickDraftClient(proxy) as qd:
                try:
                    qd.generate(STORY, max_tokens=16, session_id=f"flood-{i}", timeout=120)
                    codes.append(None)
                except grpc.RpcError as exc:
                    codes.append(exc.code())

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(codes) == 8
        assert None in codes and grpc.StatusCode.RESOURCE_EXHAUSTED in codes
        assert set(codes) <= {None, grpc.StatusCode.RESOURCE_EXHAUSTED}
