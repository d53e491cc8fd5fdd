"""The one credential QuickDraft's processes pass: ``authorization: Bearer TOKEN`` gRPC metadata.

Tenants present their API key this way to the proxy, and proxies and workers present their shared
registration token to each other.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

AUTHORIZATION = "authorization"


def bearer_token(metadata: Iterable[tuple[str, str]] | None) -> str:
    """The token of an ``authorization: Bearer TOKEN`` header (gRPC metadata); "" when there is none."""
    token = ""
    for name, value in metadata or ():
        if name.lower() == AUTHORIZATION and value[:7].lower() == "bearer ":
            token = value[7:].strip()
    return token


def bearer_metadata(token: str) -> tuple[str, str]:
    return AUTHORIZATION, f"Bearer {token}"


def presents(metadata: Iterable[tuple[str, str]] | None, token: str) -> bool:
    """Whether the metadata carries ``token`` (compared in constant time: a secret's prefix must not leak)."""
    presented = bearer_token(metadata)
    return bool(presented) and hmac.compare_digest(presented.encode(), token.encode())
