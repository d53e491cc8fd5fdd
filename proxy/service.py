"""The DecodeProxy service: request validation, tenants, sessions, and the generation stream."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass

import grpc

from quickdraft.proto import quickdraft_pb2 as pb
from quickdraft.proto.auth import bearer_token
from quickdraft.proxy.detokenize import TextStream
from quickdraft.proxy.errors import InvalidRequest, NoWorker, Overloaded, ProxyError, Unauthenticated, WorkerFailed
from quickdraft.proxy.metrics import ProxyMetrics
from quickdraft.proxy.request_log import RequestLog, finished_record
from quickdraft.proxy.sessions import Session, SessionTable
from quickdraft.proxy.speculation import GenerationParams, SpeculationLoop
from quickdraft.proxy.worker_pool import ModelMeta, WorkerPool
from quickdraft.records import RequestRecord
from quickdraft.routing.router import Router
from quickdraft.settings import Settings
from quickdraft.suffix_cache.base import Drafter, Scope, SessionKey, export_states, import_states
from quickdraft.suffix_cache.prior_text import batch_encoder, is_off, load_prior_text
from quickdraft.suffix_cache.redis_log import LogSettings, ResponseLog
from quickdraft.suffix_cache.registry import learners, make_drafters, singles

log = logging.getLogger(__name__)

VALID_ROLES = {"system", "user", "assistant", "tool"}
# Rendering a prompt takes a worker milliseconds, even behind a long pass: a worker that has not
# answered in this long is hung, and another worker is asked.
TOKENIZE_TIMEOUT_S = 60.0


@dataclass(slots=True)
class Prepared:
    tenant: str
    params: GenerationParams
    drafter_name: str
    stop: list[str]
    session_id: str
    messages: list[dict[str, str]]


class Admission:
    """Bounds requests in flight, globally and per tenant."""

    def __init__(self, total: int, per_tenant: int) -> None:
        self.total, self.per_tenant = total, per_tenant
        self.in_flight = 0
        self.by_tenant: Counter[str] = Counter()

    def enter(self, tenant: str) -> None:
        if self.in_flight >= self.total:
            raise Overloaded(f"the proxy is at its limit of {self.total} requests in flight", 1.0)
        if self.by_tenant[tenant] >= self.per_tenant:
            raise Overloaded(f"tenant {tenant!r} has {self.per_tenant} requests in flight (its limit)", 1.0)
        self.in_flight += 1
        self.by_tenant[tenant] += 1

    def leave(self, tenant: str) -> None:
        self.in_flight -= 1
        self.by_tenant[tenant] -= 1


def _log_finished(record: RequestRecord) -> None:
    r = record
    log.info("%s %s: %d+%d tokens in %d steps (%s), first token %.0f ms, total %.0f ms", r.tenant, r.session_id,
             r.prompt_tokens, r.completion_tokens, r.verification_steps, r.drafter, r.ttft_ms, r.total_ms,
             extra={"event": "request_finished", **asdict(r)})


class DecodeProxyService:
    def __init__(self, settings: Settings, pool: WorkerPool) -> None:
        self.settings = settings
        self.pool = pool
        self.router = Router(pool, settings.default_model)
        self.sessions = SessionTable(settings.max_sessions_per_tenant)
        self.drafters: dict[str, Drafter] = make_drafters()
        self._learners = learners(self.drafters)  # the hybrid's members are the single drafters
        # Large tenant indexes are compacted and frozen here, not on the event loop (Drafter.maintain_in).
        self._maintenance = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="drafter-maintenance")
        for drafter in self.drafters.values():
            drafter.maintain_in(self._maintenance)
        self.admission = Admission(settings.max_concurrent_requests, settings.max_concurrent_per_tenant)
        self.metrics = ProxyMetrics()
        for drafter in self._learners:
            if drafter.memory_bytes() is not None:
                self.metrics.drafting_state.labels(drafter.name).set_function(drafter.memory_bytes)
        self.shared_log: ResponseLog | None = None
        if settings.redis_url:
            self.shared_log = ResponseLog(
                LogSettings(settings.redis_url, prefix=settings.redis_prefix, max_tokens=settings.redis_max_tokens),
                apply=self._learn_remote, export_state=self._export_state, import_state=self._import_state,
            )

        self.request_log = RequestLog(settings.database_url) if settings.record_requests else None
        self._priors: dict[str, concurrent.futures.Future[None]] = {}  # by tokenizer id: its prior text loaded

    async def start(self) -> None:
        if self.shared_log is not None:
            await self.shared_log.start()
        if self.request_log is not None:
            await self.request_log.start()

    async def close(self) -> None:
        if self.shared_log is not None:
            await self.shared_log.close()
        if self.request_log is not None:
            await self.request_log.close()
        # Rebuilds not begun are dropped; one under way finishes (seconds) and is never swapped in.
        self._maintenance.shutdown(wait=False, cancel_futures=True)

    def load_prior_texts(self) -> None:
        """Start loading the prior text (``prior_text`` setting) of every model's vocabulary, once each,
        off the event loop. Health reports SERVING, and requests of that vocabulary draft, only once it
        is loaded: a session's drafts do not depend on when it came."""
        if is_off(self.settings.prior_text):
            return
        for meta in self.pool.models().values():
            if meta.tokenizer_id not in self._priors:
                done: concurrent.futures.Future[None] = concurrent.futures.Future()
                self._priors[meta.tokenizer_id] = done
                threading.Thread(target=self._load_prior_text, args=(meta, done), daemon=True,
                                 name=f"prior-text-{meta.name}").start()

    def prior_texts_loaded(self) -> bool:
        return all(done.done() for done in self._priors.values())

    async def _prior_text_of(self, meta: ModelMeta) -> None:
        if meta.tokenizer_id not in self._priors:
            self.load_prior_texts()
        done = self._priors.get(meta.tokenizer_id)
        if done is not None and not done.done():
            await asyncio.wrap_future(done)

    def _load_prior_text(self, meta: ModelMeta, done: concurrent.futures.Future[None]) -> None:
        started = time.perf_counter()
        try:
            prior = load_prior_text(self.settings.prior_text, meta.tokenizer_id, batch_encoder(meta.tokenizer),
                                    max_mb=self.settings.prior_text_max_mb)
            if prior is not None:
                for drafter in self.drafters.values():
                    drafter.use_prior(prior)
                log.info("prior text %r for %s: %d tokens, loaded in %.1f s", prior.source, meta.name,
                         prior.tokens, time.perf_counter() - started)
        except Exception as exc:  # drafting goes on without it: a prior text is never worth a failed request
            log.warning("drafting without prior text for %s: %s", meta.name, exc)
        finally:
            done.set_result(None)

    def _learn_remote(self, scope: Scope, tokens: list[int]) -> None:
        for drafter in self._learners:
            drafter.learn_response(scope, tokens)

    def _export_state(self, scope: Scope) -> dict[str, bytes]:
        # The single drafters' states only: the hybrid's would be its leader's, the suffix drafter's,
        # again. Its stored state (a replay's) still loads into that leader.
        return export_states(singles(self.drafters), scope)

    def _import_state(self, scope: Scope, blobs: dict[str, bytes]) -> None:
        # A composite's stored state is its leader's (a replay's, or an older proxy's): loaded first, so
        # that the single drafter's own, which is what proxies store now, has the last word.
        single = singles(self.drafters)
        blobs = dict(sorted(blobs.items(), key=lambda item: item[0] in single))
        for name in import_states(self.drafters, scope, blobs):
            log.warning("ignored drafter %r's stored state for tenant %r: not of this version", name, scope.tenant)

    # -- request checks --------------------------------------------------------
    def tenant_of(self, metadata: tuple[tuple[str, str], ...] | None) -> str:
        keys = self.settings.api_keys
        token = bearer_token(metadata)
        if not keys:
            return "default"
        if token not in keys:
            raise Unauthenticated("missing or unknown API key: send 'authorization: Bearer KEY'")
        return keys[token]

    def prepare(self, request: pb.GenerateRequest, tenant: str) -> Prepared:
        s = self.settings
        if not request.messages:
            raise InvalidRequest("messages must not be empty: send at least one {role, content} message")
        for i, m in enumerate(request.messages):
            if m.role not in VALID_ROLES:
                raise InvalidRequest(f"messages[{i}].role is {m.role!r}; use one of {sorted(VALID_ROLES)}")
        model = self.router.choose(request.model or "auto")
        if request.HasField("max_tokens"):
            max_tokens = request.max_tokens
            if max_tokens <= 0:
                raise InvalidRequest(f"max_tokens must be positive, got {max_tokens}")
            if max_tokens > s.max_tokens_cap:
                raise InvalidRequest(f"max_tokens is {max_tokens}, above this server's cap of {s.max_tokens_cap}")
        else:
            max_tokens = s.default_max_tokens
        sp = request.sampling
        if not math.isfinite(sp.temperature) or sp.temperature < 0:
            raise InvalidRequest(f"temperature must be a finite number >= 0, got {sp.temperature:g}")
        if not 0 <= sp.top_p <= 1:
            raise InvalidRequest(f"top_p must be in [0, 1], got {sp.top_p:g}")
        if sp.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0, got {sp.top_k}")
        spec = request.speculation
        drafter = spec.drafter or s.default_drafter
        if drafter not in self.drafters:
            raise InvalidRequest(f"unknown drafter {drafter!r}; valid drafters: {', '.join(sorted(self.drafters))}")
        budget = spec.max_draft_tokens or s.max_draft_tokens
        if budget > 64:
            raise InvalidRequest(f"max_draft_tokens is {budget}; at most 64 draft tokens per step are verified")
        params = GenerationParams(
            model=model,
            max_tokens=max_tokens,
            temperature=sp.temperature,
            top_p=sp.top_p or 1.0,
            top_k=sp.top_k,
            seed=sp.seed,
            speculate=spec.enabled if spec.HasField("enabled") else True,
            draft_budget=budget,
            adaptive=s.adaptive_speculation,
        )
        return Prepared(
            tenant=tenant,
            params=params,
            drafter_name=drafter,
            stop=list(request.stop),
            session_id=request.session_id,
            messages=[{"role": m.role, "content": m.content} for m in request.messages],
        )

    async def _prompt_ids(self, prepared: Prepared) -> list[int]:
        """The prompt rendered by the model's own chat template, on any worker of the model: if one
        cannot be reached, or does not answer within TOKENIZE_TIMEOUT_S, the next is asked.
        Tokenizing holds no session, so a failure here moves no session off that worker: the health
        round, or the session's own next step, decides that."""
        request = pb.TokenizeRequest(messages=[
            pb.ChatMessage(role=m["role"], content=m["content"]) for m in prepared.messages
        ], add_generation_prompt=True)
        model = prepared.params.model
        tried: set[str] = set()
        failure: grpc.aio.AioRpcError | None = None
        while True:
            try:
                worker = self.pool.pick(model, "", exclude=tried)
            except NoWorker:
                if failure is None:
                    raise
                raise NoWorker(f"the worker serving {model!r} failed ({failure.code().name}: {failure.details()}) "
                               "and no other worker is available") from failure
            try:
                reply = await worker.stub.Tokenize(request, timeout=TOKENIZE_TIMEOUT_S)
                return list(reply.token_ids)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise InvalidRequest(exc.details() or "cannot render the messages") from exc
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                                      grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
                log.warning("worker %s failed to tokenize (%s); asking another", worker.address, exc.code())
                tried.add(worker.address)
                failure = exc

    # -- generation --------------------------------------------------------------
    async def generate(self, request: pb.GenerateRequest, metadata) -> AsyncIterator[pb.GenerateChunk]:
        started = time.perf_counter()
        tenant = ""
        try:
            tenant = self.tenant_of(metadata)
            prepared = self.prepare(request, tenant)
            self.admission.enter(tenant)
        except ProxyError as exc:
            # Labelled by model only when it names one: a label per string a client sent would grow forever.
            known = request.model in self.pool.models() or request.model == "auto"
            self.metrics.failed(request.model if known else "unknown", exc.code.name.lower())
            self._record_failure(tenant, request.session_id, request.model, request.speculation.drafter,
                                 exc.code.name, started)
            raise
        self.metrics.in_flight.inc()
        outcome = "CANCELLED"  # unless the request finishes or fails below: the caller went away
        try:
            async for chunk in self._generate(prepared, started):
                if chunk.HasField("usage"):
                    outcome = "OK"
                    self.metrics.finished(chunk.usage, chunk.usage.completion_tokens)
                    record = finished_record(tenant, chunk)
                    if self.request_log is not None:
                        self.request_log.add(record)
                    _log_finished(record)
                yield chunk
        except ProxyError as exc:
            outcome = exc.code.name
            self.metrics.failed(prepared.params.model, exc.code.name.lower())
            raise
        except grpc.aio.AioRpcError as exc:  # a worker's error no other worker can mend (e.g. a deadline)
            failed = WorkerFailed.of(exc, prepared.params.model)
            outcome = failed.code.name
            self.metrics.failed(prepared.params.model, outcome.lower())
            raise failed from exc
        except Exception as exc:
            # A defect: the client gets INTERNAL with a message to quote, not gRPC's bare UNKNOWN.
            outcome = "INTERNAL"
            self.metrics.failed(prepared.params.model, "internal")
            log.exception("a request of tenant %r failed", tenant)
            raise ProxyError(f"internal error in the proxy ({type(exc).__name__}: {exc}); "
                             "its log has the traceback") from exc
        finally:
            self.metrics.in_flight.dec()
            self.admission.leave(tenant)
            if outcome != "OK":
                self._record_failure(tenant, prepared.session_id, prepared.params.model, prepared.drafter_name,
                                     outcome, started)

    def _record_failure(self, tenant: str, session_id: str, route: str, drafter: str, status: str,
                        started: float) -> None:
        if self.request_log is not None:
            self.request_log.add(RequestRecord(tenant=tenant, session_id=session_id, route=route or "auto",
                                               drafter=drafter, status=status,
                                               total_ms=(time.perf_counter() - started) * 1e3))

    async def _generate(self, prepared: Prepared, started: float) -> AsyncIterator[pb.GenerateChunk]:
        params = prepared.params
        meta = self.pool.model_meta(params.model)
        prompt = await self._prompt_ids(prepared)
        needed = len(prompt) + params.max_tokens
        if needed > meta.context_length:
            raise InvalidRequest(
                f"{params.model} has a context of {meta.context_length} tokens, but this request needs {needed} "
                f"({len(prompt)} in the messages, {params.max_tokens} in the completion); "
                "shorten the messages or lower max_tokens"
            )
        session, evicted = self.sessions.get_or_create(prepared.tenant, prepared.session_id, prompt)
        async with session.serving():
            for old in evicted:
                self._forget(old)
            session.start_call(prompt)
            await self._prior_text_of(meta)
            drafter = self.drafters[prepared.drafter_name]
            key = SessionKey(Scope(prepared.tenant, meta.tokenizer_id), session.session_id)
            session.tokenizers.add(meta.tokenizer_id)
            drafter.begin_call(key, prompt)
            drafter.set_temperature(key, params.temperature)
            loop = SpeculationLoop(self.pool, drafter, key, session, params, meta.eos_token_ids,
                                   verify_timeout_s=self.settings.verify_timeout_s)
            text = TextStream(meta.tokenizer, prepared.stop)
            produced = 0
            finish = ""
            named = False  # the first chunk names the model and the session
            try:
                async for event in loop.run():
                    delta = text.push(event.tokens)
                    produced += len(event.tokens)
                    finish = event.finish_reason
                    if text.stopped:
                        finish = "stop"
                    if event.tokens or delta:
                        chunk = pb.GenerateChunk(text=delta, token_ids=event.tokens)
                        if not named:
                            chunk.model, chunk.session_id, named = params.model, session.session_id, True
                        yield chunk
                    if text.stopped or event.finished:
                        break
            finally:
                drafter.end_call(key)
                self._share(drafter, key, session.history[len(prompt):])
            tail = text.finish()
            st = loop.stats
            usage = pb.Usage(
                prompt_tokens=len(prompt),
                completion_tokens=produced,
                verification_steps=st.steps,
                accepted_draft_tokens=st.accepted_draft_tokens,
                drafted_tokens=st.drafted_tokens,
                drafter=prepared.drafter_name if params.speculate else "none",
                route=params.model,
                fallbacks=0,
                time_to_first_token_ms=((st.first_token_at or time.perf_counter()) - started) * 1e3,
                total_ms=(time.perf_counter() - started) * 1e3,
                reused_prompt_tokens=max(st.reused_prompt_tokens, 0),
                worker_failovers=st.failovers,
                prefilled_tokens=st.prefilled_tokens,
            )
            yield pb.GenerateChunk(
                text=tail, finish_reason=finish or "stop", usage=usage, model=params.model,
                session_id=session.session_id,
            )

    def _share(self, used: Drafter, key: SessionKey, response: list[int]) -> None:
        """Every drafter learns the response (the one that drafted, and its parts, have already); other
        replicas too."""
        if not response:
            return
        taught = used.parts()
        for drafter in self._learners:
            if drafter not in taught:
                drafter.learn_response(key.scope, response)
        if self.shared_log is not None:
            self.shared_log.publish(key.scope, response)

    def _forget(self, session: Session) -> None:
        self.pool.forget(session.worker_key)
        # Under every vocabulary it drafted in, whether or not a worker still serves that model.
        for drafter in self.drafters.values():
            for tokenizer in session.tokenizers:
                drafter.drop_session(SessionKey(Scope(session.tenant, tokenizer), session.session_id))

    # -- gRPC methods ------------------------------------------------------------
    async def Generate(self, request, context):
        try:
            if isinstance(request, MalformedRequest):
                raise InvalidRequest(request.reason)
            text: list[str] = []
            ids: list[int] = []
            last = None
            async for chunk in self.generate(request, context.invocation_metadata()):
                text.append(chunk.text)
                ids.extend(chunk.token_ids)
                last = chunk
            return pb.GenerateResponse(
                text="".join(text), token_ids=ids, finish_reason=last.finish_reason, usage=last.usage,
                model=last.model, session_id=last.session_id,
            )
        except ProxyError as exc:
            await _abort(context, exc)

    async def GenerateStream(self, request, context):
        try:
            if isinstance(request, MalformedRequest):
                raise InvalidRequest(request.reason)
            async for chunk in self.generate(request, context.invocation_metadata()):
                yield chunk
        except ProxyError as exc:
            await _abort(context, exc)

    async def ListModels(self, request, context):
        models = [
            pb.ModelInfo(name=name, context_length=meta.context_length, tokenizer_id=meta.tokenizer_id,
                         workers=sum(1 for w in self.pool.workers if w.healthy and w.meta and w.meta.name == name))
            for name, meta in sorted(self.pool.models().items())
        ]
        return pb.ListModelsResponse(
            models=models, default_model=self.settings.default_model, drafters=sorted(self.drafters),
            default_drafter=self.settings.default_drafter,
        )


async def _abort(context, exc: ProxyError) -> None:
    if isinstance(exc, Overloaded):
        context.set_trailing_metadata((("retry-after-s", f"{exc.retry_after_s:g}"),))
    await context.abort(exc.code, exc.message)


@dataclass(frozen=True, slots=True)
class MalformedRequest:
    """Stands in for a request whose bytes did not parse, so the servicer can answer INVALID_ARGUMENT."""

    reason: str


def lenient_parser(message_type):
    def parse(data: bytes):
        try:
            return message_type.FromString(data)
        except Exception as exc:  # protobuf's DecodeError and friends
            return MalformedRequest(f"the request is not a valid {message_type.DESCRIPTOR.full_name}: {exc}")

    return parse


def add_to_server(service: DecodeProxyService, server: grpc.aio.Server) -> None:
    """Register the service with a deserializer that turns undecodable bytes into INVALID_ARGUMENT."""
    handlers = {
        "Generate": grpc.unary_unary_rpc_method_handler(
            service.Generate, request_deserializer=lenient_parser(pb.GenerateRequest),
            response_serializer=pb.GenerateResponse.SerializeToString,
        ),
        "GenerateStream": grpc.unary_stream_rpc_method_handler(
            service.GenerateStream, request_deserializer=lenient_parser(pb.GenerateRequest),
            response_serializer=pb.GenerateChunk.SerializeToString,
        ),
        "ListModels": grpc.unary_unary_rpc_method_handler(
            service.ListModels, request_deserializer=pb.ListModelsRequest.FromString,
            response_serializer=pb.ListModelsResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("quickdraft.v1.DecodeProxy", handlers),))
