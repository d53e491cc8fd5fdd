"""The OpenAI-compatible HTTP endpoint: `/v1/chat/completions` (streaming too) and `/v1/models`.

Requests are mapped onto the same DecodeProxyService that serves gRPC, in the
same process, so both fronts share sessions, drafters, limits and figures.
QuickDraft's figures ride along in ``usage`` beside OpenAI's (``verification_steps``,
``accepted_draft_tokens``, ``route``, ``fallbacks``, ...). Errors are HTTP statuses
with OpenAI-style bodies (``{"error": {"message", "type", "param", "code"}}``).
The session is the ``X-Session-Id`` header when given, else the tenant's session
whose history the prompt extends (OpenAI clients send no session id).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from quickdraft.proto import quickdraft_pb2 as pb
from quickdraft.proto.messages import tool_call_text
from quickdraft.proto.tls import RECHECK_S, TlsConfig
from quickdraft.proxy.errors import InvalidRequest, Overloaded, ProxyError
from quickdraft.proxy.service import DecodeProxyService

log = logging.getLogger(__name__)

STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
}


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        content = self._content_text()
        calls = self._tool_calls_text()
        return f"{content}\n{calls}" if content and calls else content or calls

    def _content_text(self) -> str:
        if isinstance(self.content, list):  # content parts: only text is understood
            parts = []
            for part in self.content:
                if part.get("type") != "text":
                    raise InvalidRequest(f"message content part of type {part.get('type')!r} is not supported; "
                                         "send text")
                parts.append(str(part.get("text", "")))
            return "".join(parts)
        return self.content or ""

    def _tool_calls_text(self) -> str:
        """An assistant turn's earlier tool calls, written into its text: dropping them would show
        the model a turn that said nothing before the tool results that follow it."""
        calls = (self.model_extra or {}).get("tool_calls")
        if self.role != "assistant" or not calls:
            return ""
        if not isinstance(calls, list):
            raise InvalidRequest("an assistant message's tool_calls must be a list")
        out = []
        for call in calls:
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not function.get("name"):
                raise InvalidRequest("an assistant message's tool_calls must each carry function.name")
            out.append(tool_call_text(function["name"], function.get("arguments", "{}")))
        return "\n".join(out)


class StreamOptions(BaseModel):
    include_usage: bool = False


INT32_MIN, INT32_MAX, UINT32_MAX, UINT64_MAX = -(2**31), 2**31 - 1, 2**32 - 1, 2**64 - 1


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = "auto"
    messages: list[ChatMessageIn]
    # Bounds of the protobuf fields these travel in (int32, uint64), so an out-of-range number is a 400.
    max_tokens: int | None = Field(None, ge=INT32_MIN, le=INT32_MAX)
    max_completion_tokens: int | None = Field(None, ge=INT32_MIN, le=INT32_MAX)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = Field(None, ge=INT32_MIN, le=INT32_MAX)
    seed: int | None = Field(None, ge=0, le=UINT64_MAX)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    response_format: dict[str, Any] | None = None
    # QuickDraft's own knobs, accepted as extra body fields (`extra_body` in the openai client).
    drafter: str | None = None
    speculate: bool | None = None
    max_draft_tokens: int | None = Field(None, ge=0, le=UINT32_MAX)


# OpenAI's newer name for the system role (the openai client sends it for reasoning models).
ROLE_ALIASES = {"developer": "system"}


def _refuse_what_would_be_ignored(body: ChatCompletionRequest) -> None:
    """Options that would change the answer if honoured: a 400 that says so, rather than an answer
    that silently differs from what the client asked for."""
    extra = body.model_extra or {}
    if (extra.get("tools") or extra.get("functions")) and extra.get("tool_choice") != "none":
        raise InvalidRequest("tools are not supported yet: the answer is text only. Describe the tools in a "
                             "message and parse the calls from the text, or send tool_choice='none'")
    if extra.get("logprobs"):
        raise InvalidRequest("logprobs are not supported yet; leave logprobs unset or false")
    if extra.get("logit_bias"):
        raise InvalidRequest("logit_bias is not supported yet")
    for name in ("presence_penalty", "frequency_penalty"):
        if extra.get(name):
            raise InvalidRequest(f"{name} is not supported yet; send 0 or leave it out")


def to_grpc(body: ChatCompletionRequest, session_id: str) -> pb.GenerateRequest:
    if body.n != 1:
        raise InvalidRequest(f"n is {body.n}; only n=1 is supported")
    _refuse_what_would_be_ignored(body)
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise InvalidRequest(f"response_format type {body.response_format.get('type')!r} is not supported yet; "
                             "use 'text'")
    req = pb.GenerateRequest(
        model=body.model,
        messages=[pb.ChatMessage(role=ROLE_ALIASES.get(m.role, m.role), content=m.text()) for m in body.messages],
        sampling=pb.SamplingParams(temperature=body.temperature or 0.0, top_p=body.top_p or 0.0,
                                   top_k=body.top_k or 0, seed=body.seed or 0),
        session_id=session_id,
        speculation=pb.SpeculationOptions(drafter=body.drafter or "", max_draft_tokens=body.max_draft_tokens or 0),
        stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
    )
    limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if limit is not None:
        req.max_tokens = limit
    if body.speculate is not None:
        req.speculation.enabled = body.speculate
    return req


def usage_json(u: pb.Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.reused_prompt_tokens},
        "verification_steps": u.verification_steps,
        "accepted_draft_tokens": u.accepted_draft_tokens,
        "drafted_tokens": u.drafted_tokens,
        "drafter": u.drafter,
        "route": u.route,
        "fallbacks": u.fallbacks,
        "worker_failovers": u.worker_failovers,
        "time_to_first_token_ms": round(u.time_to_first_token_ms, 1),
    }


def error_response(status: int, kind: str, message: str, code: str | None = None,
                   headers: dict[str, str] | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def proxy_error_response(exc: ProxyError) -> JSONResponse:
    status, kind = STATUS.get(exc.code, (500, "server_error"))
    headers = {"Retry-After": f"{max(1, round(exc.retry_after_s))}"} if isinstance(exc, Overloaded) else None
    return error_response(status, kind, exc.message, exc.code.name.lower(), headers)


def build_app(service: DecodeProxyService) -> FastAPI:
    app = FastAPI(title="QuickDraft", description="OpenAI-compatible endpoint of the QuickDraft decoding proxy")

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(400, "invalid_request_error", f"{where or 'body'}: {first.get('msg', 'invalid')}",
                              "invalid_argument", param=where or None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        # Unknown paths and wrong methods: the same error shape as everything else.
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return error_response(exc.status_code, kind, message, str(exc.status_code), dict(exc.headers or {}) or None)

    @app.exception_handler(ProxyError)
    async def proxy_error(request: Request, exc: ProxyError) -> JSONResponse:
        return proxy_error_response(exc)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def model_card(name: str, created: int) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": "quickdraft"}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        service.tenant_of(_metadata(request))
        created = int(time.time())
        return {"object": "list",
                "data": [model_card(n, created) for n in service.pool.model_names()]}

    @app.get("/v1/models/{name}")
    async def model(name: str, request: Request) -> JSONResponse:
        service.tenant_of(_metadata(request))
        names = service.pool.model_names()
        if name not in names:
            return error_response(404, "not_found_error", f"model {name!r} does not exist; models: {', '.join(names)}",
                                  "model_not_found", param="model")
        return JSONResponse(model_card(name, int(time.time())))

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        metadata = _metadata(request)
        grpc_request = to_grpc(body, request.headers.get("x-session-id", ""))
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        chunks = service.generate(grpc_request, metadata)
        if body.stream:
            # Pull the first chunk here so that errors before any output are proper HTTP statuses.
            try:
                first = await anext(chunks)
            except ProxyError as exc:
                return proxy_error_response(exc)
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_sse(first, chunks, completion_id, created, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Session-Id": first.session_id})
        text: list[str] = []
        whole = asyncio.ensure_future(_collect(chunks, text))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            # A client that gives up (its timeout) must not leave the generation running: it holds the
            # session and an admission slot, and the client's retry would queue behind it.
            await asyncio.wait({whole, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not whole.done():
                whole.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await whole
        if not whole.done() or whole.cancelled():
            return Response(status_code=499)  # (nobody reads it: the client is gone)
        last = whole.result()
        return JSONResponse({
            "id": completion_id, "object": "chat.completion", "created": created, "model": last.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                         "finish_reason": last.finish_reason, "logprobs": None}],
            "usage": usage_json(last.usage),
            "session_id": last.session_id,
        }, headers={"X-Session-Id": last.session_id})

    return app


async def _collect(chunks: AsyncIterator[pb.GenerateChunk], text: list[str]) -> pb.GenerateChunk:
    last = None
    async for chunk in chunks:
        text.append(chunk.text)
        last = chunk
    assert last is not None
    return last


async def _disconnected(request: Request) -> None:
    """Returns once the client has closed the connection (the body was read already, so the next
    ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _metadata(request: Request) -> tuple[tuple[str, str], ...]:
    auth = request.headers.get("authorization")
    return (("authorization", auth),) if auth else ()


async def _sse(first: pb.GenerateChunk, rest: AsyncIterator[pb.GenerateChunk], completion_id: str, created: int,
               include_usage: bool) -> AsyncIterator[str]:
    def event(payload: dict[str, Any]) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    def chunk_json(model: str, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

    model = first.model
    yield event(chunk_json(model, {"role": "assistant", "content": ""}, None))
    chunk = first
    try:
        while True:
            if chunk.model:
                model = chunk.model
            if chunk.text:
                yield event(chunk_json(model, {"content": chunk.text}, None))
            if chunk.finish_reason:
                yield event(chunk_json(model, {}, chunk.finish_reason))
                if include_usage:
                    yield event({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                                 "model": model, "choices": [], "usage": usage_json(chunk.usage)})
                break
            chunk = await anext(rest)
    except ProxyError as exc:  # after output has started, the error travels in the stream
        _, kind = STATUS.get(exc.code, (500, "server_error"))
        yield event({"error": {"message": exc.message, "type": kind, "param": None, "code": exc.code.name.lower()}})
    yield "data: [DONE]\n\n"


async def serve_http(service: DecodeProxyService, host: str, port: int, tls: TlsConfig | None = None) -> None:
    """Serve the endpoint until cancelled (uvicorn in the proxy's own event loop); HTTPS where ``tls`` serves,
    asking callers for certificates where it names client roots, as the gRPC port does."""
    import uvicorn

    class EmbeddedServer(uvicorn.Server):
        # The proxy process owns SIGINT/SIGTERM (stopping gRPC and HTTP together); uvicorn
        # must not capture them and re-raise them into a half-stopped event loop.
        def capture_signals(self):
            return contextlib.nullcontext()

    https = {}
    if tls is not None and tls.serves:
        https = {"ssl_certfile": tls.cert_file, "ssl_keyfile": tls.key_file}
        if tls.client_ca_file:
            https |= {"ssl_ca_certs": tls.client_ca_file, "ssl_cert_reqs": ssl.CERT_REQUIRED}
    config = uvicorn.Config(build_app(service), host=host, port=port, log_level="warning", access_log=False,
                            lifespan="off", **https)
    server = EmbeddedServer(config)
    following = None
    if https:
        config.load()  # its SSL context exists from here on, for new certificates to go into
        following = asyncio.create_task(_follow_rotation(config.ssl, tls))
    try:
        await server.serve()
    except SystemExit as exc:  # uvicorn exits when it cannot bind
        raise OSError(f"cannot serve HTTP on {host}:{port} (in use?); set --http-port, or 0 to turn it off") \
            from exc
    finally:
        if following is not None:
            following.cancel()


async def _follow_rotation(context: ssl.SSLContext, tls: TlsConfig) -> None:
    """Put rotated certificates into the HTTPS port's context: handshakes from then on serve them.

    (New client roots join the old ones rather than replace them: dropping a root needs a restart.)"""
    seen = tls.version
    while True:
        await asyncio.sleep(RECHECK_S)
        version = tls.version  # (a look at the files, at most once a second; the new ones already checked)
        if version == seen:
            continue
        seen = version
        try:
            # Into a scratch context first: a pair that fails half-way must not leave the live one with a
            # new certificate beside the old key.
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(tls.cert_file, tls.key_file)
            context.load_cert_chain(tls.cert_file, tls.key_file)
            if tls.client_ca_file:
                context.load_verify_locations(tls.client_ca_file)
            log.info("HTTPS port: serving the changed TLS files")
        except (OSError, ssl.SSLError) as exc:  # changed again since they were checked: the next look takes them
            log.warning("HTTPS port: cannot take the changed TLS files yet: %s", exc)

