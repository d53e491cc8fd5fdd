"""Errors the proxy reports to clients, each with its gRPC status."""

from __future__ import annotations

import grpc


class ProxyError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(ProxyError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class Unauthenticated(ProxyError):
    code = grpc.StatusCode.UNAUTHENTICATED


class Overloaded(ProxyError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(f"{message}; retry after {retry_after_s:g} s")
        self.retry_after_s = retry_after_s


class NoWorker(ProxyError):
    code = grpc.StatusCode.UNAVAILABLE


class WorkerFailed(ProxyError):
    """A worker refused or failed a request in a way that moving to another worker cannot mend (its
    own status is passed on, an unexplained one as INTERNAL)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = grpc.StatusCode.INTERNAL if code == grpc.StatusCode.UNKNOWN else code

    @classmethod
    def of(cls, exc: grpc.aio.AioRpcError, model: str) -> WorkerFailed:
        return cls(exc.code(), f"the worker serving {model!r} answered {exc.code().name}: {exc.details()}")
