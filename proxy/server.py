"""The proxy's gRPC server: DecodeProxy, standard health checking and reflection."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import Collection

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from quickdraft.proto import quickdraft_pb2 as pb
from quickdraft.proto import quickdraft_pb2_grpc as pb_grpc
from quickdraft.proto.auth import presents
from quickdraft.proto.tls import TlsConfig, add_port
from quickdraft.proxy.service import DecodeProxyService, add_to_server
from quickdraft.proxy.worker_pool import WorkerPool, is_loopback, is_unspecified
from quickdraft.settings import Settings

log = logging.getLogger(__name__)


PROXY_SERVICE = "quickdraft.v1.DecodeProxy"
# Reports whether the shared drafting state (Redis) is reachable; the proxy serves either way.
SHARED_STATE_SERVICE = "quickdraft.v1.SharedState"
HEALTH_INTERVAL_S = 2.0


async def _watch_workers(service: DecodeProxyService, pool: WorkerPool, health: health_aio.HealthServicer) -> None:
    """Keep health in step with the workers: SERVING once every configured worker is up."""
    status = None
    shared = None
    while True:
        try:
            status, shared = await _health_round(service, pool, health, status, shared)
        except asyncio.CancelledError:
            raise
        except Exception:  # a health round must never stop the watcher for good
            log.exception("health check round failed")
        await asyncio.sleep(HEALTH_INTERVAL_S)


async def _health_round(service: DecodeProxyService, pool: WorkerPool, health: health_aio.HealthServicer,
                        status: int | None, shared: bool | None) -> tuple[int | None, bool | None]:
    """One look at Redis and the workers; health is only written when it changes."""
    log_ = service.shared_log
    now_shared = log_ is None or log_.healthy
    service.metrics.redis_up.set(1 if now_shared else 0)
    if log_ is not None:
        service.metrics.shared_dropped.set(log_.dropped)
        service.metrics.shared_skipped.set(log_.malformed)
    if service.request_log is not None:
        service.metrics.records_up.set(1 if service.request_log.healthy else 0)
        service.metrics.records_queued.set(len(service.request_log.queue))
        service.metrics.records_dropped.set(service.request_log.dropped)
    if now_shared != shared:
        await health.set(SHARED_STATE_SERVICE, health_pb2.HealthCheckResponse.SERVING if now_shared
                         else health_pb2.HealthCheckResponse.NOT_SERVING)
        if shared is not None:
            log.warning("shared drafting state: %s", "reachable" if now_shared else "Redis unreachable")
        shared = now_shared
    await pool.refresh()
    service.load_prior_texts()  # once a model's vocabulary is known
    m = service.metrics
    for w in pool.workers:
        m.worker_up.labels(w.address, w.meta.name if w.meta else "").set(1 if w.healthy else 0)
        m.worker_queue.labels(w.address).set(w.load.queue_depth)
        m.worker_batch.labels(w.address).set(w.load.batch_size)
        m.worker_in_flight.labels(w.address).set(w.in_flight)
        if w.memory is not None:
            m.worker_rss.labels(w.address).set(w.memory.resident_bytes)
            m.worker_kv.labels(w.address).set(w.memory.kv_cache_bytes)
            m.worker_sessions.labels(w.address).set(w.memory.sessions)
    serving = pool.ready() and service.prior_texts_loaded()
    new = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    if new != status:
        for name in ("", PROXY_SERVICE):
            await health.set(name, new)
        status = new
        log.info("proxy health: %s", health_pb2.HealthCheckResponse.ServingStatus.Name(new))
    return status, shared


class WorkerRegistryService(pb_grpc.WorkerRegistryServicer):
    """Lets workers join a running proxy.

    A registered worker receives tenants' prompts, so with a ``token`` only a worker that presents it
    (``authorization: Bearer TOKEN``) may join."""

    def __init__(self, pool: WorkerPool, token: str | None = None) -> None:
        self.pool = pool
        self.token = token

    def _authorized(self, context) -> bool:
        if not self.token:
            return True
        return presents(context.invocation_metadata(), self.token)

    async def Register(self, request, context):
        if not self._authorized(context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "this proxy admits only workers that present its registration token: give the "
                                "worker the proxy's registration_token (QUICKDRAFT_REGISTRATION_TOKEN)")
        address = request.address.strip()
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"address must be HOST:PORT, got {address!r}")
        if is_unspecified(host):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{address!r} is where a worker listens, not where the proxy can reach it; start "
                                "the worker with --advertise HOST:PORT")
        return pb.RegisterWorkerResponse(added=await self.pool.add(address, registered=True))


async def serve_proxy(settings: Settings, ready: asyncio.Event | None = None,
                      plaintext_workers: Collection[str] = (), tls: TlsConfig | None = None) -> None:
    """Serve until cancelled. ``plaintext_workers``: configured workers called without TLS whatever the
    settings say (``quickdraft up``'s own children on loopback). ``tls``: the settings' TLS files already
    checked (the CLI reads them before anything starts); None reads them here."""
    if tls is None:
        tls = settings.tls.check()
    pool = WorkerPool.from_addresses(settings.workers, token=settings.registration_token, tls=tls,
                                     plaintext=plaintext_workers)
    service = DecodeProxyService(settings, pool)
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    )
    add_to_server(service, server)
    pb_grpc.add_WorkerRegistryServicer_to_server(WorkerRegistryService(pool, settings.registration_token), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    for svc in ("", PROXY_SERVICE):
        await health.set(svc, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        (pb.DESCRIPTOR.services_by_name["DecodeProxy"].full_name,
         pb.DESCRIPTOR.services_by_name["WorkerRegistry"].full_name,
         reflection.SERVICE_NAME, "grpc.health.v1.Health"),
        server,
    )
    address = f"{settings.host}:{settings.grpc_port}"
    if add_port(server, address, tls) == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    log.info("proxy listening on %s, %s (workers: %s, called over %s)", address, tls.scheme,
             ", ".join(settings.workers) or "none yet; waiting for `quickdraft worker --register`",
             "TLS" if tls.calls_securely else "plaintext")
    local = is_loopback(settings.host)
    if not tls.serves and not local:
        log.warning("%s speaks plaintext: API keys and prompts cross the network readable; set tls_cert_file and "
                    "tls_key_file", address)
    remote = [w for w in settings.workers if w not in plaintext_workers and not is_loopback(w.rpartition(":")[0])]
    if tls.serves and not tls.calls_securely and (remote or not local):
        log.warning("clients reach this proxy over TLS, but it calls its workers (%s) in plaintext: set "
                    "tls_ca_file to the roots of the workers' certificates",
                    ", ".join(remote) or "any that register")
    if not settings.registration_token and not local:
        log.warning("worker registration is open to any host that reaches %s: a registered worker sees "
                    "tenants' prompts; set registration_token on the proxy and its workers", address)
    await service.start()
    # Everything loaded so far (tokenizers, the replayed drafting state's Python side, the gRPC
    # stack) lives as long as the process: keep it out of the cyclic collector's scans, so the
    # collections that per-step garbage triggers stay short on the hot path.
    gc.collect()
    gc.freeze()
    watcher = asyncio.create_task(_watch_workers(service, pool, health))
    tasks = [asyncio.create_task(server.wait_for_termination())]
    if settings.http_port:
        from quickdraft.proxy.http_api import serve_http

        tasks.append(asyncio.create_task(serve_http(service, settings.host, settings.http_port, tls)))
        log.info("OpenAI-compatible endpoint on %s://%s:%d/v1", "https" if tls.serves else "http", settings.host,
                 settings.http_port)
    if ready is not None:
        ready.set()
    try:
        # Either front ending (an HTTP bind failure, a stopped gRPC server) ends the proxy.
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
    finally:
        for task in (watcher, *tasks):
            task.cancel()
        for task in (watcher, *tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await server.stop(grace=2)
        await service.close()
        await pool.close()
