"""The worker's gRPC server: holds one model, verifies drafts for the proxy.

Model calls run on one dedicated thread (``model_thread``) so the event loop keeps
answering health checks while a long prefill runs; verification steps of many sessions
are batched into shared forward passes (``Batcher``).
"""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from quickdraft.proto import quickdraft_pb2 as pb
from quickdraft.proto import quickdraft_pb2_grpc as pb_grpc
from quickdraft.proto.auth import bearer_metadata, presents
from quickdraft.proto.tls import TlsConfig, add_port, aio_channel
from quickdraft.verifiers.runtime import ModelRuntime, VerifyError, VerifyInput, VerifyOutput
from quickdraft.verifiers.tree_verify import Sampling

log = logging.getLogger(__name__)


def resident_memory_bytes() -> int:
    """This process's resident set size (Linux /proc; 0 where it is not available)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def model_thread() -> ThreadPoolExecutor:
    """The one thread that should run everything a worker's model computes: loading, prefill and
    every verification pass.

    Why one: libgomp (torch's and the kernels' OpenMP) gives each thread that opens a parallel
    region a team of its own, and once a process holds more OpenMP threads than CPUs it stops
    spinning between regions and sleeps at once, so each of the hundreds of parallel regions in a
    pass waits for a futex wake-up. A model loaded on the main thread and run on another took 51-72
    ms a SmolLM2 pass at a 6.5K context on two cores, against 33-37 ms on one thread."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")


WORKER_SERVICE = "quickdraft.v1.Worker"
MAX_MESSAGE_BYTES = 256 << 20  # tokenizer.json of large vocabularies travels in Info


class QueueFull(Exception):
    pass


class Batcher:
    """Continuous batching: steps that arrive while a pass runs join the next pass together.

    Sessions join and leave between passes; a pass takes at most ``max_batch`` steps
    and about ``max_tokens`` positions (a step is never split), the rest wait for the
    next one. At most ``max_queue`` steps wait; beyond that a step is refused, so a
    flooded worker pushes back instead of growing its latency without bound. A step
    whose caller has gone (cancelled, deadline passed) is dropped before it runs.
    """

    def __init__(self, runtime: ModelRuntime, run, max_batch: int = 16, max_tokens: int = 2048,
                 max_queue: int = 256) -> None:
        self.runtime = runtime
        self._run = run
        self.max_batch, self.max_tokens, self.max_queue = max_batch, max_tokens, max_queue
        self._pending: list[tuple[VerifyInput, asyncio.Future]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.passes = 0

    @property
    def depth(self) -> int:
        return len(self._pending)

    async def submit(self, req: VerifyInput) -> tuple[VerifyOutput | VerifyError, int]:
        """The step's result and the queue depth it found."""
        if len(self._pending) >= self.max_queue:
            raise QueueFull(f"{len(self._pending)} verification steps are waiting on this worker (its limit)")
        if self._task is None:
            self._task = asyncio.create_task(self._loop())
        future = asyncio.get_running_loop().create_future()
        depth = len(self._pending)
        self._pending.append((req, future))
        self._wake.set()
        return await future, depth

    def _take(self) -> list[tuple[VerifyInput, asyncio.Future]]:
        batch: list[tuple[VerifyInput, asyncio.Future]] = []
        tokens = 0
        rest = []
        for req, future in self._pending:
            if future.done():  # the caller went away
                continue
            cost = len(req.new_tokens) + len(req.draft_tokens) + 1
            if batch and (len(batch) >= self.max_batch or tokens + cost > self.max_tokens):
                rest.append((req, future))
                continue
            batch.append((req, future))
            tokens += cost
        self._pending = rest
        return batch

    async def _loop(self) -> None:
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
            batch = self._take()
            if not batch:
                continue
            try:
                results = await self._run(self.runtime.verify_batch, [req for req, _ in batch])
            except Exception as exc:  # the model failed as a whole: every step in the pass fails
                log.exception("verification pass failed")
                results = [exc] * len(batch)
            self.passes += 1
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)


class WorkerService(pb_grpc.WorkerServicer):
    def __init__(self, runtime: ModelRuntime, max_batch: int = 16, max_batch_tokens: int = 2048,
                 max_queue: int = 256, thread: ThreadPoolExecutor | None = None) -> None:
        self.runtime = runtime
        # Every pass on one thread: the one the model was loaded on where the caller passes it.
        self._pool = thread if thread is not None else model_thread()
        self.batcher = Batcher(runtime, self._run, max_batch, max_batch_tokens, max_queue)

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
            tokenizer_json=b"" if request.skip_tokenizer else info.tokenizer_json,
            device=info.device,
            dtype=info.dtype,
            resident_memory_bytes=resident_memory_bytes(),
            kv_cache_bytes=self.runtime.sessions.held_bytes,
            sessions=len(self.runtime.sessions),
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
            out, depth = await self.batcher.submit(req)
        except QueueFull as exc:
            context.set_trailing_metadata((("retry-after-s", "0.5"),))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        if isinstance(out, VerifyError):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(out))
        if isinstance(out, Exception):
            await context.abort(grpc.StatusCode.INTERNAL, f"verification failed on the worker: {out}")
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
            batch_size=out.batch_size,
            queue_depth=depth,
            batch_tokens=out.batch_tokens,
        )

    async def Release(self, request, context):
        released = await self._run(self.runtime.release, request.session_key)
        return pb.ReleaseResponse(released=released)


def server_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]


class RequireToken(grpc.aio.ServerInterceptor):
    """With a registration token, the worker's own service answers only callers that present it (the
    proxies): a verification step carries a tenant's whole prompt and its KV cache. Health checks and
    reflection stay open, since they reveal nothing and orchestrators probe them without credentials."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.refuse = grpc.unary_unary_rpc_method_handler(self._refuse)

    @staticmethod
    async def _refuse(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                            "this worker answers only proxies that present its registration token: give the proxy "
                            "the worker's registration_token (QUICKDRAFT_REGISTRATION_TOKEN)")

    async def intercept_service(self, continuation, details):
        if details.method.startswith(f"/{WORKER_SERVICE}/") and not presents(details.invocation_metadata,
                                                                             self.token):
            return self.refuse
        return await continuation(details)


REGISTER_EVERY_S = 5.0


async def _register(proxies: list[str], address: str, token: str | None = None, tls: TlsConfig | None = None) -> None:
    """Announce this worker to each proxy, again and again: a restarted proxy finds it within seconds."""
    told: set[str] = set()
    metadata = (bearer_metadata(token),) if token else None
    while True:
        for proxy in proxies:
            try:
                async with aio_channel(proxy, tls) as channel:
                    await pb_grpc.WorkerRegistryStub(channel).Register(
                        pb.RegisterWorkerRequest(address=address), timeout=5, metadata=metadata)
                if proxy not in told:
                    log.info("registered with the proxy at %s as %s", proxy, address)
                    told.add(proxy)
            except grpc.aio.AioRpcError as exc:
                if proxy in told or exc.code() != grpc.StatusCode.UNAVAILABLE:
                    log.warning("cannot register with the proxy at %s: %s", proxy, exc.details())
                told.discard(proxy)
            except Exception:  # (a bad address, say): keep announcing to the other proxies
                log.exception("cannot register with the proxy at %s", proxy)
                told.discard(proxy)
        await asyncio.sleep(REGISTER_EVERY_S)


async def serve_worker(runtime: ModelRuntime, host: str, port: int, ready: asyncio.Event | None = None,
                       register_with: list[str] | None = None, advertise: str | None = None,
                       max_batch: int = 16, max_batch_tokens: int = 2048, max_queue: int = 256,
                       registration_token: str | None = None, tls: TlsConfig | None = None,
                       thread: ThreadPoolExecutor | None = None) -> None:
    """Serve until cancelled. Health turns SERVING once the model is loaded (it is, by now).
    ``thread``: the ``model_thread()`` the model was loaded on (a new one if None).

    With ``register_with``, the worker announces itself to those proxies as ``advertise``
    (default: the host and port it listens on), presenting ``registration_token`` if given; with
    one, it also answers only callers that present it. ``tls`` (checked) sets how the port is served and how
    the proxies are called."""
    server = grpc.aio.server(options=server_options(),
                             interceptors=[RequireToken(registration_token)] if registration_token else None)
    pb_grpc.add_WorkerServicer_to_server(WorkerService(runtime, max_batch, max_batch_tokens, max_queue, thread),
                                         server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (pb.DESCRIPTOR.services_by_name["Worker"].full_name, reflection.SERVICE_NAME, "grpc.health.v1.Health"),
        server,
    )
    bound = add_port(server, f"{host}:{port}", tls)
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    await server.start()
    for service in ("", WORKER_SERVICE):
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    log.info("worker %s serving on %s:%d, %s", runtime.info().model, host, bound,
             tls.scheme if tls is not None else "plaintext")
    if ready is not None:
        ready.set()
    registering = None
    if register_with and tls is not None and tls.serves and not tls.calls_securely:
        log.warning("this worker serves TLS but registers with %s in plaintext (the registration token "
                    "crosses readable): set tls_ca_file to the proxies' roots", ", ".join(register_with))
    if register_with:
        registering = asyncio.create_task(_register(register_with, advertise or f"{host}:{bound}",
                                                     registration_token, tls))
    try:
        await server.wait_for_termination()
    finally:
        if registering is not None:
            registering.cancel()
        await server.stop(grace=2)
