"""SuffixDecoding: draft trees from the session's history and the tenant's earlier responses.

Two suffix indexes are consulted each step: the session's own (its prompt and the
response so far, extended incrementally across the calls of one agent run) and
a scope-wide one holding the tenant's earlier responses; a third, per vocabulary, holds
public prior text (``use_prior``, suffix_cache/prior_text.py) at a lower weight. For each, the longest
suffix match of the context is found, the continuations of its most recent
occurrences are counted into a frequency tree, and a draft tree is grown best
first by estimated path probability, limited to ``factor * match_len + offset``
levels and to nodes whose probability is at least ``min_prob``. The index whose
tree promises more accepted tokens wins. The index and the tree growth are
compiled (``_core.cpp``); this module keeps the sessions and scopes.

QuickDraft's default departs from that rule in four ways, each measured on the
dev traces (bench/RESULTS.md): one frequency tree over both indexes' occurrences
(shorter matches and earlier responses at lower weight, occurrences whose
surroundings share the current context's tokens at higher weight) instead of the
better of two trees; node probabilities calibrated per scope against what the target really
emitted (by depth, raw probability, match length and support, then corrected by
the node's token, the pair it completes and its rivalry with its siblings), so the
tree is grown, and the proxy sizes it, by acceptance chances; deeper drafts (up to 32 tokens)
where a long match makes a long copy likely; and, after a short or no match, the copy that
differs from the context in its last token only (an edited line) continues past that token.
"""

from __future__ import annotations

import logging
import threading
import zlib
from collections.abc import Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field

from quickdraft.suffix_cache import _core
from quickdraft.suffix_cache.base import Drafter, PositionStats, Scope, SessionKey
from quickdraft.suffix_cache.draft import DraftTree
from quickdraft.suffix_cache.prior_text import PriorText

log = logging.getLogger(__name__)


@dataclass(slots=True)
class SuffixParams:
    """Defaults chosen on a third of the dev traces and checked on the other two thirds
    (bench/RESULTS.md); ``merge=False, length_decay=0, min_prob=0.05, max_occurrences=32``
    is SuffixDecoding's own rule."""

    max_depth: int = 32          # hard cap on draft depth
    factor: float = 2.0          # depth <= factor * match_len + offset
    # A short match may still start a copy a few tokens long: with calibrated chances sizing the tree,
    # room for 6 levels after a 1-token match (not 3) lets a likely run through (bench/RESULTS.md).
    offset: float = 4.0
    min_prob: float = 0.005      # prune nodes whose estimated acceptance chance is lower
    # Most recent occurrences per n-gram order used for frequencies: 12 drafts as well as 16 did
    # (tune / check thirds +0.01 / -0.04 %) at about 0.9 x the time (bench/RESULTS.md).
    max_occurrences: int = 12
    merge: bool = True           # one tree over session and shared occurrences (not the better of two)
    length_decay: float = 0.5    # weight of an occurrence: length_decay ** (longest match - its match)
    recency_decay: float = 1.0   # ... times recency_decay ** (its rank by recency)
    shared_weight: float = 0.5   # ... times this for occurrences in the tenant's earlier responses
    # ... times this for occurrences in the vocabulary's prior text (use_prior; suffix_cache/prior_text.py):
    # public code is a likelier source than nothing, a less likely one than the tenant's own responses at
    # the same match length (a longer match in it still leads: not decaying the tenant's shorter matches
    # against it lost 0.16 %). Merged trees only (merge=True).
    prior_weight: float = 0.3
    # The prior is read only when the session's and the tenant's text match fewer tokens: after a longer
    # match their copy is the likely one, and skipping the prior there keeps 92 % of its gain at about half
    # its cost per step (tune / check thirds, bench/RESULTS.md).
    prior_below: int = 4
    global_max_tokens: int = 4_000_000  # response tokens kept per scope before eviction
    # The tenant's responses are frozen in steps: once the part appended since the last freeze holds
    # freeze_every tokens and freeze_share of the live ones, its chains are laid out as blocks
    # (TokenIndex.freeze: the same drafts, read faster at every step; the cost is paid in end_call).
    freeze_every: int = 65_536
    freeze_share: float = 0.125
    # With a maintenance executor (maintain_in: the proxy's), a tenant index of at least this many live
    # tokens is compacted and frozen by rebuilding it from a snapshot in that thread, and swapped in when
    # done: in place, a merge takes 0.2-0.4 s and a compaction 1-2 s at the 4 M-token cap, a stall of
    # every stream the event loop serves. Smaller ones stay in place (a merge of 256 K tokens: ~15 ms).
    rebuild_above: int = 262_144
    context_window: int = 16     # ... times exp(context_weight * the share of the context's last
    context_weight: float = 2.0  #     context_window tokens that also precede the occurrence's match)
    calibrate: bool = True       # grow trees by calibrated acceptance chances (learned per scope)
    # One-substitution resync: when the context matches fewer than resync_below tokens, a copy whose
    # source differs from the context in its last token only (an edited operator, a new identifier),
    # matched over at least resync_min tokens before it, continues after the source's token, with
    # this weight (0: off).
    resync_weight: float = 0.5
    resync_below: int = 3
    resync_min: int = 3

    def core(self) -> _core.DraftParams:
        p = _core.DraftParams()
        for name in ("max_depth", "factor", "offset", "min_prob", "max_occurrences", "merge", "length_decay",
                     "recency_decay", "shared_weight", "prior_weight", "prior_below", "context_window",
                     "context_weight", "resync_weight", "resync_below", "resync_min"):
            setattr(p, name, getattr(self, name))
        return p


# Tokens a rebuilt index takes per call from the one it replaces (TokenIndex.catch_up): a few ms.
CATCH_UP_PER_CALL = 16_384

_PRIOR_INDEXES: dict[tuple[str, str], _core.TokenIndex] = {}  # read-only once built: drafters share them
# The prior is read after matches under prior_below (4) tokens, so n-grams of up to 4 tokens find its
# occurrences: the same drafts within 0.04 % as the eight default orders, at 174 MB (123 MB frozen, now)
# instead of 443 MB for the standard library's 3.3 M tokens (bench/RESULTS.md).
PRIOR_ORDERS = [1, 2, 3, 4]
_PRIOR_LOCK = threading.Lock()


def shared_prior_index(prior: PriorText) -> _core.TokenIndex:
    """The prior text's index, built once per process (every drafter of the vocabulary reads it)."""
    if not prior.fingerprint:  # texts made by hand: nothing says two of them are the same
        return _build_index(prior)
    key = (prior.tokenizer, prior.fingerprint)
    with _PRIOR_LOCK:
        index = _PRIOR_INDEXES.get(key)
        if index is None:
            index = _PRIOR_INDEXES[key] = _build_index(prior)
    return index


def _build_index(prior: PriorText) -> _core.TokenIndex:
    index = _core.TokenIndex(PRIOR_ORDERS)
    # Frozen as it is built (its chains laid out as blocks, read faster at every step): nothing is
    # ever appended to it.
    index.extend_sequences(prior.texts, freeze=True)
    return index


@dataclass(slots=True)
class _Rebuild:
    # A tenant index being rebuilt off the caller's thread, and the snapshot it is built from.
    snapshot: _core.IndexSnapshot
    future: Future[_core.TokenIndex]
    seen: int = -1  # the replaced index's length at the last catch-up step


@dataclass(slots=True)
class _Session:
    # The index, the scope's shared state it drafts with and the pending draft live in the core,
    # so a step crosses into C++ once to propose and once to accept.
    core: _core.SuffixSession = field(default_factory=_core.SuffixSession)
    response_start: int = 0


class SuffixDrafter(Drafter):
    name = "suffix"

    def __init__(self, params: SuffixParams | None = None) -> None:
        self.params = params or SuffixParams()
        self._core_params = self.params.core()
        self._sessions: dict[SessionKey, _Session] = {}
        self._responses: dict[Scope, _core.TokenIndex] = {}
        self._calibrations: dict[Scope, _core.Calibration] = {}
        self._exported: dict[Scope, int] = {}  # the calibration's observation count at its last export
        self._priors: dict[str, _core.TokenIndex] = {}  # by tokenizer: public text, shared by every tenant
        self._executor: Executor | None = None
        self._rebuilds: dict[Scope, _Rebuild] = {}

    def maintain_in(self, executor: Executor | None) -> None:
        self._executor = executor
        for index in self._responses.values():
            index.auto_compact = executor is None

    # -- state -------------------------------------------------------------
    def responses(self, scope: Scope) -> _core.TokenIndex:
        if self._rebuilds:
            self._swap_rebuilt(scope)
        index = self._responses.get(scope)
        if index is None:
            index = self._responses.setdefault(scope, _core.TokenIndex())
            index.auto_compact = self._executor is None
        return index

    def _swap_rebuilt(self, scope: Scope) -> None:
        job = self._rebuilds.get(scope)
        if job is None or not job.future.done():
            return
        source = self._responses[scope]
        try:
            rebuilt = job.future.result()
            rebuilt.auto_compact = False
            # What was learned while it was built is indexed here, a bounded share per call: what was
            # learned since the last step plus CATCH_UP_PER_CALL, so it is level within a few calls
            # (a busy tenant must not trade one long pause for another).
            grown, job.seen = (len(source) - job.seen if job.seen >= 0 else 0), len(source)
            level = rebuilt.catch_up(source, job.snapshot, CATCH_UP_PER_CALL + grown)
        except Exception as exc:  # noqa: BLE001 (out of memory, a cancelled job): maintained here instead
            del self._rebuilds[scope]
            log.warning("rebuilding tenant %r's response index failed (%s): maintained in the call instead",
                        scope.tenant, exc)
            self._maintain_in_place(source)
            return
        if level:
            del self._rebuilds[scope]
            self._responses[scope] = rebuilt  # sessions bound to the old one keep it until their next call

    def calibration(self, scope: Scope) -> _core.Calibration:
        cal = self._calibrations.get(scope)
        if cal is None:
            cal = self._calibrations.setdefault(scope, _core.Calibration())
        return cal

    def session_tokens(self, key: SessionKey) -> list[int]:
        session = self._sessions.get(key)
        return session.core.index.tokens if session else []

    def begin_call(self, key: SessionKey, prompt: Sequence[int]) -> None:
        if self._rebuilds:  # other tenants' too, so a finished rebuild of one gone quiet does not linger
            for scope in [s for s, job in self._rebuilds.items() if s != key.scope and job.future.done()]:
                self._swap_rebuilt(scope)  # (this tenant's takes its step in responses(), below)
        session = self._sessions.get(key)
        if session is None:
            session = self._sessions[key] = _Session()
        cal = self.calibration(key.scope) if self.params.calibrate else None
        session.core.bind(self.responses(key.scope), cal, self._core_params,  # drops any pending draft
                          self._priors.get(key.scope.tokenizer))
        # The session's arena holds exactly its history: one sequence, no boundaries.
        session.core.index.rebase(prompt if isinstance(prompt, list) else list(prompt))
        session.response_start = len(prompt)

    def accept(
        self, key: SessionKey, tokens: Sequence[int], stats: Sequence[PositionStats] | None = None
    ) -> None:
        self._sessions[key].core.accept(tokens)

    def end_call(self, key: SessionKey) -> None:
        session = self._sessions.get(key)
        if session is None:
            return
        response = session.core.index.since(session.response_start)
        # Unbound between calls, so an idle session does not keep a rebuilt-and-replaced index alive.
        session.core.bind(None, None, self._core_params, None)
        if response:
            self.learn_response(key.scope, response)

    def learn_response(self, scope: Scope, response: Sequence[int]) -> None:
        index = self.responses(scope)
        index.start_sequence()
        index.extend(list(response))
        overflow = index.live_tokens - self.params.global_max_tokens
        if overflow > 0:
            index.evict_before(index.floor + overflow)  # compacts by itself without an executor
        if scope in self._rebuilds:
            return  # the rebuild under way catches up with this response and takes over
        if self._executor is None or index.live_tokens < self.params.rebuild_above:
            self._maintain_in_place(index, always_freeze=False)
        elif index.compaction_due or self._freeze_due(index):
            self._rebuild(scope, index)

    def _freeze_due(self, index: _core.TokenIndex) -> bool:
        unfrozen = len(index) - max(index.frozen_tokens, index.floor)
        return unfrozen >= max(self.params.freeze_every, self.params.freeze_share * index.live_tokens)

    def _rebuild(self, scope: Scope, index: _core.TokenIndex) -> None:
        snapshot = index.snapshot()
        # Room for what comes until the next rebuild, so that growth does not rehash on this thread.
        headroom = 2 * self.params.freeze_share
        try:
            future = self._executor.submit(snapshot.build, True, headroom)
        except RuntimeError:  # the executor was shut down (the proxy is stopping): as without one
            self._maintain_in_place(index)
            return
        self._rebuilds[scope] = _Rebuild(snapshot, future)

    def _maintain_in_place(self, index: _core.TokenIndex, always_freeze: bool = True) -> None:
        # A rebuild that was refused or failed was due, so that path always freezes; otherwise only
        # when due, judged after the compaction (which leaves what it keeps unfrozen).
        if index.compaction_due:
            index.compact()
        if always_freeze or self._freeze_due(index):
            index.freeze()

    def drop_session(self, key: SessionKey) -> None:
        self._sessions.pop(key, None)

    def memory_bytes(self) -> int:
        # The indexes (the calibrations are a few MB per tenant at most). An index being rebuilt is
        # counted once: its rebuilt copy, until it is swapped in, is not counted.
        return (sum(index.memory_bytes() for index in self._responses.values())
                + sum(s.core.index.memory_bytes() for s in self._sessions.values()))

    def use_prior(self, prior: PriorText) -> None:
        # Built whole before it is published: a session bound meanwhile drafts without it.
        self._priors[prior.tokenizer] = shared_prior_index(prior)

    def prior_index(self, tokenizer: str) -> _core.TokenIndex | None:
        return self._priors.get(tokenizer)

    def export_state(self, scope: Scope) -> bytes | None:
        # The calibration is learned from drafts against what the target emitted: the response
        # log cannot rebuild it, so it travels as a snapshot (mostly empty cells: compressed).
        # Unchanged since the last export (an idle tenant): nothing new to store.
        cal = self._calibrations.get(scope)
        if cal is None or not cal.observed or self._exported.get(scope) == cal.observed:
            return None
        self._exported[scope] = cal.observed
        return zlib.compress(cal.dump(), 1)

    def import_state(self, scope: Scope, data: bytes) -> bool:
        try:
            raw = zlib.decompress(data)
        except zlib.error:
            return False
        cal = self.calibration(scope)
        if not cal.load(raw):
            return False
        self._exported[scope] = cal.observed  # what the store holds already
        return True

    # -- drafting ----------------------------------------------------------
    def propose(self, key: SessionKey, budget: int, min_chance: float = 0.0) -> DraftTree:
        session = self._sessions.get(key)
        if session is None:
            return DraftTree()
        if budget <= 0:
            session.core.forget_offer()  # the step's offer is this empty tree, not the last one
            return DraftTree()
        return DraftTree(*session.core.propose(budget, min_chance))

    # The core's tree as grown: a subclass that changes what propose returns must override this too.
    def offered(self, key: SessionKey) -> DraftTree | None:
        session = self._sessions.get(key)
        whole = session.core.offered() if session is not None else None
        return DraftTree(*whole) if whole is not None else None
