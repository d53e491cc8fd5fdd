"""A small Python client for the DecodeProxy gRPC API."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

from quickdraft.proto import quickdraft_pb2 as pb
from quickdraft.proto import quickdraft_pb2_grpc as pb_grpc
from quickdraft.proto.tls import TlsConfig, aio_channel, sync_channel


@dataclass(slots=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: pb.Usage
    model: str
    session_id: str
    # Measured by the client: wall time and time until the first tokens arrived.
    wall_s: float = 0.0
    ttft_s: float = 0.0
    chunks: list[str] = field(default_factory=list)


def build_request(
    messages: Sequence[dict[str, str]],
    model: str = "auto",
    max_tokens: int | None = None,
    temperature: float = 0.0,
    top_p: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
    session_id: str = "",
    speculate: bool | None = None,
    drafter: str = "",
    max_draft_tokens: int = 0,
    stop: Sequence[str] = (),
) -> pb.GenerateRequest:
    req = pb.GenerateRequest(
        model=model,
        messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages],
        sampling=pb.SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed),
        session_id=session_id,
        speculation=pb.SpeculationOptions(drafter=drafter, max_draft_tokens=max_draft_tokens),
        stop=list(stop),
    )
    if max_tokens is not None:
        req.max_tokens = max_tokens
    if speculate is not None:
        req.speculation.enabled = speculate
    return req


class _Collector:
    """Assembles a streamed completion and times it from the moment it was created."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.ttft = 0.0
        self.chunks: list[str] = []
        self.ids: list[int] = []
        self.last: pb.GenerateChunk | None = None

    def add(self, chunk: pb.GenerateChunk) -> None:
        if chunk.token_ids and not self.ttft:
            self.ttft = time.perf_counter() - self.started
        self.chunks.append(chunk.text)
        self.ids.extend(chunk.token_ids)
        self.last = chunk

    def completion(self) -> Completion:
        last = self.last
        if last is None:
            raise RuntimeError("the stream ended without a final chunk")
        return Completion(
            text="".join(self.chunks), token_ids=self.ids, finish_reason=last.finish_reason, usage=last.usage,
            model=last.model, session_id=last.session_id, wall_s=time.perf_counter() - self.started,
            ttft_s=self.ttft, chunks=self.chunks,
        )


class QuickDraftClient:
    """Synchronous client. ``generate`` streams under the hood so it can time the first token.

    ``tls``: for a proxy that serves TLS, e.g. ``TlsConfig(ca_file="ca.pem")`` (``"system"``: the system's
    roots), with ``cert_file`` and ``key_file`` where it asks for a client certificate."""

    def __init__(self, address: str = "127.0.0.1:50051", api_key: str | None = None,
                 tls: TlsConfig | None = None) -> None:
        self.channel = sync_channel(address, tls)
        self.stub = pb_grpc.DecodeProxyStub(self.channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> QuickDraftClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def list_models(self, timeout: float = 10.0) -> pb.ListModelsResponse:
        return self.stub.ListModels(pb.ListModelsRequest(), metadata=self.metadata, timeout=timeout)

    def stream(
        self, messages: Sequence[dict[str, str]], timeout: float | None = None, **kwargs
    ) -> Iterator[pb.GenerateChunk]:
        yield from self.stub.GenerateStream(build_request(messages, **kwargs), metadata=self.metadata, timeout=timeout)

    def generate(self, messages: Sequence[dict[str, str]], timeout: float | None = None, **kwargs) -> Completion:
        collected = _Collector()
        for chunk in self.stream(messages, timeout=timeout, **kwargs):
            collected.add(chunk)
        return collected.completion()


class AsyncQuickDraftClient:
    """The asyncio counterpart of ``QuickDraftClient`` (grpc.aio), for agents that run many calls at once."""

    def __init__(self, address: str = "127.0.0.1:50051", api_key: str | None = None,
                 tls: TlsConfig | None = None) -> None:
        self.channel = aio_channel(address, tls)
        self.stub = pb_grpc.DecodeProxyStub(self.channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncQuickDraftClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def list_models(self, timeout: float = 10.0) -> pb.ListModelsResponse:
        return await self.stub.ListModels(pb.ListModelsRequest(), metadata=self.metadata, timeout=timeout)

    async def stream(
        self, messages: Sequence[dict[str, str]], timeout: float | None = None, **kwargs
    ) -> AsyncIterator[pb.GenerateChunk]:
        call = self.stub.GenerateStream(build_request(messages, **kwargs), metadata=self.metadata, timeout=timeout)
        async for chunk in call:
            yield chunk

    async def generate(self, messages: Sequence[dict[str, str]], timeout: float | None = None,
                       **kwargs) -> Completion:
        collected = _Collector()
        async for chunk in self.stream(messages, timeout=timeout, **kwargs):
            collected.add(chunk)
        return collected.completion()

