"""The proxy's view of its workers: connections, model metadata, session placement."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Collection
from dataclasses import dataclass, field

import grpc
from tokenizers import Tokenizer

from quickdraft.proto import quickdraft_pb2 as pb
from quickdraft.proto import quickdraft_pb2_grpc as pb_grpc
from quickdraft.proto.auth import bearer_metadata
from quickdraft.proto.tls import TlsConfig, aio_channel
from quickdraft.proxy.errors import InvalidRequest, NoWorker
from quickdraft.proxy.goodput import Load, PassCost, StepOverhead

log = logging.getLogger(__name__)

UNSPECIFIED_HOSTS = {"0.0.0.0", "::", ""}
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}

# A worker that registered itself and then stops answering for this long is dropped (it registers
# again every few seconds while it runs): an address that never answers must not hold health down.
REGISTERED_TTL_S = 60.0
# How long a channel replaced after a TLS rotation stays open for the calls already on it.
ROTATED_CHANNEL_GRACE_S = 60.0

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 256 << 20),
    ("grpc.max_receive_message_length", 256 << 20),
]


def is_unspecified(host: str) -> bool:
    """A host that names where a server listens (every interface), not where it can be reached."""
    return host.strip("[]") in UNSPECIFIED_HOSTS


def is_loopback(host: str) -> bool:
    """Whether a host names this machine's loopback interface."""
    return host.strip("[]") in LOOPBACK_HOSTS


@dataclass(slots=True)
class ModelMeta:
    name: str
    context_length: int
    vocab_size: int
    eos_token_ids: frozenset[int]
    tokenizer_id: str
    tokenizer: Tokenizer


@dataclass(frozen=True, slots=True)
class WorkerMemory:
    resident_bytes: int
    kv_cache_bytes: int
    sessions: int


class _PresentToken(grpc.aio.UnaryUnaryClientInterceptor):
    """Sends the proxy's registration token with every call: a worker that has one refuses calls without it."""

    def __init__(self, token: str) -> None:
        self.header = bearer_metadata(token)

    async def intercept_unary_unary(self, continuation, details, request):
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self.header)
        return await continuation(details._replace(metadata=metadata), request)


@dataclass(eq=False)
class WorkerClient:
    address: str
    channel: grpc.aio.Channel
    stub: pb_grpc.WorkerStub
    meta: ModelMeta | None = None
    healthy: bool = False
    in_flight: int = 0
    cost: PassCost = field(default_factory=PassCost)   # its pass time by positions scored
    load: Load = field(default_factory=Load)           # what its last pass looked like
    overhead: StepOverhead = field(default_factory=StepOverhead)  # a step's cost beyond its pass
    memory: WorkerMemory | None = None                 # as of its last health check
    registered: bool = False       # joined by registering (not given to the proxy at start)
    answered_at: float = field(default_factory=time.monotonic)  # its last answer (or when it joined)
    token: str | None = None       # presented on every call
    tls: TlsConfig | None = None   # how it is called, where that is TLS (None: plaintext)
    tls_version: int = 0           # of the TLS files its channel was opened with

    @staticmethod
    def _open(address: str, token: str | None, tls: TlsConfig | None) -> grpc.aio.Channel:
        return aio_channel(address, tls, options=CHANNEL_OPTIONS,
                           interceptors=[_PresentToken(token)] if token else None)

    @classmethod
    def connect(cls, address: str, token: str | None = None, tls: TlsConfig | None = None) -> WorkerClient:
        tls = tls if tls is not None and tls.calls_securely else None  # (a config that calls in plaintext)
        channel = cls._open(address, token, tls)
        return cls(address, channel, pb_grpc.WorkerStub(channel), token=token, tls=tls,
                   tls_version=tls.version if tls is not None else 0)

    def reopen_if_rotated(self) -> grpc.aio.Channel | None:
        """Once the TLS files changed on disk, calls from now on go through a new channel (the new client
        certificate and roots); returns the old channel, for the caller to close when its calls are done."""
        version = self.tls.version if self.tls is not None else 0
        if version == self.tls_version:
            return None
        old, self.tls_version = self.channel, version
        self.channel = self._open(self.address, self.token, self.tls)
        self.stub = pb_grpc.WorkerStub(self.channel)
        log.info("worker %s: TLS files changed, calling it through a new channel", self.address)
        return old

    async def refresh(self, timeout: float = 5.0) -> bool:
        try:
            info = await self.stub.Info(pb.WorkerInfoRequest(skip_tokenizer=self.meta is not None), timeout=timeout)
        except grpc.aio.AioRpcError:
            self.healthy = False
            return False
        self.answered_at = time.monotonic()
        if self.meta is not None and self.meta.tokenizer_id != info.tokenizer_id:
            # The worker restarted with another model: ask again with its tokenizer.
            self.meta = None
            return await self.refresh(timeout)
        self.memory = WorkerMemory(info.resident_memory_bytes, info.kv_cache_bytes, info.sessions)
        if self.meta is not None and (self.meta.name, self.meta.context_length, self.meta.eos_token_ids,
                                      self.meta.vocab_size) != (info.model, info.context_length,
                                                                frozenset(info.eos_token_ids), info.vocab_size):
            # Restarted with another model of the same vocabulary: the same tokenizer, new everything else.
            log.info("worker %s now serves %s (was %s)", self.address, info.model, self.meta.name)
            self.meta = dataclasses.replace(self.meta, name=info.model, context_length=info.context_length,
                                            vocab_size=info.vocab_size, eos_token_ids=frozenset(info.eos_token_ids))
        if self.meta is None:
            self.meta = ModelMeta(
                name=info.model,
                context_length=info.context_length,
                vocab_size=info.vocab_size,
                eos_token_ids=frozenset(info.eos_token_ids),
                tokenizer_id=info.tokenizer_id,
                tokenizer=Tokenizer.from_str(info.tokenizer_json.decode()),
            )
        self.healthy = True
        return True


@dataclass
class WorkerPool:
    workers: list[WorkerClient] = field(default_factory=list)
    # session key -> address of the worker holding its KV cache
    placement: dict[str, str] = field(default_factory=dict)
    token: str | None = None      # the registration token, presented on every call to a worker
    tls: TlsConfig | None = None  # how workers are called (plaintext without)
    # Channels a TLS rotation replaced, each closing once its calls are done.
    _retired: dict[grpc.aio.Channel, asyncio.Task] = field(default_factory=dict, repr=False)

    @classmethod
    def from_addresses(cls, addresses: list[str], token: str | None = None, tls: TlsConfig | None = None,
                       plaintext: Collection[str] = ()) -> WorkerPool:
        """The pool of configured workers; those in ``plaintext`` are called without TLS."""
        return cls([WorkerClient.connect(a, token, None if a in plaintext else tls) for a in addresses],
                   token=token, tls=tls)

    async def refresh(self) -> None:
        for w in self.workers:
            old = w.reopen_if_rotated()
            if old is not None:  # the calls still on it finish there (a step takes seconds at most)
                self._retired[old] = asyncio.create_task(self._retire(old))
        await asyncio.gather(*(w.refresh() for w in self.workers))
        now = time.monotonic()
        for gone in [w for w in self.workers if w.registered and now - w.answered_at > REGISTERED_TTL_S]:
            log.warning("worker %s registered but has not answered for %.0f s: dropped until it registers again",
                        gone.address, now - gone.answered_at)
            self.workers.remove(gone)
            self.mark_down(gone)
            await gone.channel.close()

    async def _retire(self, channel: grpc.aio.Channel) -> None:
        try:
            await channel.close(grace=ROTATED_CHANNEL_GRACE_S)
        finally:
            self._retired.pop(channel, None)

    async def add(self, address: str, registered: bool = False) -> bool:
        """A worker that registered itself; False if it was already known. It serves once it answers Info."""
        if any(w.address == address for w in self.workers):
            return False
        worker = WorkerClient.connect(address, self.token, self.tls)
        worker.registered = registered
        self.workers.append(worker)
        if await worker.refresh():
            log.info("worker %s registered (%s)", address, worker.meta.name if worker.meta else "?")
        else:
            log.warning("worker %s registered but does not answer yet", address)
        return True

    def ready(self) -> bool:
        """Every known worker has loaded its model once, and at least one serves now."""
        return bool(self.workers) and all(w.meta is not None for w in self.workers) and \
            any(w.healthy for w in self.workers)

    async def wait_ready(self, timeout: float) -> bool:
        """Wait until every worker answers (models loaded)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            await self.refresh()
            if self.workers and all(w.healthy for w in self.workers):
                return True
            if asyncio.get_running_loop().time() > deadline:
                return False
            await asyncio.sleep(0.5)

    def models(self) -> dict[str, ModelMeta]:
        return {w.meta.name: w.meta for w in self.workers if w.meta is not None}

    def model_names(self) -> list[str]:
        """What a request may name: ``auto`` and each model a worker serves."""
        return ["auto", *sorted(self.models())]

    def model_meta(self, model: str) -> ModelMeta:
        metas = self.models()
        if model not in metas:
            loading = sum(1 for w in self.workers if w.meta is None)
            if loading:  # it may be theirs: not the caller's mistake yet
                raise NoWorker(f"model {model!r} is not being served yet: {loading} worker(s) are still loading "
                               "their model; try again shortly")
            valid = ", ".join(self.model_names())
            raise InvalidRequest(f"unknown model {model!r}; valid models: {valid}")
        return metas[model]

    def pick(self, model: str, session_key: str, exclude: set[str] | None = None) -> WorkerClient:
        """The worker holding the session's KV cache if it can serve, else the least busy one."""
        exclude = exclude or set()
        candidates = [
            w for w in self.workers
            if w.healthy and w.meta is not None and w.meta.name == model and w.address not in exclude
        ]
        if not candidates:
            raise NoWorker(f"no worker is serving model {model!r} right now; try again shortly")
        placed = self.placement.get(session_key)
        for w in candidates:
            if w.address == placed:
                return w
        worker = min(candidates, key=lambda w: w.in_flight)
        if session_key:  # (no key: a request that holds no cache, such as tokenizing, is not pinned)
            self.placement[session_key] = worker.address
        return worker

    def forget(self, session_key: str) -> None:
        """The session is gone from the proxy: its placement goes too."""
        self.placement.pop(session_key, None)

    def mark_down(self, worker: WorkerClient) -> None:
        worker.healthy = False
        for key, address in list(self.placement.items()):
            if address == worker.address:
                del self.placement[key]

    async def close(self) -> None:
        channels = [w.channel for w in self.workers] + list(self._retired)
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)
