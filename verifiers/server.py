"""The worker's gRPC server: holds one model, verifies drafts for the proxy.

Model calls run on one dedicated thread so the event loop keeps answering
health checks while a long prefill runs.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from quickdraft.proto import quickdraft_pb2 as pb
from quickdraft.proto import quickdraft_pb2_grpc as pb_grpc
from quickdraft.verifiers.runtime import ModelRuntime, VerifyError, VerifyInput
from quickdraft.verifiers.tree_verify import Sampling

log = logging.getLogger(__name__)

WORKER_SERVICE = "quickdraft.v1.Worker"
MAX_MESSAGE_BYTES = 256 << 20  # tokenizer.json of large vocabularies travels in Info


class WorkerService(pb_grpc.WorkerServicer):
    def __init__(self, runtime: ModelRuntime) -> None:
        self.runtime = runtime
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def Info(self, request, context):
        info = self.runtime.info()
        return pb.WorkerInfoResponse(
            model=info.model,
            context_length=info.context_length,
            vocab_size=info.vocab_size,
            eos_token_ids=list(info.eos_token_ids),
            tokenizer_id=info.tokenizer_id,
            tokenizer_json=info.tokenizer_json,
            device=info.device,
            dtype=info.dtype,
        )

    async def Tokenize(self, request, context):
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        if not messages:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "messages must not be empty")
        try:
            ids = await self._run(self.runtime.tokenize, messages, request.add_generation_prompt)
        except Exception as exc:  # a chat template rejecting the roles, for instance
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"cannot render the messages: {exc}")
        return pb.TokenizeResponse(token_ids=ids)

    async def Verify(self, request, context):
        s = request.sampling
        req = VerifyInput(
            session_key=request.session_key,
            known_len=request.known_len,
            anchor=list(request.anchor),
            new_tokens=list(request.new_tokens),
            draft_tokens=list(request.draft.token_ids),
            draft_parents=list(request.draft.parents),
            sampling=Sampling(temperature=s.temperature, top_p=s.top_p or 1.0, top_k=s.top_k),
            top_logprobs=min(request.top_logprobs, 20),
            seed=request.seed,
        )
        if not req.session_key:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "session_key must not be empty")
        try:
            out = await self._run(self.runtime.verify, req)
        except VerifyError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return pb.VerifyResponse(
            resync_required=out.resync_required,
            tokens=out.tokens,
            accepted_nodes=out.accepted_nodes,
            stats=[
                pb.TokenStats(top_ids=st.top_ids, top_logprobs=st.top_logprobs, entropy=st.entropy)
                for st in out.stats
            ],
            cached_len=out.cached_len,
            computed_tokens=out.computed_tokens,
            forward_ms=out.forward_ms,
        )

    async def Release(self, request, context):
        released = await self._run(self.runtime.release, request.session_key)
        return pb.ReleaseResponse(released=released)


def server_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]


REGISTER_EVERY_S = 5.0


async def _register(proxies: list[str], address: str) -> None:
    """Announce this worker to each proxy, again and again: a restarted proxy finds it within seconds."""
    told: set[str] = set()
    while True:
        for proxy in proxies:
            try:
                async with grpc.aio.insecure_channel(proxy) as channel:
                    await pb_grpc.WorkerRegistryStub(channel).Register(
                        pb.RegisterWorkerRequest(address=address), timeout=5)
                if proxy not in told:
                    log.info("registered with the proxy at %s as %s", proxy, address)
                    told.add(proxy)
            except grpc.aio.AioRpcError as exc:
                if proxy in told or exc.code() != grpc.StatusCode.UNAVAILABLE:
                    log.warning("cannot register with the proxy at %s: %s", proxy, exc.details())
                told.discard(proxy)
        await asyncio.sleep(REGISTER_EVERY_S)


async def serve_worker(runtime: ModelRuntime, host: str, port: int, ready: asyncio.Event | None = None,
                       register_with: list[str] | None = None, advertise: str | None = None) -> None:
    """Serve until cancelled. Health turns SERVING once the model is loaded (it is, by now).

    With ``register_with``, the worker announces itself to those proxies as ``advertise``
    (default: the host and port it listens on)."""
    server = grpc.aio.server(options=server_options())
    pb_grpc.add_WorkerServicer_to_server(WorkerService(runtime), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (pb.DESCRIPTOR.services_by_name["Worker"].full_name, reflection.SERVICE_NAME, "grpc.health.v1.Health"),
        server,
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    await server.start()
    for service in ("", WORKER_SERVICE):
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    log.info("worker %s serving on %s:%d", runtime.info().model, host, bound)
    if ready is not None:
        ready.set()
    registering = None
    if register_with:
        registering = asyncio.create_task(_register(register_with, advertise or f"{host}:{bound}"))
    try:
        await server.wait_for_termination()
    finally:
        if registering is not None:
            registering.cancel()
        await server.stop(grace=2)
