"""Failures inside a request reach the client as a gRPC status with a message, are counted, and leave
the session usable: a worker's error that no other worker can mend keeps its own status, and a
defect in the proxy is INTERNAL with the reason, never gRPC's bare UNKNOWN."""

from __future__ import annotations

import re

import grpc
import pytest
from test_prior_text import _service

from quickdraft.proto import quickdraft_pb2 as pb
from quickdraft.proxy.errors import ProxyError, WorkerFailed
from quickdraft.proxy.speculation import SpeculationLoop


async def _run(service, request: pb.GenerateRequest) -> list[pb.GenerateChunk]:
    try:
        return [chunk async for chunk in service.generate(request, ())]
    finally:
        await service.close()


def _failures(service) -> dict[str, float]:
    text = service.metrics.render().decode()
    pattern = r'quickdraft_requests_total\{drafter="",model="smollm2-135m",outcome="(\w+)"\} (\S+)'
    return {m[1]: float(m[2]) for m in re.finditer(pattern, text)}


def _failing_step(make_error):
    async def verify(self, tree):
        raise make_error()  # (made here: grpc's metadata wants the running event loop)
    return verify


REQUEST = pb.GenerateRequest(model="smollm2-135m", session_id="s1", max_tokens=8,
                             messages=[pb.ChatMessage(role="user", content="hi")])


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


@pytest.mark.parametrize(("raised", "code", "words"), [
    (lambda: _rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "the step took too long"),
     grpc.StatusCode.DEADLINE_EXCEEDED, "answered DEADLINE_EXCEEDED: the step took too long"),
    (lambda: _rpc_error(grpc.StatusCode.UNKNOWN, "boom"), grpc.StatusCode.INTERNAL, "answered UNKNOWN: boom"),
    (lambda: RuntimeError("worker asked for a resync twice in a row"),
     grpc.StatusCode.INTERNAL, "internal error in the proxy (RuntimeError: worker asked for a resync twice"),
], ids=["worker-deadline", "worker-unknown", "proxy-defect"])
async def test_a_failed_step_becomes_a_status_with_its_reason(monkeypatch, raised, code, words):
    service, _ = _service("none")
    service.pool.workers[0].healthy = True  # (it is never called: the step fails before it would be)

    async def prompt_ids(prepared):
        return [1, 2, 3, 4]

    monkeypatch.setattr(service, "_prompt_ids", prompt_ids)
    monkeypatch.setattr(SpeculationLoop, "_verify_anywhere", _failing_step(raised))
    with pytest.raises(ProxyError) as caught:
        await _run(service, REQUEST)
    assert caught.value.code == code and words in caught.value.message
    assert isinstance(caught.value, WorkerFailed) == words.startswith("answered")
    assert _failures(service) == {code.name.lower(): 1.0}
    session = service.sessions.get_or_create("default", "s1", [1, 2, 3, 4])[0]
    assert session.users == 1  # only the hold just taken: the failed call gave its own back


class _Tokenizer:
    """A worker's Tokenize: answers, or fails as a worker that died does."""

    def __init__(self, ids: list[int] | None) -> None:
        self.ids, self.calls = ids, 0
        self.error: grpc.StatusCode | None = None

    async def Tokenize(self, request, timeout=None):  # noqa: N802 (the gRPC method's name)
        self.calls += 1
        self.timeout = timeout
        if self.error is not None:
            raise _rpc_error(self.error, "cannot render the messages: a role the template rejects")
        if self.ids is None:
            raise _rpc_error(grpc.StatusCode.UNAVAILABLE, "connection refused")
        return pb.TokenizeResponse(token_ids=self.ids)


async def test_a_worker_that_dies_before_tokenizing_hands_the_prompt_to_another():
    from quickdraft.proxy.errors import InvalidRequest, NoWorker
    from quickdraft.proxy.service import TOKENIZE_TIMEOUT_S
    from quickdraft.proxy.worker_pool import WorkerClient

    service, _ = _service("none")
    first = service.pool.workers[0]
    second = WorkerClient.connect("127.0.0.1:2")
    second.meta = first.meta
    service.pool.workers.append(second)
    for worker, ids in ((first, None), (second, [5, 6, 7])):
        worker.healthy = True
        worker.stub = _Tokenizer(ids)
    prepared = service.prepare(REQUEST, "default")
    try:
        service.pool.placement["t/s"] = first.address  # a session whose KV cache the first one holds
        assert await service._prompt_ids(prepared) == [5, 6, 7]
        assert (first.stub.calls, second.stub.calls) == (1, 1)
        assert first.stub.timeout == second.stub.timeout == TOKENIZE_TIMEOUT_S  # a hung worker is passed over
        # Tokenizing holds no session: one failed call does not move sessions off the worker.
        assert first.healthy and service.pool.placement["t/s"] == first.address
        second.stub.ids = None  # now both fail: UNAVAILABLE, with the worker's reason
        with pytest.raises(NoWorker, match="failed .UNAVAILABLE: connection refused. and no other worker"):
            await service._prompt_ids(prepared)
        first.stub.ids = [8]  # a worker's own refusal of the input is the client's error, not a failover
        first.stub.error = grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(InvalidRequest, match="cannot render"):
            await service._prompt_ids(prepared)
        assert second.stub.calls == 2
    finally:
        await service.close()
        await second.channel.close()
