"""Sessions: a conversation's token history, owned by the proxy.

A session is (tenant, session id). Its history is the authority a worker's KV
cache is rebuilt from; ``worker_len`` is how many of those tokens the current
worker is known to hold. Calls without a session id join the tenant's session
whose previous prompt the new prompt extends (an agent's next call re-sends its
last prompt plus the answer), or start a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from quickdraft.proxy.goodput import Acceptance
from quickdraft.suffix_cache.base import common_prefix_len


@dataclass(eq=False)
class Session:
    tenant: str
    session_id: str
    worker_key: str
    history: list[int] = field(default_factory=list)
    prompt_len: int = 0          # length of the last call's prompt
    worker_len: int = 0          # history tokens the placed worker holds
    worker_address: str = ""     # the worker worker_len speaks of
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # How this session's drafts fare, for sizing them under load (proxy/goodput.py).
    acceptance: Acceptance = field(default_factory=Acceptance)
    tokens_per_step: float = 1.0  # moving average
    last_scored: int = 1          # positions its last step scored on the worker
    # Calls holding or waiting for the session (from get_or_create to the end of ``serving``): such a
    # session is neither evicted nor joined by a call without an id. The lock alone cannot say so:
    # it reads free between one call's release and the next waiter's wake-up.
    users: int = 0
    tokenizers: set[str] = field(default_factory=set)  # the vocabularies its drafter state is under

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[None]:
        """One call's turn on the session, ending the hold that ``get_or_create`` took for it."""
        try:
            async with self.lock:
                yield
        finally:
            self.users -= 1

    def start_call(self, prompt: list[int]) -> int:
        """Adopt a new prompt as history; returns how many tokens were kept from before."""
        keep = common_prefix_len(self.history, prompt)
        self.history = list(prompt)
        self.prompt_len = len(prompt)
        self.worker_len = min(self.worker_len, keep)
        return keep


def worker_session_key(tenant: str, session_id: str) -> str:
    # Opaque to workers; unique per (tenant, session) and safe as a map key.
    return f"{tenant}\x1f{session_id}"


class SessionTable:
    def __init__(self, max_per_tenant: int = 1024) -> None:
        self.max_per_tenant = max_per_tenant
        self._by_tenant: dict[str, OrderedDict[str, Session]] = {}

    def _tenant(self, tenant: str) -> OrderedDict[str, Session]:
        return self._by_tenant.setdefault(tenant, OrderedDict())

    def get_or_create(self, tenant: str, session_id: str, prompt: list[int]) -> tuple[Session, list[Session]]:
        """The session for this call, held for it (run the call in ``session.serving()``), and any
        sessions evicted to make room."""
        sessions = self._tenant(tenant)
        if not session_id:
            found = self._continued_by(sessions, prompt)
            session_id = found.session_id if found else uuid.uuid4().hex
        session = sessions.get(session_id)
        if session is None:
            session = Session(tenant, session_id, worker_session_key(tenant, session_id))
            sessions[session_id] = session
        sessions.move_to_end(session_id)
        session.users += 1
        evicted = []
        while len(sessions) > self.max_per_tenant:
            # Least recently used first, but never a session with a request in progress (its drafter
            # state and history are in use): when every other session is busy, run over the cap until
            # one finishes.
            victim = next((sid for sid, s in sessions.items() if not s.users), None)
            if victim is None:
                break
            evicted.append(sessions.pop(victim))
        return session, evicted

    @staticmethod
    def _continued_by(sessions: OrderedDict[str, Session], prompt: list[int]) -> Session | None:
        best, best_len = None, 0
        for session in reversed(sessions.values()):
            n = session.prompt_len
            if best_len < n <= len(prompt) and not session.users and prompt[:n] == session.history[:n]:
                best, best_len = session, n
        return best

    def drop(self, tenant: str, session_id: str) -> Session | None:
        return self._tenant(tenant).pop(session_id, None)

    def __len__(self) -> int:
        return sum(len(s) for s in self._by_tenant.values())
