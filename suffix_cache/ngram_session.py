"""Shared plumbing of the n-gram drafters: a table per scope, a context tail per session."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from quickdraft.suffix_cache import _core
from quickdraft.suffix_cache.base import AcceptedRun, PositionStats, Scope, SessionKey, common_prefix_len


@dataclass(slots=True)
class TailSession:
    tail: list[int] = field(default_factory=list)   # the last tokens of the history
    history_len: int = 0
    prompt_seen: list[int] = field(default_factory=list)  # what begin_call last learned from
    # Tokens the context moved past before they were learned (``NgramState.follow``), and the
    # context they followed.
    pending: AcceptedRun = field(default_factory=AcceptedRun)
    pending_context: list[int] = field(default_factory=list)


class NgramState:
    """One n-gram table per scope and a bounded context tail per session."""

    def __init__(self, max_order: int, width: int, max_entries: int) -> None:
        self.max_order, self.width, self.max_entries = max_order, width, max_entries
        self.tables: dict[Scope, _core.NgramTable] = {}
        self.sessions: dict[SessionKey, TailSession] = {}
        self.keep = max(32, 2 * max_order)

    def memory_bytes(self) -> int:
        return sum(table.memory_bytes() for table in self.tables.values())

    def table(self, scope: Scope) -> _core.NgramTable:
        table = self.tables.get(scope)
        if table is None:
            table = self.tables[scope] = _core.NgramTable(self.max_order, self.width, self.max_entries)
        return table

    def begin(self, key: SessionKey, prompt: Sequence[int]) -> tuple[TailSession, list[int]]:
        """The session, and the prompt tokens it has not learned before (the new part)."""
        session = self.sessions.get(key)
        if session is None:
            session = self.sessions[key] = TailSession()
        keep = common_prefix_len(session.prompt_seen, prompt)
        new = list(prompt[keep:])
        session.prompt_seen = list(prompt)
        session.tail = list(prompt[-self.keep:])
        session.history_len = len(prompt)
        return session, new

    def learn(self, key: SessionKey, context: list[int], tokens: Sequence[int],
              stats: Sequence[PositionStats] | None, forget: float) -> None:
        """Learn `tokens` following `context` (target top-k masses when stats are given)."""
        table = self.table(key.scope)
        if stats and len(stats) >= len(tokens):
            k = min(len(s.top_ids) for s in stats[: len(tokens)])
            ids = [t for s in stats[: len(tokens)] for t in s.top_ids[:k]]
            mass = [2.718281828459045 ** lp for s in stats[: len(tokens)] for lp in s.top_logprobs[:k]]
            table.observe_run(context[-self.max_order:], list(tokens), ids, mass, k, forget)
        else:
            table.observe_run(context[-self.max_order:], list(tokens), [], [], 0, forget)

    def follow(self, key: SessionKey, tokens: Sequence[int], stats: Sequence[PositionStats] | None) -> None:
        """Move the session's context past ``tokens`` now and learn them at ``flush``: drafting needs
        the current context at once, while learning can wait until the call ends."""
        session = self.sessions.get(key)
        if session is None or not tokens:
            return
        if not session.pending.tokens:
            session.pending_context = session.tail[-self.max_order:]
        session.pending.add(tokens, stats)
        self.advance(session, tokens)

    def flush(self, key: SessionKey, forget: float) -> None:
        """Learn what ``follow`` deferred, in one run after the context it followed."""
        session = self.sessions.get(key)
        if session is not None and session.pending.tokens:
            self.learn(key, session.pending_context, session.pending.tokens, session.pending.stats, forget)
            session.pending = AcceptedRun()

    def advance(self, session: TailSession, tokens: Sequence[int]) -> None:
        session.tail.extend(tokens)
        session.history_len += len(tokens)
        session.prompt_seen.extend(tokens)
        if len(session.tail) > self.keep:
            del session.tail[: len(session.tail) - self.keep]
