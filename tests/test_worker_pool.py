"""The proxy's view of its workers: what each serves, where sessions live, and which status a
request gets while workers are still loading."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer

from quickdraft.catalog import load_tokenizer, tokenizer_id
from quickdraft.proto import quickdraft_pb2 as pb
from quickdraft.proxy.errors import InvalidRequest, NoWorker
from quickdraft.proxy.worker_pool import WorkerClient, WorkerPool


class _Answers:
    """A worker's Info answers, one model after another: what a worker at one address says when it
    is restarted with another model (the pool's bookkeeping is what is tested here)."""

    def __init__(self, *infos: pb.WorkerInfoResponse) -> None:
        self.infos = list(infos)

    async def Info(self, request, timeout=None):  # noqa: N802 (the gRPC method's name)
        info = pb.WorkerInfoResponse()
        info.CopyFrom(self.infos[0])
        if len(self.infos) > 1:
            self.infos.pop(0)
        if request.skip_tokenizer:
            info.ClearField("tokenizer_json")
        return info


def _info(model: str, context: int, eos: list[int]) -> pb.WorkerInfoResponse:
    hf = load_tokenizer("smollm2-135m")
    return pb.WorkerInfoResponse(model=model, context_length=context, vocab_size=49152, eos_token_ids=eos,
                                 tokenizer_id=tokenizer_id(hf),
                                 tokenizer_json=hf.backend_tokenizer.to_str().encode())


def _worker(address: str, *infos: pb.WorkerInfoResponse) -> WorkerClient:
    worker = WorkerClient.connect(address)
    worker.stub = _Answers(*infos)
    return worker


async def test_a_worker_restarted_with_another_model_of_the_same_vocabulary_is_seen_as_it():
    worker = _worker("127.0.0.1:1", _info("small-v1", 8192, [2]), _info("small-v2", 32768, [2, 7]))
    pool = WorkerPool([worker])
    await (pool.refresh())
    tokenizer = worker.meta.tokenizer
    assert isinstance(tokenizer, Tokenizer) and pool.model_meta("small-v1").context_length == 8192
    await (pool.refresh())
    meta = pool.model_meta("small-v2")
    assert (meta.context_length, meta.eos_token_ids) == (32768, frozenset({2, 7}))
    assert meta.tokenizer is tokenizer  # the same vocabulary: not fetched again
    with pytest.raises(InvalidRequest, match="valid models: auto, small-v2"):
        pool.model_meta("small-v1")  # nothing serves it any more


async def test_a_model_is_unavailable_not_unknown_while_workers_are_loading():
    loading = WorkerClient.connect("127.0.0.1:1")  # has not answered yet
    pool = WorkerPool([loading])
    with pytest.raises(NoWorker, match="1 worker.* still loading"):
        pool.model_meta("smollm2-135m")
    ready = _worker("127.0.0.1:2", _info("smollm2-135m", 8192, [2]))
    await (ready.refresh())
    pool = WorkerPool([ready])
    with pytest.raises(InvalidRequest, match="unknown model 'nope'; valid models: auto, smollm2-135m"):
        pool.model_meta("nope")


async def test_sessions_stay_on_their_worker_and_are_forgotten_with_the_session():
    workers = [_worker(f"127.0.0.1:{port}", _info("m", 8192, [2])) for port in (1, 2)]
    pool = WorkerPool(workers)
    await (pool.refresh())
    first = pool.pick("m", "tenant\x1fs1")
    first.in_flight += 1  # busy: a new session goes to the other worker ...
    assert pool.pick("m", "tenant\x1fs2") is not first
    assert pool.pick("m", "tenant\x1fs1") is first  # ... while s1 stays where its cache is
    pool.pick("m", "")  # tokenizing holds no cache: nothing is pinned for it
    assert set(pool.placement) == {"tenant\x1fs1", "tenant\x1fs2"}
    pool.forget("tenant\x1fs1")
    assert set(pool.placement) == {"tenant\x1fs2"}


async def test_a_registered_worker_that_stops_answering_is_dropped(monkeypatch):
    """An address that registered and then never answers (a mistyped --advertise, a worker gone for
    good) must not keep the proxy's health down; one given at start stays, as configured."""
    import quickdraft.proxy.worker_pool as worker_pool

    configured = WorkerClient.connect("127.0.0.1:1")
    pool = WorkerPool([configured])
    assert await pool.add("127.0.0.1:2", registered=True)
    monkeypatch.setattr(worker_pool, "REGISTERED_TTL_S", 0.0)
    await pool.refresh()
    assert [w.address for w in pool.workers] == ["127.0.0.1:1"]
    assert await pool.add("127.0.0.1:2", registered=True)  # it may come back by registering again


def test_a_worker_listening_everywhere_must_say_where_the_proxy_reaches_it():
    from typer.testing import CliRunner

    from quickdraft.cli import app

    result = CliRunner().invoke(app, ["worker", "--host", "0.0.0.0", "--register", "proxy:50051"])
    assert result.exit_code == 2 and "--advertise" in result.output


@pytest.mark.parametrize("address", ["0.0.0.0:50061", "[::]:50061", "worker", "worker:port"])
def test_the_proxy_refuses_a_registration_it_could_not_reach(proxy_address, address):
    import grpc

    from quickdraft.proto import quickdraft_pb2_grpc as pb_grpc

    with grpc.insecure_channel(proxy_address) as channel, pytest.raises(grpc.RpcError) as refused:
        pb_grpc.WorkerRegistryStub(channel).Register(pb.RegisterWorkerRequest(address=address), timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "--advertise" in refused.value.details() or "HOST:PORT" in refused.value.details()


async def test_a_proxy_with_a_registration_token_admits_only_workers_that_present_it():
    """A registered worker is sent tenants' prompts: with a token set, a stranger cannot join, and a
    worker given the same token registers through its usual announce loop."""
    import asyncio

    import grpc

    from quickdraft.proto import quickdraft_pb2_grpc as pb_grpc
    from quickdraft.proxy.server import WorkerRegistryService
    from quickdraft.verifiers.server import _register

    class Registry(WorkerRegistryService):
        answered = 0

        async def Register(self, request, context):  # noqa: N802 (the gRPC method's name)
            try:
                return await super().Register(request, context)
            finally:
                Registry.answered += 1

    pool = WorkerPool([])
    server = grpc.aio.server()
    pb_grpc.add_WorkerRegistryServicer_to_server(Registry(pool, token="s3cret"), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    proxy = f"127.0.0.1:{port}"
    tasks: list[asyncio.Task] = []
    try:
        async with grpc.aio.insecure_channel(proxy) as channel:
            stub = pb_grpc.WorkerRegistryStub(channel)
            for metadata in (None, (("authorization", "Bearer guess"),), (("authorization", "s3cret"),)):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.Register(pb.RegisterWorkerRequest(address="127.0.0.1:7"), metadata=metadata,
                                        timeout=10)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "registration_token" in refused.value.details()
        assert pool.workers == []

        tasks = [asyncio.create_task(_register([proxy], "127.0.0.1:8", token="wrong")),
                 asyncio.create_task(_register([proxy], "127.0.0.1:9", token="s3cret"))]
        for _ in range(200):  # both announcements answered (the three direct calls above: 3)
            if Registry.answered >= 5:
                break
            await asyncio.sleep(0.05)
        assert Registry.answered >= 5
        assert [w.address for w in pool.workers] == ["127.0.0.1:9"]
    finally:
        for task in tasks:
            task.cancel()
        await server.stop(None)
        await pool.close()


async def test_without_a_token_registration_stays_open_as_before():
    import grpc

    from quickdraft.proto import quickdraft_pb2_grpc as pb_grpc
    from quickdraft.proxy.server import WorkerRegistryService

    pool = WorkerPool([])
    server = grpc.aio.server()
    pb_grpc.add_WorkerRegistryServicer_to_server(WorkerRegistryService(pool), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = await pb_grpc.WorkerRegistryStub(channel).Register(
                pb.RegisterWorkerRequest(address="127.0.0.1:7"), timeout=10)
        assert reply.added and [w.address for w in pool.workers] == ["127.0.0.1:7"]
    finally:
        await server.stop(None)
        await pool.close()


class _Verifier:
    """A worker's Verify that records what it was sent and holds whatever it was sent."""

    def __init__(self) -> None:
        self.requests: list[pb.VerifyRequest] = []

    async def Verify(self, request, timeout=None):  # noqa: N802 (the gRPC method's name)
        self.requests.append(request)
        held = request.known_len + len(request.new_tokens)
        return pb.VerifyResponse(tokens=[9], cached_len=held + 1)


async def test_a_session_that_moves_worker_sends_its_whole_history_again():
    """worker_len speaks of the worker that last verified the session: on another worker (a failover,
    or a worker that came back) the whole history goes, never only the tail the old worker lacked."""
    from quickdraft.proxy.sessions import Session
    from quickdraft.proxy.speculation import GenerationParams, SpeculationLoop
    from quickdraft.suffix_cache.draft import DraftTree

    a, b = WorkerClient.connect("127.0.0.1:1"), WorkerClient.connect("127.0.0.1:2")
    a.stub, b.stub = _Verifier(), _Verifier()
    session = Session("t", "s", "t/s", history=list(range(10)), worker_len=8, worker_address=a.address)
    loop = SpeculationLoop(WorkerPool([a, b]), None, None, session, GenerationParams("m", 8), frozenset())
    try:
        await loop._verify(a, DraftTree())
        assert (a.stub.requests[-1].known_len, list(a.stub.requests[-1].new_tokens)) == (8, [8, 9])
        session.history.append(9)
        session.worker_len = 10
        await loop._verify(b, DraftTree())  # same length held, but by the other worker
        assert (b.stub.requests[-1].known_len, len(b.stub.requests[-1].new_tokens)) == (0, 11)
        assert session.worker_address == b.address
    finally:
        await WorkerPool([a, b]).close()


def test_a_registration_token_is_trimmed_and_must_travel_as_grpc_metadata():
    from pydantic import ValidationError

    from quickdraft.settings import Settings

    assert Settings(registration_token="s3cret\n").registration_token == "s3cret"  # (read from a file)
    assert Settings(registration_token="  ").registration_token is None
    for bad in ("two words", "clé"):
        with pytest.raises(ValidationError, match="printable ASCII"):
            Settings(registration_token=bad)


async def test_a_worker_that_never_answers_a_step_fails_the_request_by_its_deadline():
    """A hung worker (a real gRPC server whose Verify never returns) costs a request its deadline,
    not forever: with no other worker of the model the client hears UNAVAILABLE and why."""
    import asyncio

    import grpc

    from quickdraft.proto import quickdraft_pb2_grpc as pb_grpc
    from quickdraft.proxy.sessions import Session
    from quickdraft.proxy.speculation import GenerationParams, SpeculationLoop, verify_timeout
    from quickdraft.suffix_cache.draft import DraftTree

    class Hung(pb_grpc.WorkerServicer):
        async def Verify(self, request, context):  # noqa: N802 (the gRPC method's name)
            await asyncio.sleep(3600)

    server = grpc.aio.server()
    pb_grpc.add_WorkerServicer_to_server(Hung(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    worker = WorkerClient.connect(f"127.0.0.1:{port}")
    worker.meta, worker.healthy = _info_meta("m"), True
    pool = WorkerPool([worker])
    session = Session("t", "s", "t/s", history=list(range(300)))
    loop = SpeculationLoop(pool, None, None, session, GenerationParams("m", 8), frozenset(), verify_timeout_s=0.3)
    try:
        started = asyncio.get_running_loop().time()
        with pytest.raises(NoWorker, match=r"did not answer a verification step within its deadline "
                                           r"\(verify_timeout_s=0.3\) and no other worker is available"):
            await loop._verify_anywhere(DraftTree())
        # 0.3 s, plus 10 ms for each of the 300 history tokens it was sent.
        assert verify_timeout(0.3, 300) == pytest.approx(3.3)
        assert 3.2 < asyncio.get_running_loop().time() - started < 20
        assert not worker.healthy and loop.stats.failovers == 1
    finally:
        await server.stop(None)
        await pool.close()


def _info_meta(model: str):
    from quickdraft.proxy.worker_pool import ModelMeta

    hf = load_tokenizer("smollm2-135m")
    return ModelMeta(model, 2048, 49152, frozenset({2}), tokenizer_id(hf), hf.backend_tokenizer)


async def test_a_worker_with_a_registration_token_answers_only_callers_that_present_it():
    """The worker's service behind its token (a real gRPC server with the worker's interceptor); the
    proxy's pool presents its token on every call; health checks need none."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_health.v1.health import aio as health_aio

    from quickdraft.proto import quickdraft_pb2_grpc as pb_grpc
    from quickdraft.verifiers.server import RequireToken

    class Worker(pb_grpc.WorkerServicer):
        async def Info(self, request, context):  # noqa: N802 (the gRPC method's name)
            return _info("m", 2048, [2])

    server = grpc.aio.server(interceptors=[RequireToken("s3cret")])
    pb_grpc.add_WorkerServicer_to_server(Worker(), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    address = f"127.0.0.1:{port}"
    pools = [WorkerPool.from_addresses([address], token=token) for token in (None, "wrong", "s3cret")]
    try:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await pools[0].workers[0].stub.Info(pb.WorkerInfoRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "registration_token" in refused.value.details()
        assert [await pool.workers[0].refresh() for pool in pools] == [False, False, True]
        assert pools[2].models().keys() == {"m"}
        # A worker that registers later is called with the token too.
        assert await pools[2].add(address.replace("127.0.0.1", "localhost"), registered=True)
        assert pools[2].workers[1].healthy
        async with grpc.aio.insecure_channel(address) as channel:
            answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(None)
        for pool in pools:
            await pool.close()
